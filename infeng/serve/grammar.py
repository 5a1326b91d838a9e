"""Structured output: a request's JSON schema, regex or Lark grammar enforced while sampling.

llguidance computes each constrained sequence's token mask; the engine applies it through the
sampler's per-request ``logits_processor`` hook, so unconstrained sequences in the same batch run
as before. Chosen over outlines-core by the `grammar_mask` bench kind: both cost a few
hundred µs per token on a 32k vocabulary, but llguidance compiles a grammar lazily in about a
millisecond where outlines-core builds a whole index per schema (0.2-0.7 s at 32k, more with the
vocabulary), and it takes Lark grammars too. xgrammar requires torch, which the engine never imports.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np

from infeng.serve.protocol import bad

# compact JSON: with flexible whitespace a small model can wander in blanks for ever
JSON_OPTIONS = {"whitespace_flexible": False}


class Grammars:
    """The llguidance tokenizer (built once, on first use, off the event loop) and grammar compiles."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids):
        self.spec = (tokenizer_json, vocab_size, sorted(eos_ids))
        self.vocab = vocab_size
        self._lt = None
        self._lock = threading.Lock()

    def _tokenizer(self):
        with self._lock:
            if self._lt is None:
                import llguidance
                js, n, eos = self.spec
                lt = llguidance.LLTokenizer(js, n_vocab=n, eos_token=eos)
                self.by_bytes = {}               # token bytes → ids (for forced bytes)
                for i in range(n):
                    if i not in eos:
                        self.by_bytes.setdefault(lt.decode_bytes([i]), []).append(i)
                self.by_bytes.pop(b"", None)
                self._lt = lt
            return self._lt

    async def processor(self, fmt: str, spec: Any, param: str) -> "GrammarProcessor":
        try:
            import llguidance
        except ImportError:
            raise bad("structured output needs llguidance: pip install 'infeng[serve]'", param) from None
        M = llguidance.LLMatcher
        if fmt == "json":
            try:
                g = M.grammar_from_json_schema(spec, overrides=JSON_OPTIONS)
            except ValueError as e:
                raise bad(f"{param}: the JSON schema cannot be used: {e}", param) from None
        else:
            g = M.grammar_from_regex(spec) if fmt == "regex" else M.grammar_from_lark(spec)
        lt = await asyncio.to_thread(self._tokenizer)
        err = await asyncio.to_thread(M.validate_grammar, g, lt)
        if err:
            raise bad(f"{param}: the {fmt} constraint cannot be used: {err.splitlines()[0][:300]}", param)
        return GrammarProcessor(M(lt, g, log_level=0), self.vocab, self.spec[2], self.by_bytes)


class GrammarProcessor:
    """The engine's logits hook for one sequence: catch the matcher up on the tokens sampled
    since the last call, then set the logits of every token the grammar forbids to -inf."""

    def __init__(self, matcher, vocab: int, eos_ids, by_bytes: dict):
        self.m = matcher
        self.by_bytes = by_bytes
        self.seen = 0
        self.mask = np.full((vocab + 31) // 32, -1, np.int32)
        self.vocab, self.eos_ids = vocab, sorted(eos_ids)

    def copy(self) -> "GrammarProcessor":
        return GrammarProcessor(self.m.deep_copy(), self.vocab, self.eos_ids, self.by_bytes)

    def __call__(self, token_ids: list[int], logits: np.ndarray) -> None:
        for t in token_ids[self.seen:]:
            self.m.consume_token(t)
        self.seen = len(token_ids)
        # Bytes the grammar forces are emitted first, by tokens that lie within them: at such a
        # point llguidance's mask can allow tokens that skip them when the tokenizer normalizes
        # spaces away (stories260K's strips leading blanks: a regex " [0-9]+" allowed "9" first)
        ff = self.m.compute_ff_bytes()
        if ff:
            ids = [i for k in range(len(ff), 0, -1) for i in self.by_bytes.get(ff[:k], ())]
            if ids:
                only(logits, ids)
                return
        self.m.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
        if not apply_bitmask(logits, self.mask):     # nothing allowed (an error state): end here
            only(logits, self.eos_ids)


def only(logits: np.ndarray, ids) -> None:
    keep = logits[ids].copy()
    logits[:] = -np.inf
    logits[ids] = keep


def apply_bitmask(logits: np.ndarray, mask: np.ndarray) -> bool:
    """-inf where the bitmask (int32 words; bit j of word w is token 32w + j) has a 0; False if
    it allows nothing."""
    allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:len(logits)]
    if not allowed.any():
        return False
    logits[allowed == 0] = -np.inf
    return True
