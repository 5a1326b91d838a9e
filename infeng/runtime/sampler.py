"""Sampling settings and the per-request sampler (the math is the C kernel ifg_sample)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np

from infeng.errors import InfengError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 0          # 0 = off
    top_p: float = 1.0      # 1 = off
    seed: int | None = None  # None = a fresh random seed (recorded in the result)
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()           # stop strings: the completion ends before the first one
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the completion
    logprobs: int | None = None          # record each sampled token's log-prob and this many top alternatives
    # called as logits_processor(token_ids_so_far, logits_row) before sampling; edits the row in
    # place (e.g. a grammar's mask: -inf for tokens it forbids)
    logits_processor: object = field(default=None, compare=False, repr=False)

    @classmethod
    def with_model_defaults(cls, generation: dict, **given) -> "SamplingParams":
        """Options the user gave win; then what the model's generation_config states (do_sample
        false means greedy); then the engine's defaults."""
        d: dict = {}
        if generation.get("do_sample") is False:
            d["temperature"] = 0.0
        elif generation.get("do_sample") is True:
            for k in ("temperature", "top_k", "top_p"):
                if isinstance(generation.get(k), (int, float)):
                    d[k] = generation[k]
        d.update({k: v for k, v in given.items() if v is not None})
        return cls(**d)

    def validated(self, where: str = "", names: dict[str, str] | None = None) -> "SamplingParams":
        """Checked copy (a fresh seed if none was given). ``names`` renames fields in messages,
        e.g. top_p → --top-p for command-line options."""
        pre = f"{where}: " if where else ""
        n = {f: (names or {}).get(f, f) for f in ("max_tokens", "temperature", "top_k", "top_p", "seed")}

        def bad(msg):
            raise InfengError(pre + msg)
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            bad(f"{n['max_tokens']} must be an integer >= 0, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not np.isfinite(self.temperature) or self.temperature < 0:
            bad(f"{n['temperature']} must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad(f"{n['top_k']} must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            bad(f"{n['top_p']} must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            bad(f"{n['seed']} must be an integer >= 0, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) and x for x in stop):
            bad(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.stop_token_ids):
            bad(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad(f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")
        return replace(self, stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids),
                       seed=self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little"))


MAX_LOGPROBS = 20


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) under the raw logits (before temperature or truncation) and the ``top`` most
    likely (token, log p), most likely first."""
    x = logits.astype(np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    best = np.argpartition(-x, top - 1)[:top] if 0 < top < len(x) else np.arange(len(x) if top else 0)
    best = best[np.argsort(-x[best], kind="stable")]
    return float(x[token] - lse), [(int(t), float(x[t] - lse)) for t in best]


class Sampler:
    """Draws tokens for one request: same seed, same logits → same tokens."""

    def __init__(self, kern, params: SamplingParams, vocab: int, probs, idx):
        self.lib = kern.lib
        self.p = params
        self.vocab = vocab
        self.rng = np.random.Generator(np.random.PCG64(params.seed))
        self.probs, self.idx = probs, idx   # caller-owned scratch pointers (vocab each)

    def __call__(self, logits_ptr) -> int:
        p = self.p
        if p.temperature <= 0:
            return self.lib.ifg_argmax(logits_ptr, self.vocab)
        return self.lib.ifg_sample(logits_ptr, self.vocab, p.temperature, p.top_k, p.top_p,
                                   self.rng.random(), self.probs, self.idx)
