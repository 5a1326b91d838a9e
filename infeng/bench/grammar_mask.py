"""Per-token cost of a grammar library's token mask on the engine's vocabularies: which library
structured output uses, and whether constrained sequences slow a batch.

    infeng bench --suite bench/grammar_mask.yaml [--model TOKENIZER.json]      (kind: grammar_mask)

For llguidance and outlines-core (each optional; a missing one is skipped with a note), and for a
JSON schema and a regex: the once-per-server vocabulary setup, the per-grammar setup (compile /
index build), and the mean time per token to fill the mask, apply it to a logits row and advance
the matcher, over a seeded walk that samples allowed tokens.
xgrammar is not measured: it requires torch, which the engine never imports.
"""
from __future__ import annotations

import asyncio
import json
import re
import time

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from infeng.model.loader import load_model
from infeng.runtime.engine import Engine, Request
from infeng.runtime.sampler import SamplingParams
from infeng.serve.grammar import Grammars, apply_bitmask

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"}, "pets": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}
REGEX = r"[A-Z][a-z]{2,8} (is|was) [0-9]{1,3} years old\."


def eos_of(tk: HFTokenizer) -> int:
    for t in ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>"):
        i = tk.token_to_id(t)
        if i is not None:
            return i
    return 0


def walk(n: int, seed: int, vocab: int, fill, advance, done) -> tuple[int, float]:
    """Tokens stepped and seconds per token in what the sampler does: fill the bitmask, apply it
    to a logits row, advance the matcher. The token is drawn uniformly among the allowed ones."""
    rng = np.random.default_rng(seed)
    mask = np.full((vocab + 31) // 32, -1, np.int32)
    logits = np.zeros(vocab, np.float32)
    t, steps = 0.0, 0
    for _ in range(n):
        logits[:] = 0
        t0 = time.perf_counter()
        fill(mask)
        apply_bitmask(logits, mask)
        t += time.perf_counter() - t0
        ok = np.flatnonzero(np.isfinite(logits))
        if len(ok) == 0:
            break
        tok = int(ok[rng.integers(len(ok))])
        t0 = time.perf_counter()
        advance(tok)
        t += time.perf_counter() - t0
        steps += 1
        if done():
            break
    return steps, t


def bench_llguidance(tk_json: str, eos: int, vocab: int, n: int):
    import llguidance
    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tk_json, n_vocab=vocab, eos_token=eos)
    tok_s = time.perf_counter() - t0
    out = []
    for kind, g in (("json", llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)),
                    ("regex", llguidance.LLMatcher.grammar_from_regex(REGEX))):
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(lt, g, log_level=0)
        setup = time.perf_counter() - t0
        steps, t = walk(n, 0, vocab, lambda mask: m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes),
                        m.consume_token, m.is_stopped)
        out.append(("llguidance", kind, tok_s, setup, steps, t / max(steps, 1)))
    return out


def bench_outlines(tk: HFTokenizer, eos: int, vocab: int, n: int):
    import outlines_core
    t0 = time.perf_counter()
    vmap: dict = {}
    for i in range(tk.get_vocab_size()):
        if i == eos:
            continue
        s = tk.id_to_token(i)
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", s)
        key = bytes([int(m.group(1), 16)]) if m else s.replace("\u2581", " ").encode()
        vmap.setdefault(key, []).append(i)
    voc = outlines_core.Vocabulary(eos, vmap)
    voc_s = time.perf_counter() - t0
    out = []
    for kind, rx in (("json", outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))), ("regex", REGEX)):
        t0 = time.perf_counter()
        g = outlines_core.Guide(outlines_core.Index(rx, voc))
        setup = time.perf_counter() - t0
        steps, t = walk(n, 0, vocab, lambda mask: g.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize),
                        g.advance, g.is_finished)
        out.append(("outlines-core", kind, voc_s, setup, steps, t / max(steps, 1)))
    return out


def run(tokenizers: list[str], tokens: int, log=print) -> tuple[list[dict], list[str]]:
    """One record per (vocabulary, library, grammar); a note per library not installed."""
    recs, notes = [], []
    for path in tokenizers:
        text = open(path).read()
        tk = HFTokenizer.from_str(text)
        vocab, eos = tk.get_vocab_size(), eos_of(tk)
        rows = []
        for name, fn in (("llguidance", lambda: bench_llguidance(text, eos, vocab, tokens)),
                         ("outlines-core", lambda: bench_outlines(tk, eos, vocab, tokens))):
            try:
                rows += fn()
            except ImportError:
                notes.append(f"{name} not installed: skipped ({path})")
        for lib, kind, once, setup, steps, per in rows:
            recs.append({"tokenizer": path, "vocab": vocab, "library": lib, "grammar": kind, "vocab_ms": once * 1e3,
                         "grammar_ms": setup * 1e3, "tokens": steps, "us_per_token": per * 1e6})
            log(f"{vocab:>7} {lib:>14} {kind:>7} {once * 1e3:>9.1f} {setup * 1e3:>10.1f} {steps:>6} {per * 1e6:>9.1f}")
    return recs, notes


class _Timed:
    """A logits processor whose calls are timed (seconds, summed until read)."""

    def __init__(self, proc, clock: list):
        self.proc, self.clock = proc, clock

    def __call__(self, token_ids, logits):
        t0 = time.perf_counter()
        self.proc(token_ids, logits)
        self.clock[0] += time.perf_counter() - t0


def step_cost(model_path: str, batch: int, constrained: int, n_out: int, threads: int, repeats: int,
              log=print) -> list[dict]:
    """Engine decode steps of ``batch`` sequences with none constrained, then with ``constrained``
    of them under a JSON schema (llguidance, as `infeng serve` applies it), A B A B: the mean
    decode step (median; prefill steps left out), the mean time the masks took inside the mixed steps, and
    the slowdown every sequence of the mixed batch sees (they share each step)."""
    model = load_model(model_path, verify=False)
    eng = Engine(model, threads=threads, max_batch=batch, prefix_cache=False)
    gram = Grammars(model.tokenizer["json"], model.config.vocab_size, eng.tokenizer.eos_ids)
    proc = asyncio.run(gram.processor("json", SCHEMA, "bench"))
    rng = np.random.default_rng(0)
    vocab = min(model.config.vocab_size, eng.tokenizer.vocab_size)
    prompts = [rng.integers(3, vocab, 32).tolist() for _ in range(batch)]

    def once(k: int) -> tuple[float, float, int]:
        clock = [0.0]
        reqs = []
        for i, p in enumerate(prompts):
            params = SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True)
            if i < k:
                params = SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True,
                                        logits_processor=_Timed(proc.copy(), clock))
            reqs.append(Request(id=str(i), prompt_ids=p, params=params))
        eng.step_log = []
        list(eng.generate(reqs))
        dec = [dt for T, n, _, dt in eng.step_log if T == n == batch]    # full decode steps only
        eng.step_log = None
        return float(np.median(dec)), clock[0] / max(len(dec), 1), len(dec)

    runs = {0: [], constrained: []}
    for _ in range(repeats):
        for k in runs:
            runs[k].append(once(k))
    bare, mixed = (np.median([r[0] for r in runs[k]]) for k in (0, constrained))
    mask = float(np.median([r[1] for r in runs[constrained]]))
    rec = {"model": str(model_path), "vocab": model.config.vocab_size, "batch": batch, "constrained": constrained,
           "threads": threads, "decode_steps": runs[0][0][2], "step_ms_unconstrained": bare * 1e3,
           "step_ms_mixed": mixed * 1e3, "mask_ms_per_step": mask * 1e3,
           "mask_us_per_constrained_token": mask / constrained * 1e6, "mixed_slowdown": mixed / bare - 1,
           "mask_share_of_mixed_step": mask / mixed}
    log(f"batch {batch}, {constrained} constrained: decode step {bare * 1e3:.1f} ms bare, {mixed * 1e3:.1f} ms mixed "
        f"({rec['mixed_slowdown']:+.1%}); masks {mask * 1e3:.2f} ms per step ({rec['mask_share_of_mixed_step']:.1%})")
    return [rec]
