"""``q6_k``: 256-weight super-blocks of 6-bit levels with an int8 scale per 16 weights,
byte-compatible with GGUF/ggml ``Q6_K`` (GGUF interop is a copy of the blocks).

Block layout (210 bytes = 6.5625 bits per weight):

====== ======= ===========================================================================
offset bytes   content
====== ======= ===========================================================================
0      128     ``ql``: low 4 bits. Half h (elements 128h..128h+127) uses bytes 64h..64h+63:
               byte ``64h + l`` (l < 32) holds element ``128h + l`` low and ``128h + 64 + l``
               high; byte ``64h + 32 + l`` holds ``128h + 32 + l`` low, ``128h + 96 + l`` high
128    64      ``qh``: high 2 bits. Byte ``128 + 32h + l``, bits 2c..2c+1 = element
               ``128h + 32c + l`` (c = 0..3)
192    16      int8 ``sc[s]``, the scale of elements 16s..16s+15
208    2       fp16 ``d``
====== ======= ===========================================================================

Value of element i: ``(d * sc[i // 16]) * (q_i - 32)`` with q_i in 0..63.

The quantizer is ggml's reference (``quantize_row_q6_K_ref``, what ``llama-quantize`` writes
without an importance matrix): per 16 weights, the scale of a least-squares fit weighted by x²
over 19 candidate inverse scales ``-(32 + 0.1 s) / max`` (s = -9..9; ``max`` the element of
largest magnitude, with its sign); the 16 scales are then rounded to int8 against the one of
largest magnitude (``d = max_scale / -128``) and the levels recomputed with the rounded scales.
Every sum runs in f32 in element order and rounding is to nearest even, as in ggml, so the
bytes are ggml's. ``quantize_q6_k`` runs it in the C library (kernels_c/quantize_q6k.c, the
same operations in the same order); ``quantize_q6_k_ref`` is the numpy reference.
"""
from __future__ import annotations

import numpy as np

from infeng.quant.q4_k import check_rows, quantize_in_c

QK_K = 256
BLOCK_BYTES = 210
GROUP_MAX_EPS = np.float32(1e-15)
F = np.float32


def _ordered_sum(t: np.ndarray) -> np.ndarray:
    """Sum over the last axis in f32, left to right (as a C loop does)."""
    return np.cumsum(t, axis=-1, dtype=np.float32)[..., -1]


def _fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants(16, 32, x, L, rmse_type 1) for every row of x [S, 16] (f32):
    (scale [S], levels L [S, 16] in 0..63)."""
    amax = np.abs(x).max(-1)
    zero = amax < GROUP_MAX_EPS
    mx = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)[:, 0]
    mx = np.where(zero, F(1), mx)
    w = x * x

    def levels(iscale):
        return np.clip(np.rint(iscale[:, None] * x), F(-32), F(31))

    def sums(lv):
        return _ordered_sum(w * x * lv), _ordered_sum(w * lv * lv)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lv = levels(F(-32) / mx)
        sumlx, suml2 = sums(lv)
        scale = np.where(suml2 != 0, sumlx / suml2, F(0)).astype(np.float32)
        best = scale * sumlx
        for s in range(-9, 10):
            if s == 0:
                continue
            cand = levels(-(F(32) + F(0.1) * F(s)) / mx)
            slx, sl2 = sums(cand)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            lv = np.where(better[:, None], cand, lv)
            scale = np.where(better, slx / sl2, scale).astype(np.float32)
            best = np.where(better, scale * slx, best).astype(np.float32)
    L = np.where(zero[:, None], F(0), lv + F(32)).astype(np.uint8)
    return np.where(zero, F(0), scale).astype(np.float32), L


def quantize_q6_k_ref(x: np.ndarray) -> np.ndarray:
    """f32 [N][K] (K a multiple of 256) → uint8 [N][K/256*210], ggml's bytes (numpy)."""
    x = check_rows(x, "q6_k")
    N, K = x.shape
    nb = K // QK_K
    scales, L = _fit(x.reshape(N * nb * 16, 16))
    scales, L = scales.reshape(-1, 16), L.reshape(-1, 16, 16)
    # the scale of largest magnitude (the first one, as ggml's strict >), with its sign
    max_scale = np.take_along_axis(scales, np.abs(scales).argmax(-1)[:, None], -1)[:, 0]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = np.where(empty, F(0), F(-128) / np.where(empty, F(1), max_scale)).astype(np.float32)
        d16 = np.where(empty, F(0), F(1) / np.where(empty, F(1), iscale)).astype(np.float16)
        sc = np.minimum(F(127), np.rint(iscale[:, None] * scales)).astype(np.int8)
        dj = d16.astype(np.float32)[:, None] * sc.astype(np.float32)                 # [B, 16]
        req = np.clip(np.rint(x.reshape(-1, 16, 16) / np.where(dj == 0, F(1), dj)[..., None]), F(-32), F(31))
    L = np.where((dj != 0)[..., None], (req + F(32)).astype(np.uint8), L)
    L = np.where(empty[:, None, None], np.uint8(0), L)
    sc = np.where(empty[:, None], np.int8(0), sc)
    return pack(L.reshape(-1, QK_K), sc, d16).reshape(N, nb * BLOCK_BYTES)


def pack(L: np.ndarray, sc: np.ndarray, d16: np.ndarray) -> np.ndarray:
    """Blocks from their parts: levels uint8 [B, 256] (0..63, element order), scales int8 [B, 16],
    fp16 d [B] → uint8 [B, 210]."""
    L = np.asarray(L, np.uint8).reshape(-1, 2, 4, 32)                             # [B, half, quarter, l]
    out = np.empty((L.shape[0], BLOCK_BYTES), np.uint8)
    lo, hi = L & 0x0F, L >> 4
    out[:, 0:128] = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)],
                                   axis=-1).reshape(-1, 128)
    out[:, 128:192] = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    out[:, 192:208] = np.asarray(sc, np.int8).view(np.uint8)
    out[:, 208:210] = np.asarray(d16, np.float16)[:, None].view(np.uint8)
    return out


def quantize_q6_k(x: np.ndarray, threads: int = 0) -> np.ndarray:
    """f32 [N][K] → uint8 [N][K/256*210] (GGUF Q6_K blocks), in the C library
    (ifg_quantize_q6_k, ``threads`` = 0: all), byte for byte ``quantize_q6_k_ref``."""
    return quantize_in_c("ifg_quantize_q6_k", check_rows(x, "q6_k"), BLOCK_BYTES, threads)


def levels(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [N][nb*210] → (d f32 [N, nb], sc int8 [N, nb, 16], q uint8 [N, nb, 256] in 0..63)."""
    N = raw.shape[0]
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(N, -1, BLOCK_BYTES)
    ql = b[..., 0:128].reshape(N, -1, 2, 2, 32)                    # [.., half, 32-byte run, l]
    qh = b[..., 128:192].reshape(N, -1, 2, 1, 32)
    lo = np.stack([ql[..., 0, :] & 15, ql[..., 1, :] & 15, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], axis=-2)
    hi = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-2)
    q = (lo | (hi << 4)).reshape(N, -1, QK_K)
    d = b[..., 208:210].copy().view(np.float16).astype(np.float32)[..., 0]
    return d, b[..., 192:208].copy().view(np.int8), q


def dequantize_q6_k(raw: np.ndarray) -> np.ndarray:
    """uint8 [N][nb*210] → f32 [N][nb*256]: (d * sc) * (q - 32) in f32, as the kernels' lookup."""
    d, sc, q = levels(raw)
    ds = d[..., None] * sc.astype(np.float32)                      # [N, nb, 16]
    y = np.repeat(ds, 16, axis=-1) * (q.astype(np.float32) - F(32))
    return y.reshape(raw.shape[0], -1)
