"""The Llama forward pass through the C library: weights as a C struct, one C call per step."""
from __future__ import annotations

import numpy as np

from infeng.kernels import ptr
from infeng.kernels.structs import Structs, Weight
from infeng.model.loader import MATRICES, Model


def attn_scale(cfg, layer: int) -> float:
    """The attention score scale of a layer: 1/sqrt(head_dim), times YaRN's / LongRoPE's factor
    squared on RoPE layers (it multiplies cos and sin, so both q and k). 0 = the C default."""
    f = cfg.attn_factor() if cfg.layer_rope(layer) else 1.0
    return 0.0 if f == 1.0 else float(np.float32(f * f / np.sqrt(cfg.head_dim)))


class LlamaC:
    """Holds the C view of a model's weights and the step buffers for up to ``max_tokens`` tokens
    and ``max_out`` logits rows. ``step`` runs one forward call over what the caller put in
    ``tokens``/``pos``/``seq``/``out_rows``; the logits land in ``logits``."""

    def __init__(self, kern, model: Model, max_tokens: int, max_out: int, threads: int):
        self.kern, self.model, self.cfg = kern, model, model.config
        self.threads = threads
        c = model.config
        S = self.structs = Structs(kern)

        def weight(name, kernel_layout=True) -> Weight:
            rows, cols = model.tensors.shape(name)
            if kernel_layout:   # quantized with 16k rows: interleaved, as the file stores it (or a repack)
                dtype, arr = model.kernel_weight(name, kern, threads)
            else:
                dtype, arr = model.tensors[name]
            return Weight(dtype, arr, rows, cols)

        def f32(name) -> np.ndarray:
            return model.tensors[name][1]

        self.m, self.layers = S.model(
            dim=c.dim, hidden_dim=c.hidden_dim, n_layers=c.n_layers, n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, vocab_size=c.vocab_size, norm_eps=c.norm_eps,
            inv_freq=c.inv_freq(), tok_embeddings=weight("tok_embeddings", kernel_layout=False),  # rows looked up as stored
            final_norm=f32("norm"), output=weight(model.output_name),
            layers=[{"attn_norm": f32(f"layers.{i}.attn_norm"), "ffn_norm": f32(f"layers.{i}.ffn_norm"),
                     **{w: weight(f"layers.{i}.{w}") for w in MATRICES},
                     # per-architecture parts (NULL / 0 where the model has none)
                     **{v: f32(f"layers.{i}.{v}") if f"layers.{i}.{v}" in model.tensors else None
                        for v in ("q_bias", "k_bias", "v_bias", "q_norm", "k_norm")},
                     "window": c.layer_window(i), "no_rope": 0 if c.layer_rope(i) else 1,
                     "attn_scale": attn_scale(c, i)} for i in range(c.n_layers)])

        T = self.max_tokens = max_tokens
        self.bufs = {n: np.zeros((T, d), np.float32) for n, d in (
            ("x", c.dim), ("xb", c.dim), ("q", c.q_dim), ("k", c.kv_dim), ("v", c.kv_dim),
            ("att", c.q_dim), ("hb", c.hidden_dim), ("hb2", c.hidden_dim))}
        # a projection input quantized once for the int8 products that share it (forward.h)
        kq = -(-max(c.dim, c.q_dim, c.hidden_dim) // 32) * 32
        self.xq = (np.zeros((T, kq), np.int8), np.zeros((T, kq // 32), np.float32), np.zeros((T, kq // 32), np.int32))
        self.s = S.scratch(T, **self.bufs, xq=self.xq[0], xq_d=self.xq[1], xq_s=self.xq[2])
        # step inputs and outputs, filled in place by the caller
        self.tokens = np.zeros(T, np.int32)
        self.pos = np.zeros(T, np.int32)
        self.seq = np.zeros(T, np.int32)
        self.out_rows = np.zeros(max(max_out, 1), np.int32)
        self.logits = np.zeros((max(max_out, 1), c.vocab_size), np.float32)
        self._p = (ptr(kern, self.tokens, "int32_t *"), ptr(kern, self.pos, "int32_t *"),
                   ptr(kern, self.seq, "int32_t *"), ptr(kern, self.out_rows, "int32_t *"),
                   ptr(kern, self.logits))
        self.logit_rows = [self._p[4] + i * c.vocab_size for i in range(max(max_out, 1))]
        # LongRoPE / dynamic NTK: each token's frequencies follow its sequence's extent (the
        # config's inv_freq_at), given per token in ``extent``; others use the model's inv_freq
        self.rope_past = c.rope_past()
        self.extent = np.zeros(T, np.int32)
        if self.rope_past:
            self.row_freq = np.zeros((T, c.head_dim // 2), np.float32)
            self._freq: dict[int, np.ndarray] = {}
            self.structs.set(self.s, row_inv_freq=self.row_freq)

    def record_op_times(self) -> np.ndarray:
        """Switch on the C pass's op clock (forward.h, ifg_scratch.op_times); returns the buffer
        each step stamps."""
        buf = np.zeros(1 + (self.cfg.n_layers + 1) * self.kern.lib.IFG_OP_COUNT, np.float64)
        self.structs.set(self.s, op_times=buf)
        return buf

    def record_trace(self, T: int) -> np.ndarray | None:
        """Switch on the activation trace for steps of ``T`` tokens (forward.h, ifg_scratch.trace);
        returns the buffer. ``T`` = 0 switches it off."""
        if T == 0:
            self.structs.set(self.s, trace=None)
            return None
        buf = np.zeros(self.cfg.n_layers * T * self.kern.lib.ifg_trace_floats_per_token(self.m), np.float32)
        self.structs.set(self.s, trace=buf)
        return buf

    def step(self, kv, T: int, n_out: int, lora=None, extents: bool = False) -> None:
        """One forward call; ``lora`` is a ``struct ifg_lora_batch *`` (None/NULL: no adapters).
        ``extents``: the caller filled ``extent`` for each token (see ModelConfig.rope_past),
        else the call is one sequence's, as transformers runs it: its highest position + 1."""
        if self.rope_past:
            self._row_freqs(T, extents)
        tp, pp, sp, rp, lp = self._p
        if lora is None or lora == self.kern.ffi.NULL:
            self.kern.lib.ifg_forward(self.m, self.s, kv.struct, tp, pp, sp, T, rp, n_out, lp, self.threads)
        else:
            self.kern.lib.ifg_forward_lora(self.m, self.s, kv.struct, tp, pp, sp, T, rp, n_out, lp, lora,
                                           self.threads)

    def _row_freqs(self, T: int, extents: bool) -> None:
        ext = self.extent[:T] if extents else np.full(T, int(self.pos[:T].max()) + 1)
        past = self.rope_past
        for e in np.unique(np.maximum(ext, past)):        # all lengths up to the original share one
            f = self._freq.get(int(e))
            if f is None:
                f = self._freq[int(e)] = self.cfg.inv_freq_at(int(e))
                if len(self._freq) > 4096:              # dynamic NTK: one per length; keep it bounded
                    self._freq.clear()
            self.row_freq[:T][np.maximum(ext, past) == e] = f
