"""``fp8``: OCP FP8 E4M3 ("e4m3fn") values with one scale per 32-weight block.

Block layout (34 bytes = 8.5 bits per weight, the size of a q8_0 block), little-endian:

- bytes 0..1: the scale ``d`` as bf16 (bf16 rather than fp16: its 8-bit exponent keeps
  ``max|w| / 448`` normal for any weight magnitude; the scale's own precision does not matter
  because the values are rounded against the stored scale);
- bytes 2..33: 32 E4M3 codes, element j in byte 2 + j. E4M3: sign bit, 4 exponent bits
  (bias 7), 3 mantissa bits; exponent 0 is subnormal (``m * 2^-9``); no infinities, 0x7F/0xFF
  are NaN and never written; the largest finite value is 448 (0x7E).

Value of element j: ``d * e4m3(code_j)``. Quantization: ``d = bf16(max|w| / 448)``, each
``w / d`` (in f32) rounded to the nearest E4M3 value, ties to even (the even code), saturated at
±448.
"""
from __future__ import annotations

import numpy as np

from infeng.errors import InfengError

QK = 32
BLOCK_BYTES = 34
FP8_MAX = 448.0


def e4m3_values() -> np.ndarray:
    """f64 value of each code 0..255 (NaN for 0x7F, 0xFF)."""
    c = np.arange(256)
    e, m, s = (c >> 3) & 15, c & 7, np.where(c & 0x80, -1.0, 1.0)
    v = np.where(e == 0, m * 2.0 ** -9, (1 + m / 8.0) * 2.0 ** (e - 7.0)) * s
    v[[0x7F, 0xFF]] = np.nan
    return v


_POS = e4m3_values()[:0x7F]            # the 127 non-negative finite values, increasing with the code


def encode_e4m3(v: np.ndarray) -> np.ndarray:
    """Nearest E4M3 code of each value (ties to even code), saturated at ±448; uint8."""
    v = np.asarray(v, dtype=np.float64)
    a = np.minimum(np.abs(v), FP8_MAX)
    hi = np.searchsorted(_POS, a, side="left").clip(1, len(_POS) - 1)   # first value >= a
    lo = hi - 1
    dl, dh = a - _POS[lo], _POS[hi] - a
    pick_hi = (dh < dl) | ((dh == dl) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo)
    code = np.where(a == 0, 0, code)
    return (code | np.where(np.signbit(v) & (code != 0), 0x80, 0)).astype(np.uint8)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    """f32 → bf16 bits (round to nearest even); x finite."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def quantize_fp8(x: np.ndarray) -> np.ndarray:
    """f32 [N][K] → uint8 [N][K/32*34]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK:
        raise InfengError(f"cannot quantize shape {list(x.shape)} to fp8: rows must be a multiple of {QK}")
    N = x.shape[0]
    b = x.reshape(N, -1, QK)
    dbits = _bf16_round((np.abs(b).max(-1) / np.float32(FP8_MAX)).astype(np.float32))
    d = (dbits.astype(np.uint32) << 16).view(np.float32)
    safe = np.where(d != 0, d, np.float32(1))
    codes = encode_e4m3((b / safe[..., None]).astype(np.float32))
    out = np.empty(b.shape[:2] + (BLOCK_BYTES,), np.uint8)
    out[..., 0:2] = dbits[..., None].view(np.uint8)
    out[..., 2:] = codes
    return out.reshape(N, -1)


_VAL32 = np.nan_to_num(e4m3_values()).astype(np.float32)


def dequantize_fp8(raw: np.ndarray) -> np.ndarray:
    N = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(N, -1, BLOCK_BYTES)
    d = (b[..., 0:2].copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)   # [N, nb, 1]
    return (_VAL32[b[..., 2:]] * d).astype(np.float32).reshape(N, -1)
