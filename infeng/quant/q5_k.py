"""``q5_k``: 256-weight super-blocks of 5-bit levels with a 6-bit scale and min per 32 weights,
byte-compatible with GGUF/ggml ``Q5_K`` (GGUF interop is a copy of the blocks).

Block layout (176 bytes = 5.5 bits per weight):

====== ======= ===========================================================================
offset bytes   content
====== ======= ===========================================================================
0      2       fp16 ``d``, the scale of the sub-block scales
2      2       fp16 ``dmin``, the scale of the sub-block mins
4      12      8 six-bit scales and 8 six-bit mins, packed as q4_k's (infeng.quant.q4_k)
16     32      ``qh``: bit j of byte l is bit 4 of element ``32j + l`` (sub-block j)
48     128     ``qs``: byte ``32c + l`` holds element ``64c + l`` (sub-block 2c) in its low
               nibble and ``64c + 32 + l`` (sub-block 2c + 1) in its high nibble
====== ======= ===========================================================================

Value of element i of sub-block j: ``d * sc[j] * q_i - dmin * m[j]`` with q_i in 0..31.

The quantizer is ggml's reference (``quantize_row_q5_K_ref``, what ``llama-quantize`` writes
without an importance matrix): per sub-block, a weighted least-squares (scale, min) search over
16 candidate inverse scales ``(nmax - 0.5 + 0.1 s) / (max - min)`` (weights ``rms + |x|``, the min
never above 0; ``min`` is the best candidate's so far, the origin of the next one's levels), the 8 scales and mins rounded to 6 bits against their maxima, and the levels
recomputed with the rounded values. Every sum runs in f32 in element order and rounding is to
nearest even, as in ggml. ``quantize_q5_k`` runs it in the C library (kernels_c/quantize_q5k.c);
``quantize_q5_k_ref`` is the numpy reference it matches byte for byte.
"""
from __future__ import annotations

import numpy as np

from infeng.quant.q4_k import check_rows, pack_scales, quantize_in_c, unpack_scales
from infeng.quant.q6_k import _ordered_sum as _osum

QK_K = 256
BLOCK_BYTES = 176
F = np.float32


def _fit(x: np.ndarray, w: np.ndarray, nmax: int = 31) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants(32, nmax, x, w, rmin -0.5, rdelta 0.1, nstep 15, squared error)
    for every row of x, w [S, 32] (f32): (scale [S], the_min [S] >= 0, levels [S, 32])."""
    lo = np.minimum.accumulate(x, axis=-1)[:, -1]
    hi = np.maximum.accumulate(x, axis=-1)[:, -1]
    sum_w = _osum(w)
    sum_x = _osum(w * x)
    lo = np.minimum(lo, F(0))
    flat = hi == lo
    span = np.where(flat, F(1), hi - lo)
    fn = F(nmax)

    def levels(iscale, origin):
        return np.clip(np.rint(iscale[:, None] * (x - origin[:, None])), F(0), fn)

    def err(scale, mn, lv):
        diff = scale[:, None] * lv + mn[:, None] - x
        return _osum(w * (diff * diff))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = fn / span
        scale = F(1) / iscale
        L = levels(iscale, lo)
        best = err(scale, lo, L)
        mn = lo.copy()
        for s in range(16):
            # as ggml: once a candidate wins, its min is the origin of the next candidates' levels
            isc = (F(-0.5) + F(0.1) * F(s) + fn) / np.where(flat, F(1), hi - mn)
            la = levels(isc, mn)
            sl, sl2, sxl = _osum(w * la), _osum(w * la * la), _osum(w * la * x)
            D = sum_w * sl2 - sl * sl
            ts = (sum_w * sxl - sum_x * sl) / D
            tm = (sl2 * sum_x - sl * sxl) / D
            pos = tm > 0
            tm = np.where(pos, F(0), tm)
            ts = np.where(pos, sxl / sl2, ts)
            cur = err(ts, tm, la)
            better = (D > 0) & (cur < best) & ~flat
            L = np.where(better[:, None], la, L)
            best = np.where(better, cur, best)
            scale = np.where(better, ts, scale).astype(np.float32)
            mn = np.where(better, tm, mn).astype(np.float32)
    scale = np.where(flat, F(0), scale).astype(np.float32)
    L = np.where(flat[:, None], F(0), L)
    return scale, (-mn).astype(np.float32), L.astype(np.uint8)


def quantize_q5_k_ref(x: np.ndarray) -> np.ndarray:
    """f32 [N][K] (K a multiple of 256) → uint8 [N][K/256*176], ggml's bytes (numpy)."""
    x = check_rows(x, "q5_k")
    N, K = x.shape
    xs = x.reshape(-1, 32)
    rms = np.sqrt(_osum(xs * xs) / F(32)).astype(np.float32)
    scales, mins, L = _fit(xs, (rms[:, None] + np.abs(xs)).astype(np.float32))
    scales, mins, L = scales.reshape(-1, 8), mins.reshape(-1, 8), L.reshape(-1, 8, 32)
    max_scale = np.maximum(np.maximum.accumulate(scales, -1)[:, -1], F(0))
    max_min = np.maximum(np.maximum.accumulate(mins, -1)[:, -1], F(0))
    with np.errstate(divide="ignore"):
        inv_s = np.where(max_scale > 0, F(63) / max_scale, F(0)).astype(np.float32)
        inv_m = np.where(max_min > 0, F(63) / max_min, F(0)).astype(np.float32)
    ls = np.minimum(np.rint(inv_s[:, None] * scales), F(63)).astype(np.uint8)
    lm = np.minimum(np.rint(inv_m[:, None] * mins), F(63)).astype(np.uint8)
    d16 = (max_scale / F(63)).astype(np.float16)
    m16 = (max_min / F(63)).astype(np.float16)
    d = d16.astype(np.float32)[:, None] * ls.astype(np.float32)                 # [B, 8]
    dm = m16.astype(np.float32)[:, None] * lm.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        req = np.clip(np.rint((x.reshape(-1, 8, 32) + dm[..., None]) / np.where(d == 0, F(1), d)[..., None]),
                      F(0), F(31)).astype(np.uint8)
    L = np.where((d != 0)[..., None], req, L)                                    # d == 0: the fit's levels
    out = np.empty((L.shape[0], BLOCK_BYTES), np.uint8)
    out[:, 0:2] = d16[:, None].view(np.uint8)
    out[:, 2:4] = m16[:, None].view(np.uint8)
    out[:, 4:16] = pack_scales(ls, lm)
    hb = (L >> 4).astype(np.uint8)                                               # [B, 8, 32]
    out[:, 16:48] = (hb << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)
    lo = (L & 15).reshape(-1, 4, 2, 32)
    out[:, 48:176] = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    return out.reshape(N, K // QK_K * BLOCK_BYTES)


def quantize_q5_k(x: np.ndarray, threads: int = 0) -> np.ndarray:
    """f32 [N][K] → uint8 [N][K/256*176] (GGUF Q5_K blocks), in the C library
    (ifg_quantize_q5_k, ``threads`` = 0: all), byte for byte ``quantize_q5_k_ref``."""
    return quantize_in_c("ifg_quantize_q5_k", check_rows(x, "q5_k"), BLOCK_BYTES, threads)


def levels(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [N][nb*176] → (d, dmin f32 [N, nb], sc, m uint8 [N, nb, 8], q uint8 [N, nb, 256] in 0..31)."""
    N = raw.shape[0]
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(N, -1, BLOCK_BYTES)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
    dmin = b[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
    sc, m = unpack_scales(b[..., 4:16].reshape(-1, 12))
    qs = b[..., 48:176].reshape(N, -1, 4, 1, 32)
    lo = np.concatenate([qs & 15, qs >> 4], axis=-2).reshape(N, -1, 8, 32)
    hi = (b[..., 16:48][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1     # [N, nb, 8, 32]
    q = (lo | (hi << 4)).reshape(N, -1, QK_K)
    return d, dmin, sc.reshape(N, -1, 8), m.reshape(N, -1, 8), q


def dequantize_q5_k(raw: np.ndarray) -> np.ndarray:
    """uint8 [N][nb*176] → f32 [N][nb*256]: (d * sc) * q - dmin * m in f32, as the kernels' lookup."""
    d, dmin, sc, m, q = levels(raw)
    a = (d[..., None] * sc.astype(np.float32))[..., None]
    b = (dmin[..., None] * m.astype(np.float32))[..., None]
    y = a * q.reshape(*q.shape[:-1], 8, 32).astype(np.float32) - b
    return y.reshape(raw.shape[0], -1)
