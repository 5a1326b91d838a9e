"""GGML tensor types: block geometry of every type a GGUF file may name, and numpy dequantizers of
Q4_K / Q6_K written from ggml's block layout (an independent check of infeng.quant's q4_k / q6_k,
which the reader now copies; and the way in for types the native format has no dtype for).

Block layouts (ggml-common.h), 256 weights per super-block ("QK_K"):

- ``Q4_K`` (144 bytes): f16 ``d``, f16 ``dmin``, 12 bytes of 6-bit scales and mins for the 8
  sub-blocks of 32, then 128 bytes of nibbles. Sub-block pairs (2i, 2i+1) share 32 bytes: the
  low nibbles are sub-block 2i, the high nibbles 2i+1. value = d * sc * q - dmin * m.
- ``Q6_K`` (210 bytes): 128 bytes of low nibbles ``ql``, 64 bytes of high 2-bit pairs ``qh``,
  16 int8 scales (one per 16 weights), f16 ``d``. Each half of 128 weights uses 64 ``ql`` bytes
  and 32 ``qh`` bytes; value = d * scale * (q - 32), q in 0..63.
"""
from __future__ import annotations

import numpy as np

from infeng.errors import InfengError

QK_K = 256

# ggml type id → (name, weights per block, bytes per block). Every id ggml has assigned, so a
# file with a type this engine cannot convert is told apart from a corrupt one.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}
BY_NAME = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}

# GGML types whose bytes are exactly a native dtype's storage: a copy.
NATIVE_COPY = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q5_0": "q5_0",
               "Q4_1": "q4_1", "Q5_1": "q5_1", "Q4_K": "q4_k", "Q6_K": "q6_k"}


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 → [...] f32 (little-endian f16)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def dequantize_q4_k(raw: np.ndarray, n: int) -> np.ndarray:
    """uint8 blocks of ``n`` weights (n a multiple of 256) → f32 [n]."""
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n // QK_K, 144)
    d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    s = b[:, 4:16].astype(np.uint8)
    # 6-bit scale/min of sub-block j (get_scale_min_k4): j < 4 in the low 6 bits of bytes j / j+4;
    # j >= 4 splits into a nibble of byte j+4 plus the top 2 bits of bytes j-4 / j.
    sc = np.empty((b.shape[0], 8), np.float32)
    mn = np.empty((b.shape[0], 8), np.float32)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    qs = b[:, 16:].reshape(-1, 4, 32)                               # 4 pairs of sub-blocks
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    y = (d * sc)[..., None] * q - (dmin * mn)[..., None]
    return y.reshape(n).astype(np.float32)


def dequantize_q6_k(raw: np.ndarray, n: int) -> np.ndarray:
    """uint8 blocks of ``n`` weights (n a multiple of 256) → f32 [n]."""
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n // QK_K, 210)
    ql = b[:, 0:128].reshape(-1, 2, 64)                             # per half of 128 weights
    qh = b[:, 128:192].reshape(-1, 2, 32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32).reshape(-1, 2, 8)
    d = _f16(b[:, 208:210])[:, None, None]
    lo = np.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=2)
    hi = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
    q = (lo | (hi << 4)).astype(np.float32) - 32                    # [blocks, half, quarter, 32]
    scale = sc.reshape(-1, 2, 4, 2)                                 # one scale per 16 weights
    y = d[..., None] * np.repeat(scale, 16, axis=-1) * q
    return y.reshape(n).astype(np.float32)


DEQUANTIZE = {"Q4_K": dequantize_q4_k, "Q6_K": dequantize_q6_k}


def dequantize(type_name: str, raw: np.ndarray, n: int) -> np.ndarray:
    if type_name not in DEQUANTIZE:
        raise InfengError(f"GGML type {type_name} cannot be converted (supported: "
                          f"{', '.join(dict.fromkeys(list(NATIVE_COPY) + list(DEQUANTIZE)))})")
    return DEQUANTIZE[type_name](raw, n)
