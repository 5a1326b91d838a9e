"""Quantized weight formats: numpy pack/unpack reference (the C kernels are checked against it).

q8_0, q4_0, q5_0, q4_1, q5_1 and q4_k are byte-compatible with GGUF, so GGUF interop is a copy of the blocks
(q4_k: 256-weight super-blocks, see ``infeng.quant.q4_k``; fp8: E4M3 with a bf16 scale per
32-block, ``infeng.quant.fp8``, not a GGUF type):

- ``q8_0``: blocks of 32 weights → 34 bytes: fp16 scale ``d = max|x| / 127`` then 32 int8
  ``q = round(x / d)`` (ties away from zero, as ggml's roundf); value = ``q * d``.
- ``q4_0``: blocks of 32 weights → 18 bytes: fp16 scale ``d = m / -8`` where ``m`` is the
  element of largest magnitude (with its sign, as ggml), then 16 bytes of nibbles: element ``j``
  in the low nibble of byte ``j`` and element ``j + 16`` in the high nibble, each
  ``q = min(15, trunc(x / d + 8.5))``; value = ``(q - 8) * d``.
- ``q5_0``: blocks of 32 weights → 22 bytes: fp16 scale ``d = m / -16`` (``m`` as for q4_0), then
  4 bytes ``qh`` (a little-endian uint32 whose bit ``j`` is bit 4 of element ``j``'s ``q``), then
  16 bytes of low nibbles laid out as q4_0's (element ``j`` low, ``j + 16`` high, of byte ``j``),
  ``q = min(31, trunc(x / d + 16.5))`` (x / d >= -16, so trunc rounds to nearest, halves up);
  value = ``(q - 16) * d``. 5.5 bits/weight: what llama.cpp's Q4_K_M stores where rows are not a
  multiple of 256, so q4_k falls back to it (``infeng.quant.policy``).
- ``q4_1`` / ``q5_1``: 20 / 24-byte 32-blocks with a scale and a minimum (``infeng.quant.affine``).
- ``q6_k``: 210-byte 256-super-blocks, 6-bit levels with an int8 scale per 16 (``infeng.quant.q6_k``).

A [N][K] matrix is stored row-major as uint8 [N][K/32 * bytes_per_block]; the manifest records
the logical shape [N, K] (see ``infeng.format.BLOCKS``). K must be a multiple of the block (32;
256 for q4_k): rows that are not fall back to another type (``infeng.quant.policy``).
"""
from __future__ import annotations

import numpy as np

from infeng.errors import InfengError
from infeng.format import BLOCKS, schema

QK = 32
QTYPES = tuple(BLOCKS)  # ("q8_0", "q4_0", "q5_0", "q4_k", "fp8", "q4_1", "q5_1", "q6_k")


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK:
        raise InfengError(f"cannot quantize shape {list(x.shape)}: rows must be a multiple of {QK}")
    return x.reshape(x.shape[0], x.shape[1] // QK, QK)


def _round_away(v: np.ndarray) -> np.ndarray:
    """C roundf: halves away from zero. (floor(|v| + 0.5) is not: 0.49999997 + 0.5 rounds to 1.)"""
    t = np.trunc(v)
    return t + np.sign(v) * (np.abs(v - t) >= np.float32(0.5))


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """f32 [N][K] → uint8 [N][K/32*34] (GGUF Q8_0 blocks)."""
    b = _blocks(x)
    N, nb, _ = b.shape
    amax = np.abs(b).max(-1)
    d = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), np.float32(0)).astype(np.float32)
    q = _round_away(b * inv[..., None]).astype(np.int8)
    out = np.empty((N, nb, 34), np.uint8)
    out[..., :2] = d.astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(N, nb * 34)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    N = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(N, -1, 34)
    d = b[..., :2].copy().view(np.float16).astype(np.float32)      # [N, nb, 1]
    q = b[..., 2:].view(np.int8).astype(np.float32)
    return (q * d).reshape(N, -1)


def _scale_max_signed(b: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """(d, 1/d) per block of b [N, nb, 32]: d = (element of largest magnitude, with its sign;
    the first one, as ggml's loop) / -levels, so that element lands exactly on level 0."""
    idx = np.abs(b).argmax(-1)
    m = np.take_along_axis(b, idx[..., None], -1)[..., 0]
    d = (m / np.float32(-levels)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), np.float32(0)).astype(np.float32)
    return d, inv


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """f32 [N][K] → uint8 [N][K/32*18] (GGUF Q4_0 blocks), as ggml's quantize_row_q4_0_ref."""
    b = _blocks(x)
    N, nb, _ = b.shape
    d, inv = _scale_max_signed(b, 8)
    v = (b * inv[..., None] + np.float32(8.5)).astype(np.float32)
    q = np.minimum(np.float32(15), np.trunc(v)).astype(np.uint8)   # v >= 0.5 always: trunc == (int8)
    out = np.empty((N, nb, 18), np.uint8)
    out[..., :2] = d.astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:] = q[..., :16] | (q[..., 16:] << 4)
    return out.reshape(N, nb * 18)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    N = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(N, -1, 18)
    d = b[..., :2].copy().view(np.float16).astype(np.float32)
    nib = b[..., 2:]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.float32) - np.float32(8)
    return (q * d).reshape(N, -1)


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    """f32 [N][K] → uint8 [N][K/32*22] (GGUF Q5_0 blocks)."""
    b = _blocks(x)
    N, nb, _ = b.shape
    d, inv = _scale_max_signed(b, 16)
    v = (b * inv[..., None] + np.float32(16.5)).astype(np.float32)
    q = np.minimum(np.float32(31), np.trunc(v)).astype(np.uint32)  # v >= 0.5: trunc == (int8)
    qh = ((q >> 4) << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)   # bit j: q_j >= 16
    lo = (q & 0x0F).astype(np.uint8)
    out = np.empty((N, nb, 22), np.uint8)
    out[..., :2] = d.astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:6] = qh.astype("<u4")[..., None].view(np.uint8)
    out[..., 6:] = lo[..., :16] | (lo[..., 16:] << 4)
    return out.reshape(N, nb * 22)


def q5_0_levels(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N][nb*22] → (d f32 [N, nb], q uint8 [N, nb, 32] in 0..31)."""
    N = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(N, -1, 22)
    d = b[..., :2].copy().view(np.float16).astype(np.float32)[..., 0]
    qh = b[..., 2:6].copy().view("<u4")                                # [N, nb, 1]
    hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
    nib = b[..., 6:]
    return d, np.concatenate([nib & 0x0F, nib >> 4], axis=-1) | hi


def dequantize_q5_0(raw: np.ndarray) -> np.ndarray:
    d, q = q5_0_levels(raw)
    return ((q.astype(np.float32) - np.float32(16)) * d[..., None]).reshape(raw.shape[0], -1)


from infeng.quant.q4_k import dequantize_q4_k, quantize_q4_k  # noqa: E402
from infeng.quant.fp8 import dequantize_fp8, quantize_fp8  # noqa: E402
from infeng.quant.affine import dequantize_q4_1, dequantize_q5_1, quantize_q4_1, quantize_q5_1  # noqa: E402
from infeng.quant.q6_k import dequantize_q6_k, quantize_q6_k  # noqa: E402

QUANTIZE = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0, "q5_0": quantize_q5_0, "q4_k": quantize_q4_k, "fp8": quantize_fp8,
            "q4_1": quantize_q4_1, "q5_1": quantize_q5_1, "q6_k": quantize_q6_k}
DEQUANTIZE = {"q8_0": dequantize_q8_0, "q4_0": dequantize_q4_0, "q5_0": dequantize_q5_0, "q4_k": dequantize_q4_k, "fp8": dequantize_fp8,
              "q4_1": dequantize_q4_1, "q5_1": dequantize_q5_1, "q6_k": dequantize_q6_k}
# Types whose kernels round the activations to int8 per 32-block (quantize_activations) before
# integer dot products; fp8 multiplies f32 activations by the decoded weights.
INT8_ACTIVATIONS = ("q8_0", "q4_0", "q5_0", "q4_k", "q4_1", "q5_1", "q6_k")
# Types whose quantizer accepts per-column importance weights (calibration).
WEIGHTED = ("q4_k",)


def quantize(x: np.ndarray, qtype: str, weights: np.ndarray | None = None) -> np.ndarray:
    if weights is not None and qtype in WEIGHTED:
        return QUANTIZE[qtype](x, weights=weights)
    return QUANTIZE[qtype](x)


def dequantize(raw: np.ndarray, qtype: str) -> np.ndarray:
    return DEQUANTIZE[qtype](raw)


def to_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array of any stored dtype → f32 (quantized ones through the numpy dequantizer)."""
    return dequantize(arr, dtype) if dtype in QTYPES else schema.to_f32(arr, dtype)


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the C GEMV/GEMM do to x before the integer dot products: per row and 32-block,
    f32 scale ``d = max|x| / 127`` and int8 ``q = round(x / d)`` (x * (1/d), ties away from
    zero). Returns (q int8 [T][K], d f32 [T][K/32])."""
    b = _blocks(x)
    amax = np.abs(b).max(-1)
    d = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), np.float32(0)).astype(np.float32)
    q = _round_away(b * inv[..., None]).astype(np.int8)
    return q.reshape(x.shape), d
