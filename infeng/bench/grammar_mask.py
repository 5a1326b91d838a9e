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

import json
import random
import re
import time

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from infeng.serve.grammar import apply_bitmask

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
