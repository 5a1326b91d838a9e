"""A forward session: the C forward pass ready to run, for the engine, the scorer, the activation
dump and the benchmarks alike.

It owns the model's C view with its step buffers (``net``: tokens / pos / seq / out_rows in,
logits out), a paged KV cache of ``n_slots`` sequences, and the LoRA batch struct for steps that
use adapters. Callers fill the step buffers and call ``run``.
"""
from __future__ import annotations

from infeng.kernels.structs import LoraBatch
from infeng.model.llama import LlamaC
from infeng.model.loader import Model
from infeng.runtime.kv import KVCache
from infeng.runtime.kvspec import KVSpec


class ForwardSession:
    def __init__(self, kern, model: Model, *, max_tokens: int, max_out: int, threads: int, n_slots: int,
                 max_seq_len: int, block_size: int = 16, kv_budget_mb: float | None = None,
                 max_segments: int | None = None, net=None, window_chunk: bool = False,
                 kv_spec: KVSpec | None = None):
        """``net`` stands in for the model's C view (the simulator's cost model, or another
        session's to share its weights); ``max_segments``: adapter segments a step may have
        (default 2 · max_out + 1: a decode and a prefill run per sequence and a spare);
        ``window_chunk``: the caller grants a sliding-window model's prefill blocks ``max_tokens``
        at a time (kv.py), so the pool holds the window, not the context; ``kv_spec``: the KV
        types per layer (kvspec.py; default f32)."""
        c = model.config
        self.kern, self.model, self.cfg, self.threads = kern, model, c, threads
        self.NULL = kern.ffi.NULL
        self.net = net or LlamaC(kern, model, max_tokens, max_out, threads)
        self.kv = KVCache(kern, c, n_slots, max_seq_len, block_size, kv_budget_mb,
                          chunk=max_tokens if window_chunk else None, spec=kv_spec)
        self.lora = LoraBatch(kern, max_tokens, max_segments or 2 * max_out + 1,
                              max(c.dim, c.hidden_dim, c.q_dim), c.dim)
        self.tokens, self.pos, self.seq, self.out_rows = (self.net.tokens, self.net.pos, self.net.seq,
                                                          self.net.out_rows)

    @property
    def logits(self):
        return self.net.logits

    def lora_segments(self, tables: list, starts: list[int], T: int):
        """The LoRA batch for a step of ``T`` rows: rows starts[i].. use adapter table tables[i]
        (None: no adapter), each adapter's rank already reserved with ``lora.reserve``."""
        return self.lora.set(tables, starts, T)

    def run(self, T: int, n_out: int, lora=None, extents: bool = False) -> None:
        """One forward call over rows [0, T) of the step buffers; logits of out_rows[:n_out].
        ``extents``: the rows' sequence extents are in ``net.extent`` (LongRoPE, dynamic NTK)."""
        if extents:
            self.net.step(self.kv, T, n_out, lora, extents=True)
        else:
            self.net.step(self.kv, T, n_out, lora)
