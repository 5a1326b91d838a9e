"""q4_1 and q5_1: GGUF's affine 32-blocks (a scale and a minimum), numpy reference.

- ``q4_1``: 20 bytes per 32 weights: fp16 ``d``, fp16 ``m``, then 16 bytes of nibbles laid out
  as q4_0's (element ``j`` in the low nibble of byte ``j``, ``j + 16`` in the high nibble).
- ``q5_1``: 24 bytes: fp16 ``d``, fp16 ``m``, 4 bytes ``qh`` (little-endian uint32, bit ``j`` =
  bit 4 of element ``j``'s level), then 16 bytes of low nibbles as q4_1's.

Quantization is ggml's reference (``quantize_row_q4_1_ref``): per block ``min`` / ``max`` of the
f32 values, ``d = (max - min) / (2^b - 1)``, level ``q = trunc((x - min) * (1/d) + 0.5)`` (capped
at 15 for q4_1; q5_1's cannot pass 31), stored ``m = fp16(min)``. value = ``q * d + m`` in f32 with
the fp16 ``d`` and ``m``. The kernels use ``sum_k w_k x_k = d * sum_k q_k x_k + m * sum_k x_k``:
an integer dot product of the unsigned levels with int8 x plus x's block sum.
"""
from __future__ import annotations

import numpy as np

from infeng.quant import _blocks  # defined before quant/__init__ imports this module

BYTES = {"q4_1": 20, "q5_1": 24}
LEVELS = {"q4_1": 15, "q5_1": 31}


def _quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    b = _blocks(x)
    N, nb, _ = b.shape
    lo, hi = b.min(-1), b.max(-1)
    d = ((hi - lo) / np.float32(LEVELS[qtype])).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), np.float32(0)).astype(np.float32)
    v = ((b - lo[..., None]) * inv[..., None] + np.float32(0.5)).astype(np.float32)
    q = np.minimum(np.float32(LEVELS[qtype]), np.trunc(v)).astype(np.uint32)
    out = np.empty((N, nb, BYTES[qtype]), np.uint8)
    out[..., 0:2] = d.astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:4] = lo.astype(np.float16)[..., None].view(np.uint8)
    if qtype == "q5_1":
        qh = ((q >> 4) << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)
        out[..., 4:8] = qh.astype("<u4")[..., None].view(np.uint8)
    low = (q & 0x0F).astype(np.uint8)
    out[..., BYTES[qtype] - 16:] = low[..., :16] | (low[..., 16:] << 4)
    return out.reshape(N, nb * BYTES[qtype])


def levels(raw: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [N][nb*bytes] → (d f32 [N, nb], m f32 [N, nb], q uint8 [N, nb, 32])."""
    N = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(N, -1, BYTES[qtype])
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
    m = b[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
    nib = b[..., BYTES[qtype] - 16:]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1)
    if qtype == "q5_1":
        qh = b[..., 4:8].copy().view("<u4")
        q = q | (((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4)
    return d, m, q


def _dequantize(raw: np.ndarray, qtype: str) -> np.ndarray:
    d, m, q = levels(raw, qtype)
    return (q.astype(np.float32) * d[..., None] + m[..., None]).reshape(raw.shape[0], -1)


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    """f32 [N][K] → uint8 [N][K/32*20] (GGUF Q4_1 blocks)."""
    return _quantize(x, "q4_1")


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    """f32 [N][K] → uint8 [N][K/32*24] (GGUF Q5_1 blocks)."""
    return _quantize(x, "q5_1")


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    return _dequantize(raw, "q4_1")


def dequantize_q5_1(raw: np.ndarray) -> np.ndarray:
    return _dequantize(raw, "q5_1")
