"""The numpy reference forward pass: op for op what the C forward pass does, in plain numpy.

It is validated against logits recorded from Hugging Face transformers (reference.json), and the C
path is validated against it. Compute is f32, except that matmuls accumulate in f64 and round
once: an f32 BLAS product's summation order depends on the machine's BLAS kernel, and with int8
activations one ulp can round a value to the other int8, so an f32 reference would agree with the
C kernels on one machine and not on the next.
"""
from __future__ import annotations

import numpy as np

from infeng.format.schema import MATRICES
from infeng.kernels import bf16_activations
from infeng.model.loader import Model
from infeng.quant import INT8_ACTIVATIONS, _round_away, quantize_activations
from infeng.quant.kvcache import (CHANNEL, POS, channel_groups, channel_scores, hadamard, int4_weighted, round_bf16,
                                  rotation_signs, roundtrip)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(x.astype(np.float32) ** 2, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(ms + np.float32(eps))).astype(np.float32) * w


def rope(x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """HF rotate_half RoPE on x[T, heads, head_dim] at positions pos[T]."""
    half = x.shape[-1] // 2
    ang = pos.astype(np.float32)[:, None] * inv_freq[None, :]          # [T, half] in f32, as HF
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(np.float32)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, scale, window: int = 0,
           first_scores: np.ndarray | None = None, int4_group: int = 0) -> np.ndarray:
    """Causal attention of q [T, heads, hd] at positions pos over the cached k, v [S, kv_heads, hd]
    (positions 0..S-1), GQA by repeating kv heads; window > 0: only the last `window` positions.
    first_scores [heads, T, n]: the q·k of positions 0..n-1 as computed elsewhere (k unused there).
    int4_group: v holds int4 values of groups of that many channels, weighted as the cache's
    attention does (kvcache.int4_weighted)."""
    group = q.shape[1] // k.shape[1]
    K, V = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    S = K.shape[0]
    n = 0 if first_scores is None else first_scores.shape[2]
    att = np.einsum("thd,shd->hts", q, K[n:])
    if n:
        att = np.concatenate([first_scores, att], axis=2)
    att = att * scale                                            # [heads, T, S]
    mask = np.arange(S)[None, :] > pos[:, None]
    if window:
        mask |= np.arange(S)[None, :] <= pos[:, None] - window
    att = np.where(mask[None], -np.inf, att)
    att = np.exp(att - att.max(-1, keepdims=True))
    if int4_group:
        return int4_weighted(att, V, int4_group).reshape(len(pos), -1).astype(np.float32)
    att /= att.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", att, V).reshape(len(pos), -1).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


class ReferenceModel:
    """``forward(tokens)`` continues the sequence held in its KV cache and returns logits [T, vocab]."""

    def __init__(self, model: Model, int8_activations: bool = False, kv=None):
        """``int8_activations``: the inputs of products with q8_0/q4_0/q5_0/q4_k weights are rounded
        to int8 per 32-block first, as the C kernels do (infeng.quant.quantize_activations).
        ``kv``: what the cache stores (a runtime KVSpec: per-layer .k / .v types, .rotate, .group,
        .seed): queries and keys rotated and K/V rounded as the C cache does (quant/kvcache.py)."""
        self.m = model
        self.kv = kv
        self.signs = rotation_signs(model.config.head_dim, kv.seed) if kv is not None and kv.rotated else None
        self.cfg = model.config
        self.w = {name: model.f32(name) for name in model.tensors}   # dequantised once
        self.qin = {n for n, (d, _) in model.tensors.items() if d in INT8_ACTIVATIONS} if int8_activations else set()
        # bf16 matrices whose input the kernels round to bf16 (the model's bf16_act, kernels.bf16_activations)
        self.bin = ({n for n, (d, _) in model.tensors.items() if d == "bf16"}
                    if bf16_activations(model.bf16_act) == "bf16" else set())
        self.inv_freq = self.cfg.inv_freq()
        self.attn_factor = self.cfg.attn_factor()   # YaRN / LongRoPE scale cos and sin: q·k by its square
        # name → (product, dora factor or None): an adapter's low-rank term x → product(x) added
        # beside the base product as the kernels compute it (int8_lora_product, bf16_lora_product)
        self.low_rank: dict = {}
        self.reset()

    def reset(self):
        L = self.cfg.n_layers
        self.k = [np.zeros((0, self.cfg.n_kv_heads, self.cfg.head_dim), np.float32) for _ in range(L)]
        self.v = [np.zeros((0, self.cfg.n_kv_heads, self.cfg.head_dim), np.float32) for _ in range(L)]
        self.kq = [None] * L       # per-channel keys: codes, scales, mins of the complete groups

    @property
    def pos(self) -> int:
        return self.k[0].shape[0]

    def forward(self, tokens, trace=None) -> np.ndarray:
        c, w = self.cfg, self.w
        tokens = np.asarray(tokens, dtype=np.int64)
        T = len(tokens)
        pos = np.arange(self.pos, self.pos + T)
        x = w["tok_embeddings"][tokens].astype(np.float32)
        for i in range(c.n_layers):
            L = f"layers.{i}."
            h = rmsnorm(x, w[L + "attn_norm"], c.norm_eps)
            q, k, v, scale = self.qkv(i, *(self.mm(h, L + p) for p in ("wq", "wk", "wv")), pos)
            if self.kv is not None:
                q, k, v = self.kv_round(i, q, k, v)
            self.k[i] = np.concatenate([self.k[i], k])
            self.v[i] = np.concatenate([self.v[i], v])
            g4 = self.kv.group if self.kv is not None and self.kv.v[i] == "int4" else 0
            if self.kv is not None and self.kv.k[i] in CHANNEL:
                o = self.attend_channel(i, q, pos, scale, c.layer_window(i), g4)
            else:
                o = attend(q, self.k[i], self.v[i], pos, scale, c.layer_window(i), int4_group=g4)
            if self.kv is not None and self.kv.rotate_v and self.kv.rotate_v[i]:   # values were stored rotated
                o = hadamard(o.reshape(T, c.n_heads, c.head_dim), self.signs, transpose=True).reshape(T, -1)
            x = x + self.mm(o, L + "wo")
            h = rmsnorm(x, w[L + "ffn_norm"], c.norm_eps)
            g = silu(self.mm(h, L + "w_gate")) * (self.mm(h, L + "w_up"))
            x = x + self.mm(g, L + "w_down")
            if trace is not None:
                trace.append(x.copy())
        x = rmsnorm(x, w["norm"], c.norm_eps)
        return (self.mm(x, self.m.output_name)).astype(np.float32)

    def qkv(self, i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray):
        """Layer i's projections [T, width] → the per-head q, k, v attention reads, and its
        score scale: biases (Qwen2), per-head q/k RMSNorm (Qwen3), RoPE unless a NoPE layer
        (SmolLM3), whose YaRN / LongRoPE factor scales the scores by its square."""
        c, w, L, T = self.cfg, self.w, f"layers.{i}.", len(pos)
        if c.qkv_bias:
            q, k, v = q + w[L + "q_bias"], k + w[L + "k_bias"], v + w[L + "v_bias"]
        q = q.reshape(T, c.n_heads, c.head_dim)
        k = k.reshape(T, c.n_kv_heads, c.head_dim)
        v = v.reshape(T, c.n_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = rmsnorm(q, w[L + "q_norm"], c.norm_eps), rmsnorm(k, w[L + "k_norm"], c.norm_eps)
        if not c.layer_rope(i):
            return q, k, v, np.float32(1.0 / np.sqrt(c.head_dim))
        # LongRoPE / dynamic NTK past the original length: this call's extent picks the frequencies
        inv = c.inv_freq_at(int(pos.max()) + 1) if c.rope_past() else self.inv_freq
        q, k = rope(q, pos, inv), rope(k, pos, inv)
        return q, k, v, np.float32(self.attn_factor ** 2 / np.sqrt(c.head_dim))

    def kv_round(self, i: int, q, k, v):
        """Layer i's q, k, v as the compressed cache sees them: rotated, then K/V rounded."""
        kv = self.kv
        if kv.rotate[i]:
            q, k = hadamard(q, self.signs), hadamard(k, self.signs)
        if kv.rotate_v and kv.rotate_v[i]:
            v = hadamard(v, self.signs)
        if kv.k[i] in CHANNEL:                  # rounded per group as it completes (attend_channel)
            return q, k, roundtrip(v, kv.v[i], kv.group)
        return q, roundtrip(k, kv.k[i], kv.group), roundtrip(v, kv.v[i], kv.group)

    def attend_channel(self, i: int, q, pos, scale, window, int4_group: int = 0) -> np.ndarray:
        """Per-channel keys (kvcache.CHANNEL): a query sees the complete groups before its own
        quantized and its own group's keys in f32, as the C cache does."""
        out = np.empty((len(pos), q.shape[1] * q.shape[2]), np.float32)
        g_of = pos // POS
        for g in np.unique(g_of):
            n = int(g) * POS
            sel = g_of == g
            out[sel] = attend(q[sel], self.k[i], self.v[i], pos[sel], scale, window,
                              self.channel_scores(i, q[sel], n), int4_group)
        return out

    def channel_scores(self, i: int, q, n: int) -> np.ndarray:
        """q · the first n positions' keys of layer i as per-channel groups (kvcache.channel_scores)."""
        if self.kq[i] is None:
            self.kq[i] = channel_groups(self.k[i][:0], self.kv.k[i])
        have = self.kq[i][0].shape[0]
        if have < n:                              # groups are independent: quantize the new ones
            new = channel_groups(self.k[i][have:n], self.kv.k[i])
            self.kq[i] = tuple(np.concatenate(p) for p in zip(self.kq[i], new))
        c, d, m = self.kq[i]
        return channel_scores(q, c[:n], d[:n // POS], m[:n // POS], self.kv.k[i])

    def mm(self, x: np.ndarray, name: str) -> np.ndarray:
        """x @ Wᵀ (with x rounded to int8 blocks first if W is quantized and int8_activations, to
        bf16 if W is bf16 and the model's bf16_act says so)."""
        x_in = x
        if name in self.bin:
            x = round_bf16(x)
        if name in self.qin:
            q, d = quantize_activations(x)
            x = (q.reshape(x.shape[0], -1, 32).astype(np.float32) * d[..., None]).reshape(x.shape)
        y = x.astype(np.float64) @ self.w[name].T.astype(np.float64)
        if name in self.low_rank:
            product, dora = self.low_rank[name]
            y = y + product(x_in)
            if dora is not None:
                y = y * dora
        return y.astype(np.float32)

    def greedy(self, prompt_ids, n: int) -> list[int]:
        self.reset()
        logits = self.forward(prompt_ids)
        out = []
        for _ in range(n):
            t = int(np.argmax(logits[-1]))
            out.append(t)
            logits = self.forward([t])
        return out


def int8_lora_product(x: np.ndarray, qa: np.ndarray, qbt: np.ndarray, h_scale: np.ndarray,
                      rounded: list | None = None) -> np.ndarray:
    """The low-rank term y = h·Bᵀ of an int8 adapter as the C kernels compute it (lora.h), for
    x [T, K] f32, qa [r, K] and qbt [r, N] int8 and h_scale [r] (the LoRA scale times both int8
    scales): x rounded per row and 32-block as q8_0 activations are (zero-padded to a whole
    block), h = Σ_blocks d_x · (q_x·qaᵀ) · h_scale in f32, rounded to int8 per row with
    d = max|h| / 127 (ties away from zero), then y = d · (q_h·qbt), the products exact in
    integers. Returns [T, N] float64; ``rounded``, if given, gets h / d (the values that were
    rounded)."""
    T, K = x.shape
    kp = -(-K // 32) * 32
    xp = np.zeros((T, kp), np.float32)
    xp[:, :K] = x
    qx, dx = quantize_activations(xp)                                         # [T, kp], [T, kp/32]
    qap = np.zeros((qa.shape[0], kp), np.int64)
    qap[:, :K] = qa
    blocks = np.einsum("tbk,rbk->tbr", qx.reshape(T, -1, 32).astype(np.int64), qap.reshape(len(qap), -1, 32))
    h = ((blocks * dx[:, :, None].astype(np.float64)).sum(1) * h_scale).astype(np.float32)
    dh = (np.abs(h).max(1) / np.float32(127)).astype(np.float32)
    inv = np.where(dh != 0, np.float32(1) / np.where(dh != 0, dh, 1), np.float32(0)).astype(np.float32)
    if rounded is not None:
        rounded.append(h * inv[:, None])
    hq = _round_away(h * inv[:, None]).astype(np.int64)
    return (hq @ qbt.astype(np.int64)).astype(np.float64) * dh[:, None].astype(np.float64)


def bf16_lora_product(x: np.ndarray, a: np.ndarray, bt: np.ndarray, h_scale: np.ndarray,
                      near: list | None = None) -> np.ndarray:
    """The low-rank term y = h·Bᵀ of a bf16 adapter as the C kernels compute it (lora.h), for x
    [T, K] f32, a [r, K] and bt [r, N] as f32 (bf16 values) and h_scale [r]: x rounded to bf16,
    h = (x·aᵀ) · h_scale in f32 then rounded to bf16 per value, y = h·bt (the products of bf16
    values are exact; the kernels add them in f32). Returns [T, N] float64; ``near``, if given,
    gets per value of h its bf16 step where it lies within its f32 sum's error of a rounding
    boundary (the kernels' f32 sum may round it the other way), else 0."""
    xr = round_bf16(x).astype(np.float64)
    h64 = (xr @ a.T.astype(np.float64)) * h_scale
    h = h64.astype(np.float32)
    hr = round_bf16(h)
    if near is not None:
        err = 5e-7 * (np.abs(xr) @ np.abs(a.T.astype(np.float64))) * np.abs(h_scale)   # ~5x a typical f32 sum's
        top = np.abs(h).view(np.uint32) >> 16                   # |h| truncated to bf16, and one bf16 up
        lo, hi = ((top << 16).view(np.float32).astype(np.float64), ((top + 1) << 16).view(np.float32).astype(np.float64))
        near.append((np.abs(np.abs(h64) - (lo + hi) / 2) <= err) * (hi - lo))     # the bf16 step, if near
    return hr.astype(np.float64) @ bt.astype(np.float64)


__all__ = ["ReferenceModel", "MATRICES"]
