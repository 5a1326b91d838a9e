"""``q4_k``: 256-weight super-blocks with a 6-bit scale and a 6-bit min per 32-weight sub-block,
byte-compatible with GGUF/ggml ``Q4_K`` (so GGUF interop is a copy of the blocks).

Block layout (144 bytes = 4.5 bits per weight), little-endian:

====== ======= ===========================================================================
offset bytes   content
====== ======= ===========================================================================
0      2       ``d``    fp16, the super-block scale of the sub-block scales
2      2       ``dmin`` fp16, the super-block scale of the sub-block mins
4      12      eight 6-bit scales ``sc[j]`` and eight 6-bit mins ``m[j]``: for j < 4,
               ``sc[j] = b[j] & 63`` and ``m[j] = b[j+4] & 63``; for j >= 4,
               ``sc[j] = (b[j+4] & 15) | (b[j-4] >> 6) << 4`` and
               ``m[j] = (b[j+4] >> 4) | (b[j] >> 6) << 4`` (b = these 12 bytes)
16     128     nibbles: chunk c = 0..3 is 32 bytes; byte ``16 + 32c + l`` holds element
               ``64c + l`` (sub-block 2c) in its low nibble and ``64c + 32 + l`` (sub-block
               2c + 1) in its high nibble
====== ======= ===========================================================================

Value of element i of sub-block j: ``d * sc[j] * q_i - dmin * m[j]`` (q_i in 0..15).

The quantizer searches, per sub-block, for the (scale, min) pair that minimises the weighted
squared error: candidate inverse scales around ``15 / (max - min)``, each giving levels by
rounding, then the weighted least-squares (scale, min) for those levels in closed form; the
best candidate is kept. The weights of the fit are ``av + |x|`` (``av`` the block's RMS: large
elements count more, as ggml does) or, when the caller gives per-column importances
(``weights``, e.g. from calibration: mean x² per input column), ``importance * sqrt(var + x²)``.
The 8 scales and 8 mins of a super-block are then quantized to 6 bits against their maxima and
the levels are recomputed with the quantized values.

``quantize_q4_k`` runs this in the C library (kernels_c/quantize_k.c, ~6x faster than numpy on
one core, and threaded); ``quantize_q4_k_ref`` is the numpy reference it matches byte for byte.
"""
from __future__ import annotations

import numpy as np

from infeng import kernels
from infeng.errors import InfengError

QK_K = 256
SUB = 32
BLOCK_BYTES = 144
N_STEPS = 16                 # candidate inverse scales per sub-block: iscale*(1 + 0.05*(s - 4)/...)
CHUNK_ROWS_WEIGHTS = 1 << 16  # sub-block search on ~64K weights at a time (temporaries stay in cache)


def check_rows(x: np.ndarray, qtype: str) -> np.ndarray:
    """``x`` as contiguous f32 [N][K], K a multiple of the K-quants' 256-wide super-block."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise InfengError(f"cannot quantize shape {list(x.shape)} to {qtype}: rows must be a multiple of {QK_K}")
    return x


def quantize_in_c(fn: str, x: np.ndarray, block_bytes: int, threads: int) -> np.ndarray:
    """uint8 [N][K/256*block_bytes] from the C quantizer ``fn``(dst, x, N, K, threads)."""
    N, K = x.shape
    out = np.empty((N, K // QK_K * block_bytes), np.uint8)
    kern = kernels.active()
    ffi = kern.ffi
    getattr(kern.lib, fn)(ffi.cast("uint8_t *", ffi.from_buffer(out)), ffi.cast("float *", ffi.from_buffer(x)),
                          N, K, threads)
    return out


def _fit_sub_blocks(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x, w: [S, 32] (f64). Returns the best (scale >= 0, offset <= 0) per sub-block, such
    that x ≈ scale * q + offset with q = clip(round((x - offset) / scale), 0, 15)."""
    lo = np.minimum(x.min(-1), 0.0)            # the offset is -dmin*m with m >= 0: never above 0
    hi = x.max(-1)
    span = hi - lo
    flat = span <= 0
    span = np.where(flat, 1.0, span)
    sw, swx = w.sum(-1), (w * x).sum(-1)
    # start: the plain min/max fit
    best_s = np.where(flat, 0.0, span / 15.0)
    best_o = lo
    q0 = np.clip(np.rint((x - lo[:, None]) / span[:, None] * 15.0), 0, 15)
    best_e = (w * (best_s[:, None] * q0 + lo[:, None] - x) ** 2).sum(-1)
    for step in range(N_STEPS + 1):
        # inverse scales from (15 - 1) / span to (15 + 1.4) / span: shrinking the grid a little
        # lets the extremes clip while the bulk of the block is represented more finely
        iscale = (15.0 - 1.0 + 0.15 * step) / span
        q = np.clip(np.rint((x - lo[:, None]) * iscale[:, None]), 0, 15)
        swq, swqq, swqx = (w * q).sum(-1), (w * q * q).sum(-1), (w * q * x).sum(-1)
        det = sw * swqq - swq * swq
        ok = det > 0
        det = np.where(ok, det, 1.0)
        s = (sw * swqx - swq * swx) / det
        o = (swqq * swx - swq * swqx) / det
        # the format needs o <= 0: refit the scale alone with o = 0 where the fit says o > 0
        pos = o > 0
        s = np.where(pos, np.where(swqq > 0, swqx / np.where(swqq > 0, swqq, 1.0), 0.0), s)
        o = np.where(pos, 0.0, o)
        e = (w * (s[:, None] * q + o[:, None] - x) ** 2).sum(-1)
        better = ok & (s >= 0) & (e < best_e)
        best_s = np.where(better, s, best_s)
        best_o = np.where(better, o, best_o)
        best_e = np.where(better, e, best_e)
    return best_s, best_o


def _fit_weights(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """Per-element weights of the least-squares fit, [S, 32] like x (rows of sub-blocks)."""
    if importance is None:
        av = np.sqrt((x * x).mean(-1, keepdims=True))
        return av + np.abs(x)
    var = (x * x).mean(-1, keepdims=True)
    return importance * np.sqrt(var + x * x)


def _importance(weights, K: int) -> np.ndarray | None:
    if weights is None:
        return None
    imp = np.ascontiguousarray(np.asarray(weights, dtype=np.float64).reshape(-1))
    if imp.shape[0] != K or not np.all(np.isfinite(imp)) or np.any(imp < 0):
        raise InfengError(f"q4_k importance weights: need {K} finite non-negative values, got shape {list(np.shape(weights))}")
    return imp


def quantize_q4_k(x: np.ndarray, weights: np.ndarray | None = None, threads: int = 0) -> np.ndarray:
    """f32 [N][K] → uint8 [N][K/256*144] (GGUF Q4_K blocks). ``weights``: optional per-column
    importances [K] (non-negative; e.g. calibration's mean x² per input column). Runs in the C
    library (ifg_quantize_q4_k, ``threads`` = 0: all), byte for byte ``quantize_q4_k_ref``."""
    x = check_rows(x, "q4_k")
    N, K = x.shape
    imp = _importance(weights, K)
    out = np.empty((N, K // QK_K * BLOCK_BYTES), np.uint8)
    kern = kernels.active()
    ffi = kern.ffi
    kern.lib.ifg_quantize_q4_k(ffi.cast("uint8_t *", ffi.from_buffer(out)), ffi.cast("float *", ffi.from_buffer(x)),
                               ffi.NULL if imp is None else ffi.cast("double *", ffi.from_buffer(imp)), N, K, threads)
    return out


def quantize_q4_k_ref(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The numpy reference of ``quantize_q4_k`` (the algorithm in the module docstring)."""
    x = check_rows(x, "q4_k")
    N, K = x.shape
    imp = _importance(weights, K)
    nsb = K // QK_K
    out = np.empty((N, nsb, BLOCK_BYTES), np.uint8)
    rows = max(1, CHUNK_ROWS_WEIGHTS // K)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        out[r0:r1] = _quantize_rows(x[r0:r1], imp)
    return out.reshape(N, nsb * BLOCK_BYTES)


def _quantize_rows(x: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
    n, K = x.shape
    nsb = K // QK_K
    xs = x.astype(np.float64).reshape(n * nsb * 8, SUB)                  # sub-blocks
    iw = None if imp is None else np.broadcast_to(imp.reshape(nsb * 8, SUB)[None], (n, nsb * 8, SUB)).reshape(-1, SUB)
    w = _fit_weights(xs, iw)
    scale, offset = _fit_sub_blocks(xs, w)
    scale = scale.reshape(n, nsb, 8)
    mins = (-offset).reshape(n, nsb, 8)                                  # >= 0
    # 6-bit scales and mins against the super-block maxima (fp16 d, dmin as stored)
    d = (scale.max(-1) / 63.0).astype(np.float16)
    dmin = (mins.max(-1) / 63.0).astype(np.float16)
    df, dmf = d.astype(np.float64), dmin.astype(np.float64)
    sc = np.where(df[..., None] > 0, np.rint(scale / np.where(df > 0, df, 1.0)[..., None]), 0).clip(0, 63).astype(np.uint8)
    mq = np.where(dmf[..., None] > 0, np.rint(mins / np.where(dmf > 0, dmf, 1.0)[..., None]), 0).clip(0, 63).astype(np.uint8)
    # levels with the stored (quantized) scale and min
    step = df[..., None] * sc                                             # [n, nsb, 8]
    base = dmf[..., None] * mq
    xb = x.astype(np.float64).reshape(n, nsb, 8, SUB)
    inv = np.where(step > 0, 1.0 / np.where(step > 0, step, 1.0), 0.0)
    q = np.clip(np.rint((xb + base[..., None]) * inv[..., None]), 0, 15).astype(np.uint8)
    out = np.empty((n, nsb, BLOCK_BYTES), np.uint8)
    out[..., 0:2] = d[..., None].view(np.uint8)
    out[..., 2:4] = dmin[..., None].view(np.uint8)
    out[..., 4:16] = pack_scales(sc, mq)
    qc = q.reshape(n, nsb, 4, 2, SUB)                                    # chunk c: sub-blocks 2c, 2c+1
    out[..., 16:] = (qc[:, :, :, 0] | (qc[:, :, :, 1] << 4)).reshape(n, nsb, 128)
    return out


def pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """[..., 8] 6-bit scales and mins → [..., 12] bytes (the layout in the module docstring)."""
    b = np.empty(sc.shape[:-1] + (12,), np.uint8)
    b[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    b[..., 4:8] = (m[..., 0:4] & 63) | ((m[..., 4:8] >> 4) << 6)
    b[..., 8:12] = (sc[..., 4:8] & 15) | ((m[..., 4:8] & 15) << 4)
    return b


def unpack_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., 12] bytes → (scales [..., 8], mins [..., 8]) as uint8."""
    sc = np.empty(b.shape[:-1] + (8,), np.uint8)
    m = np.empty_like(sc)
    sc[..., 0:4] = b[..., 0:4] & 63
    m[..., 0:4] = b[..., 4:8] & 63
    sc[..., 4:8] = (b[..., 8:12] & 15) | ((b[..., 0:4] >> 6) << 4)
    m[..., 4:8] = (b[..., 8:12] >> 4) | ((b[..., 4:8] >> 6) << 4)
    return sc, m


def decode_q4_k(raw: np.ndarray):
    """Fields of every block: d, dmin [N, nsb] (f32), sc, m [N, nsb, 8] (uint8),
    q [N, nsb, 8, 32] (uint8, element order)."""
    N = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(N, -1, BLOCK_BYTES)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc, m = unpack_scales(b[..., 4:16])
    nib = b[..., 16:].reshape(N, -1, 4, SUB)
    q = np.stack([nib & 15, nib >> 4], axis=3).reshape(N, -1, 8, SUB)
    return d, dmin, sc, m, q


def dequantize_q4_k(raw: np.ndarray) -> np.ndarray:
    """uint8 [N][K/256*144] → f32 [N][K]: ``(d * sc) * q - (dmin * m)`` in f32, the scale
    products rounded to f32 first (as the kernels form them)."""
    d, dmin, sc, m, q = decode_q4_k(raw)
    a = (d[..., None] * sc.astype(np.float32)).astype(np.float32)
    b = (dmin[..., None] * m.astype(np.float32)).astype(np.float32)
    v = a[..., None] * q.astype(np.float32) - b[..., None]
    return v.astype(np.float32).reshape(raw.shape[0], -1)
