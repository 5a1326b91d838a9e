"""GGML types the native format has no dtype for, recoded when a GGUF is read into the nearest
native type (each function: uint8 blocks of one [N][K] tensor → the target type's
[N][K/block*bytes] bytes; the GGUF reader gets ``RECODE`` from the loader).

- ``IQ4_NL`` → ``q8_0``, exactly: a 32-block is an fp16 ``d`` and 32 nibbles indexing a fixed
  non-linear codebook of int8 values (``IQ4_CODEBOOK``); value = d * codebook[nibble], which is a
  q8_0 block with the same d and q = codebook[nibble].
- ``Q3_K`` → ``q6_k``, exactly: value = d * (sc - 32) * (q - 4) with an fp16 d per 256, a 6-bit
  sc per 16 and 3-bit q; q6_k's value is d * sc' * (q' - 32) with an int8 sc' per 16 and 6-bit q',
  so sc' = sc - 32 and q' = q + 28 (the same f32 products, in the same order).
- ``IQ4_XS`` → ``q8_0``: value = d * (ls - 32) * codebook[nibble] with a 6-bit ls per 32; as q8_0,
  the block scale d * (ls - 32) is rounded to fp16 (relative error <= 2^-11, against a 4-bit
  step of ~2^-4 of the block's range) and q = codebook[nibble].
- ``Q2_K`` → ``q8_0``: value = d * (sc & 15) * q - dmin * (sc >> 4) per 16 weights, q in 0..3;
  no native type has per-16 scale and minimum, so the exact f32 values are re-quantized to
  q8_0 as ``infeng quantize`` does (error <= 1/254 of a 32-block's largest magnitude plus its
  scale's fp16 rounding, against a 2-bit step of ~1/3 of it).

The tests check each claim on files written by llama.cpp's quantizer (tests/test_gguf_recode.py).
"""
from __future__ import annotations

import numpy as np

from infeng import quant
from infeng.quant import q6_k

# ggml's kvalues_iq4nl: the 16 levels of IQ4_NL / IQ4_XS
IQ4_CODEBOOK = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def _nibbles16(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes → [..., 32] nibbles: element j the low nibble of byte j, j + 16 the high."""
    return np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1)


def iq4_nl_to_q8_0(raw: np.ndarray, N: int, K: int) -> np.ndarray:
    b = np.ascontiguousarray(raw, np.uint8).reshape(N, K // 32, 18)
    out = np.empty((N, K // 32, 34), np.uint8)
    out[..., 0:2] = b[..., 0:2]
    out[..., 2:] = IQ4_CODEBOOK[_nibbles16(b[..., 2:])].view(np.uint8)
    return out.reshape(N, -1)


def iq4_xs_to_q8_0(raw: np.ndarray, N: int, K: int) -> np.ndarray:
    b = np.ascontiguousarray(raw, np.uint8).reshape(N, K // 256, 136)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)                   # [N, nb]
    sh = b[..., 2:4].copy().view(np.uint16)[..., 0].astype(np.int32)
    ib = np.arange(8)
    sl = (b[..., 4 + ib // 2] >> (4 * (ib % 2)).astype(np.uint8)) & np.uint8(15)         # [N, nb, 8]
    ls = sl.astype(np.int32) | (((sh[..., None] >> (2 * ib)) & 3) << 4)
    out = np.empty((N, K // 256, 8, 34), np.uint8)
    out[..., 0:2] = (d[..., None] * (ls - 32).astype(np.float32)).astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:] = IQ4_CODEBOOK[_nibbles16(b[..., 8:].reshape(N, -1, 8, 16))].view(np.uint8)
    return out.reshape(N, -1)


def _k_levels(qs: np.ndarray) -> np.ndarray:
    """Q2_K / Q3_K's 2-bit fields: [..., 64] bytes → [..., 256] (element 128h + 32j + l is bits
    2j..2j+1 of byte 32h + l)."""
    q = qs.reshape(*qs.shape[:-1], 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]
    return (q & np.uint8(3)).reshape(*qs.shape[:-1], 256)


def q3_k_to_q6_k(raw: np.ndarray, N: int, K: int) -> np.ndarray:
    b = np.ascontiguousarray(raw, np.uint8).reshape(N * (K // 256), 110)
    hm, sb = b[:, 0:32], b[:, 96:108]
    s = np.arange(16)
    low = np.where(s < 8, sb[:, s % 8] & np.uint8(15), sb[:, s % 8] >> np.uint8(4))
    sc = (low | (((sb[:, 8 + s % 4] >> (2 * (s // 4)).astype(np.uint8)) & np.uint8(3)) << np.uint8(4))).astype(np.int16) - 32
    hbit = (hm[:, None, None, :] >> (4 * np.arange(2)[:, None] + np.arange(4)).astype(np.uint8)[..., None]) & np.uint8(1)
    q = _k_levels(b[:, 32:96]).astype(np.int16) - 4 * (1 - hbit.reshape(-1, 256).astype(np.int16))   # -4..3
    d16 = b[:, 108:110].copy().view(np.float16)[:, 0]
    return q6_k.pack((q + 32).astype(np.uint8), sc.astype(np.int8), d16).reshape(N, -1)


def q2_k_values(raw: np.ndarray, N: int, K: int) -> np.ndarray:
    """f32 [N][K], as ggml's dequantize_row_q2_K computes them."""
    b = np.ascontiguousarray(raw, np.uint8).reshape(N * (K // 256), 84)
    d = b[:, 80:82].copy().view(np.float16)[:, 0].astype(np.float32)[:, None]
    dmin = b[:, 82:84].copy().view(np.float16)[:, 0].astype(np.float32)[:, None]
    sc = b[:, 0:16]
    dl = np.repeat(d * (sc & np.uint8(15)).astype(np.float32), 16, axis=1)
    ml = np.repeat(dmin * (sc >> np.uint8(4)).astype(np.float32), 16, axis=1)
    return (dl * _k_levels(b[:, 16:80]).astype(np.float32) - ml).reshape(N, K)


def q2_k_to_q8_0(raw: np.ndarray, N: int, K: int) -> np.ndarray:
    return quant.quantize_q8_0(q2_k_values(raw, N, K))


# GGML type → (native dtype, recode, exact?)
RECODE = {"IQ4_NL": ("q8_0", iq4_nl_to_q8_0, True), "Q3_K": ("q6_k", q3_k_to_q6_k, True),
          "IQ4_XS": ("q8_0", iq4_xs_to_q8_0, False), "Q2_K": ("q8_0", q2_k_to_q8_0, False)}
