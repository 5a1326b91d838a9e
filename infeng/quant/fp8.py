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

Status: an option, not a default. Measured against q8_0 at the same 8.5 bits per weight, fp8's
mean KLD to the f32 model is ~12x higher on stories260K (0.0081 vs 0.00068) and ~17x on the
random-weight TinyLlama shape (2.0e-5 vs 1.1e-6), and its kernels are not faster (E4M3 keeps 3
mantissa bits where int8 with a per-block scale keeps ~7 for the block's large values).
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


def encode_e4m3(v: np.ndarray) -> np.ndarray:
    """Nearest E4M3 code of each value (ties to even code), saturated at ±448; uint8.

    With the value's binade ``2^e`` (e >= -6; below that the subnormal spacing 2^-9 applies)
    the E4M3 grid spacing is ``2^(e-3)``: ``rint(a / 2^(e-3))`` is exact and rounds ties to
    even, and an even multiple is an even code. The code is then read off the rounded value
    (which may have moved up a binade)."""
    a = np.minimum(np.abs(np.asarray(v, dtype=np.float32)), np.float32(FP8_MAX))
    _, ex = np.frexp(a)                                   # a = f * 2^ex, f in [0.5, 1)
    e = np.maximum(ex.astype(np.int32) - 1, -6)
    step = np.ldexp(np.float32(1), e - 3).astype(np.float32)
    r = np.rint(a / step) * step                          # exact: step is a power of two
    _, rex = np.frexp(r)
    re = rex.astype(np.int32) - 1
    normal = r >= np.float32(2.0 ** -6)
    man = np.where(normal, np.ldexp(r, -re) * 8 - 8, 0).astype(np.int32)      # 0..7
    code = np.where(normal, ((re + 7) << 3) | man, np.rint(r * np.float32(2.0 ** 9)).astype(np.int32))
    sign = np.signbit(np.asarray(v, dtype=np.float32)) & (code != 0)
    return (code | np.where(sign, 0x80, 0)).astype(np.uint8)


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
