"""The Llama forward pass through the C library: weights as a C struct, one C call per step."""
from __future__ import annotations

import numpy as np

from infeng import format as native
from infeng.kernels import ptr
from infeng.model.loader import MATRICES, Model

CDTYPE = {"f32": 0, "bf16": 1, "f16": 2, "q8_0": 3, "q4_0": 4, "q8_0x16": 5, "q4_0x16": 6, "q4_k": 7, "fp8": 8,
          "q4_kx16": 9, "q5_0": 10, "q4_1": 11, "q5_1": 12, "q6_k": 13}


class LlamaC:
    """Holds the C view of a model's weights and the step buffers for up to ``max_tokens`` tokens
    and ``max_out`` logits rows. ``step`` runs one forward call over what the caller put in
    ``tokens``/``pos``/``seq``/``out_rows``; the logits land in ``logits``."""

    def __init__(self, kern, model: Model, max_tokens: int, max_out: int, threads: int):
        self.kern, self.model, self.cfg = kern, model, model.config
        self.threads = threads
        ffi, c = kern.ffi, model.config
        self._keep = []   # arrays whose memory the C structs point into

        def fp(a):
            a = np.ascontiguousarray(a)
            self._keep.append(a)
            return ptr(kern, a)

        def weight(dst, name, kernel_layout=True):
            dtype, arr = model.tensors[name]
            dst.rows, dst.cols = native.logical_shape(dtype, arr.shape)
            if kernel_layout:   # q8_0/q4_0/q4_k with 16k rows: the interleaved copy the kernels want
                dtype, arr = model.kernel_weight(name, kern, threads)
            self._keep.append(arr)
            dst.data = ffi.cast("void *", ffi.from_buffer(arr))
            dst.dtype = CDTYPE[dtype]

        m = self.m = ffi.new("struct ifg_model *")
        m.dim, m.hidden_dim, m.n_layers = c.dim, c.hidden_dim, c.n_layers
        m.n_heads, m.n_kv_heads, m.head_dim, m.vocab_size = c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size
        m.norm_eps = c.norm_eps
        m.inv_freq = fp(c.inv_freq())
        weight(m.tok_embeddings, "tok_embeddings", kernel_layout=False)   # rows looked up as stored
        m.final_norm = fp(model.tensors["norm"][1])
        weight(m.output, model.output_name)
        self.layers = ffi.new("struct ifg_layer[]", c.n_layers)
        for i in range(c.n_layers):
            L = self.layers[i]
            L.attn_norm = fp(model.tensors[f"layers.{i}.attn_norm"][1])
            L.ffn_norm = fp(model.tensors[f"layers.{i}.ffn_norm"][1])
            for w in MATRICES:
                weight(getattr(L, w), f"layers.{i}.{w}")
        m.layers = self.layers

        T = self.max_tokens = max_tokens
        self.bufs = {n: np.zeros((T, d), np.float32) for n, d in (
            ("x", c.dim), ("xb", c.dim), ("q", c.q_dim), ("k", c.kv_dim), ("v", c.kv_dim),
            ("att", c.q_dim), ("hb", c.hidden_dim), ("hb2", c.hidden_dim))}
        s = self.s = ffi.new("struct ifg_scratch *")
        s.max_tokens = T
        for n, a in self.bufs.items():
            setattr(s, n, ptr(kern, a))
        # a projection input quantized once for the int8 products that share it (forward.h)
        kq = -(-max(c.dim, c.q_dim, c.hidden_dim) // 32) * 32
        self.xq = (np.zeros((T, kq), np.int8), np.zeros((T, kq // 32), np.float32), np.zeros((T, kq // 32), np.int32))
        s.xq, s.xq_d, s.xq_s = (ptr(kern, self.xq[0], "int8_t *"), ptr(kern, self.xq[1]),
                                ptr(kern, self.xq[2], "int32_t *"))
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

    def step(self, kv, T: int, n_out: int, lora=None) -> None:
        """One forward call; ``lora`` is a ``struct ifg_lora_batch *`` (None/NULL: no adapters)."""
        tp, pp, sp, rp, lp = self._p
        if lora is None or lora == self.kern.ffi.NULL:
            self.kern.lib.ifg_forward(self.m, self.s, kv.struct, tp, pp, sp, T, rp, n_out, lp, self.threads)
        else:
            self.kern.lib.ifg_forward_lora(self.m, self.s, kv.struct, tp, pp, sp, T, rp, n_out, lp, lora,
                                           self.threads)
