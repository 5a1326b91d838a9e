"""Row-interleaved copies of q8_0 / q4_0 / q4_k / q4_1 / q5_1 / q6_k / q5_k matrices for the C kernels (dtypes
``q8_0x16`` / ``q4_0x16`` / ``q4_kx16`` / ``q4_1x16`` / ``q5_1x16`` / ``q6_kx16`` / ``q5_kx16``; the byte layouts are
documented in kernels_c/quant.h, quant_k.h and quant_gguf.h).

Native files store a matrix whose row count is a multiple of 16 in these layouts (``layout_id``
names one in the file; infeng.model.stored); GGUF import/export goes through ``deinterleave``, and a
row-major matrix (an older file, a GGUF or HF source) is repacked when the C model is built. A group
of 16 rows keeps, per 32-block of k, the 16 fp16 scales then the weights as 64-byte vectors of
16 rows × 4 consecutive k (q8_0: ``w + 128`` as unsigned bytes; q4_0: the nibbles, low = k
``8v + j``, high = k ``8v + 4 + j``), so one vpdpbusd against x's 4 int8 broadcast advances 16 rows. q4_k keeps per super-block the
16 rows' d, dmin and 6-bit sub-block scales and mins (rearranged so that 16 bytes give one
sub-block's 16 scales), then each sub-block's nibbles as q4_0x16 lays out a block's. q4_1 keeps
per 32-block the 16 rows' d, then their m, then the nibbles as q4_0x16. q6_k keeps per super-block
the 16 rows' d and int8 sub-block scales, the low 4 bits of the levels as q4_0x16's nibbles and
their high 2 bits in 2-bit fields; q5_k is q4_k's layout of the low 4 bits plus a plane of 5th bits,
and q5_1 is q4_1's plus such a plane.
"""
from __future__ import annotations

import zlib

import numpy as np

from infeng.errors import InfengError
from infeng.kernels.abi import DTYPE
from infeng.quant import q6_k
from infeng.quant.q4_k import pack_scales, unpack_scales

GROUP = 16
INTERLEAVED = {"q8_0": "q8_0x16", "q4_0": "q4_0x16", "q4_k": "q4_kx16", "q4_1": "q4_1x16",
               "q5_1": "q5_1x16", "q6_k": "q6_kx16", "q5_k": "q5_kx16"}
PLAIN = {v: k for k, v in INTERLEAVED.items()}
_BLOCK = {"q8_0": 34, "q4_0": 18, "q4_k": 144, "q4_1": 20, "q5_1": 24, "q6_k": 210, "q5_k": 176}
_ELEMS = {"q8_0": 32, "q4_0": 32, "q4_k": 256, "q4_1": 32, "q5_1": 32, "q6_k": 256, "q5_k": 256}
_SCALES = {"q8_0": 1, "q4_0": 1, "q4_1": 2}   # fp16 values before the levels: d (q4_1: d, m)


def can_interleave(qtype: str, rows: int) -> bool:
    return qtype in INTERLEAVED and rows % GROUP == 0


def interleave(raw: np.ndarray, qtype: str) -> np.ndarray:
    """uint8 [N][K/32*bytes] GGUF-order blocks → uint8 [N/16][K/32 * 16*bytes] interleaved."""
    N = raw.shape[0]
    bb = _BLOCK.get(qtype)
    if bb is None or raw.ndim != 2 or N % GROUP or raw.shape[1] % bb:
        raise InfengError(f"cannot interleave a {qtype} matrix of stored shape {list(raw.shape)}")
    nb, G = raw.shape[1] // bb, N // GROUP
    b = raw.reshape(G, GROUP, nb, bb)
    if qtype in _OWN:
        return _OWN[qtype][0](b).reshape(G, nb * GROUP * bb)
    out = np.empty((G, nb, GROUP * bb), np.uint8)
    hb = 2 * _SCALES[qtype]                                                     # header bytes per row
    for h in range(_SCALES[qtype]):
        out[..., 2 * GROUP * h:2 * GROUP * (h + 1)] = b[..., 2 * h:2 * h + 2].transpose(0, 2, 1, 3).reshape(G, nb, 2 * GROUP)
    if qtype == "q8_0":
        q = b[..., 2:].reshape(G, GROUP, nb, 8, 4).transpose(0, 2, 3, 1, 4)     # [G, nb, c, r, 4]
        np.bitwise_xor(q.reshape(G, nb, 512), np.uint8(0x80), out=out[..., 2 * GROUP:])
    else:
        nib = b[..., hb:]
        lo, hi = nib & np.uint8(0x0F), nib >> np.uint8(4)                        # k = j, k = 16 + j
        q = np.concatenate([lo, hi], axis=-1).reshape(G, GROUP, nb, 4, 2, 4)    # k = 8v + 4h + j
        q = q.transpose(0, 2, 3, 1, 5, 4)                                       # [G, nb, v, r, j, h]
        out[..., hb * GROUP:] = (q[..., 0] | (q[..., 1] << np.uint8(4))).reshape(G, nb, 256)
    return out.reshape(G, nb * GROUP * bb)


def _interleave_q4_k(b: np.ndarray) -> np.ndarray:
    """[G, 16, nb, 144] GGUF blocks → [G, nb, 2304] (layout in kernels_c/quant_k.h)."""
    G, _, nb, _ = b.shape
    out = np.empty((G, nb, GROUP * 144), np.uint8)
    out[..., 0:32] = b[..., 0:2].transpose(0, 2, 1, 3).reshape(G, nb, 32)
    out[..., 32:64] = b[..., 2:4].transpose(0, 2, 1, 3).reshape(G, nb, 32)
    sc, m = unpack_scales(b[..., 4:16])
    sc, m = sc.transpose(0, 2, 3, 1), m.transpose(0, 2, 3, 1)                   # [G, nb, s, r]
    out[..., 64:192] = ((sc & 15) | ((m & 15) << 4)).reshape(G, nb, 128)
    hi = (sc >> 4) | ((m >> 4) << 2)
    out[..., 192:256] = (hi[:, :, 0::2] | (hi[:, :, 1::2] << 4)).reshape(G, nb, 64)
    nib = b[..., 16:].reshape(G, GROUP, nb, 4, 1, 32)                            # chunk c: sub-blocks 2c, 2c+1
    q = np.concatenate([nib & np.uint8(15), nib >> np.uint8(4)], axis=4)       # [G, r, nb, c, h, l]
    q = q.reshape(G, GROUP, nb, 8, 4, 2, 4).transpose(0, 2, 3, 4, 1, 6, 5)     # [G, nb, s, v, r, j, h]
    out[..., 256:] = (q[..., 0] | (q[..., 1] << np.uint8(4))).reshape(G, nb, 2048)
    return out


def _deinterleave_q4_k(p: np.ndarray) -> np.ndarray:
    """[G, nb, 2304] → [G, 16, nb, 144] (inverse of ``_interleave_q4_k``)."""
    G, nb, _ = p.shape
    out = np.empty((G, GROUP, nb, 144), np.uint8)
    out[..., 0:2] = p[..., 0:32].reshape(G, nb, GROUP, 2).transpose(0, 2, 1, 3)
    out[..., 2:4] = p[..., 32:64].reshape(G, nb, GROUP, 2).transpose(0, 2, 1, 3)
    lo = p[..., 64:192].reshape(G, nb, 8, GROUP)
    hb = p[..., 192:256].reshape(G, nb, 4, 1, GROUP)
    hi = np.concatenate([hb & np.uint8(15), hb >> np.uint8(4)], axis=3).reshape(G, nb, 8, GROUP)
    sc = (lo & np.uint8(15)) | ((hi & np.uint8(3)) << np.uint8(4))
    m = (lo >> np.uint8(4)) | ((hi & np.uint8(12)) << np.uint8(2))
    out[..., 4:16] = pack_scales(sc.transpose(0, 3, 1, 2), m.transpose(0, 3, 1, 2))
    by = p[..., 256:].reshape(G, nb, 8, 4, GROUP, 4)                            # [G, nb, s, v, r, j]
    q = np.stack([by & np.uint8(15), by >> np.uint8(4)], axis=-2)              # [G, nb, s, v, r, h, j]
    q = q.transpose(0, 4, 1, 2, 3, 5, 6).reshape(G, GROUP, nb, 4, 2, 32)         # [G, r, nb, c, h, l]
    out[..., 16:] = (q[..., 0, :] | (q[..., 1, :] << np.uint8(4))).reshape(G, GROUP, nb, 128)
    return out


def _interleave_q6_k(b: np.ndarray) -> np.ndarray:
    """[G, 16, nb, 210] GGUF blocks → [G, nb, 3360] (layout in kernels_c/quant_gguf.h)."""
    G, _, nb, _ = b.shape
    out = np.empty((G, nb, GROUP * 210), np.uint8)
    out[..., 0:32] = b[..., 208:210].transpose(0, 2, 1, 3).reshape(G, nb, 32)
    out[..., 32:288] = b[..., 192:208].transpose(0, 2, 3, 1).reshape(G, nb, 256)            # [s, r]
    _, _, q = q6_k.levels(b.reshape(G * GROUP, nb * 210))
    q = q.reshape(G, GROUP, nb, 8, 4, 2, 4).transpose(0, 2, 3, 4, 1, 6, 5)                 # [G, nb, c, v, r, j, h]
    lo = q & np.uint8(15)
    out[..., 288:2336] = (lo[..., 0] | (lo[..., 1] << np.uint8(4))).reshape(G, nb, 2048)
    hi = (q >> np.uint8(4)) << (2 * np.arange(4, dtype=np.uint8))[:, None, None, None]     # field 2v
    out[..., 2336:] = np.bitwise_or.reduce(hi, axis=3).transpose(0, 1, 2, 5, 3, 4).reshape(G, nb, 1024)  # [c, m, r, j]
    return out


def _deinterleave_q6_k(p: np.ndarray) -> np.ndarray:
    """[G, nb, 3360] → [G, 16, nb, 210] (inverse of ``_interleave_q6_k``)."""
    G, nb, _ = p.shape
    out = np.empty((G, GROUP, nb, 210), np.uint8)
    out[..., 208:210] = p[..., 0:32].reshape(G, nb, GROUP, 2).transpose(0, 2, 1, 3)
    out[..., 192:208] = p[..., 32:288].reshape(G, nb, 16, GROUP).transpose(0, 3, 1, 2)
    by = p[..., 288:2336].reshape(G, nb, 8, 4, GROUP, 4)                                   # [c, v, r, j]
    lo = np.stack([by & np.uint8(15), by >> np.uint8(4)], axis=-1)                         # [c, v, r, j, h]
    hb = p[..., 2336:].reshape(G, nb, 8, 1, 2, GROUP, 4)                                   # [c, 1, m, r, j]
    hi = (hb >> (2 * np.arange(4, dtype=np.uint8))[:, None, None, None]) & np.uint8(3)     # [c, v, m, r, j]
    q = lo | (hi.transpose(0, 1, 2, 3, 5, 6, 4) << np.uint8(4))                            # [c, v, r, j, h]
    L = q.transpose(0, 4, 1, 2, 3, 6, 5).reshape(G, GROUP, nb, 2, 4, 32)                   # [r, nb, half, quarter, l]
    lq, hq = L & np.uint8(15), L >> np.uint8(4)
    out[..., 0:128] = np.concatenate([lq[..., 0, :] | (lq[..., 2, :] << 4), lq[..., 1, :] | (lq[..., 3, :] << 4)],
                                     axis=-1).reshape(G, GROUP, nb, 128)
    out[..., 128:192] = (hq[..., 0, :] | (hq[..., 1, :] << 2) | (hq[..., 2, :] << 4) | (hq[..., 3, :] << 6)
                         ).reshape(G, GROUP, nb, 64)
    return out


def _interleave_q5_k(b: np.ndarray) -> np.ndarray:
    """[G, 16, nb, 176] GGUF blocks → [G, nb, 2816]: q4_kx16's layout of d, dmin, the scales and
    the low 4 bits (q5_k's bytes 0..15 and 48..175 are a q4_k block's), then the 5th bits."""
    G, _, nb, _ = b.shape
    out = np.empty((G, nb, GROUP * 176), np.uint8)
    out[..., :2304] = _interleave_q4_k(np.concatenate([b[..., :16], b[..., 48:]], axis=-1))
    bit = (b[..., 16:48][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & np.uint8(1)   # [r, nb, s, k]
    bit = bit.reshape(G, GROUP, nb, 8, 8, 4).transpose(0, 2, 3, 1, 5, 4)                  # [nb, s, r, j, b], k = 4b + j
    out[..., 2304:] = (bit << np.arange(8, dtype=np.uint8)).sum(-1, dtype=np.uint8).reshape(G, nb, 512)
    return out


def _deinterleave_q5_k(p: np.ndarray) -> np.ndarray:
    """[G, nb, 2816] → [G, 16, nb, 176] (inverse of ``_interleave_q5_k``)."""
    G, nb, _ = p.shape
    out = np.empty((G, GROUP, nb, 176), np.uint8)
    q4 = _deinterleave_q4_k(p[..., :2304])
    out[..., :16], out[..., 48:] = q4[..., :16], q4[..., 16:]
    by = p[..., 2304:].reshape(G, nb, 8, GROUP, 4)                                         # [nb, s, r, j]
    bit = (by[..., None] >> np.arange(8, dtype=np.uint8)) & np.uint8(1)                    # [nb, s, r, j, b]
    bit = bit.transpose(0, 3, 1, 2, 5, 4).reshape(G, GROUP, nb, 8, 32)                      # [r, nb, s, k]
    out[..., 16:48] = (bit << np.arange(8, dtype=np.uint8)[:, None]).sum(-2, dtype=np.uint8)
    return out


def _bit_plane(qh: np.ndarray) -> np.ndarray:
    """[..., 16 rows, nb, 4] bytes of 5th bits (bit k of the little-endian 32 = element k) → [..., nb, 64]:
    row r, byte 4r + j, bit b = the bit of element 4b + j (the plane q5_kx16 keeps per sub-block)."""
    G, _, nb, _ = qh.shape
    bit = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & np.uint8(1)       # [r, nb, b', byte]
    bit = bit.transpose(0, 1, 2, 4, 3).reshape(G, GROUP, nb, 8, 4)                         # element k = 4b + j
    return (bit.transpose(0, 2, 1, 4, 3) << np.arange(8, dtype=np.uint8)).sum(-1, dtype=np.uint8).reshape(G, nb, 64)


def _unplane(p: np.ndarray) -> np.ndarray:
    """Inverse of ``_bit_plane``: [G, nb, 64] → [G, 16, nb, 4]."""
    G, nb, _ = p.shape
    by = p.reshape(G, nb, GROUP, 4)                                                        # [nb, r, j]
    bit = (by[..., None] >> np.arange(8, dtype=np.uint8)) & np.uint8(1)                    # [nb, r, j, b]
    bit = bit.transpose(0, 2, 1, 4, 3).reshape(G, GROUP, nb, 4, 8)                          # [r, nb, byte, bit]
    return (bit << np.arange(8, dtype=np.uint8)).sum(-1, dtype=np.uint8)


def _interleave_q5_1(b: np.ndarray) -> np.ndarray:
    """[G, 16, nb, 24] GGUF blocks (d, m, qh, nibbles) → [G, nb, 384]: q4_1x16's group-block of d, m
    and the nibbles, then the plane of 5th bits."""
    G, _, nb, _ = b.shape
    out = np.empty((G, nb, GROUP * 24), np.uint8)
    q41 = np.concatenate([b[..., :4], b[..., 8:]], axis=-1).reshape(G * GROUP, nb * 20)
    out[..., :320] = interleave(q41, "q4_1").reshape(G, nb, 320)
    out[..., 320:] = _bit_plane(b[..., 4:8])
    return out


def _deinterleave_q5_1(p: np.ndarray) -> np.ndarray:
    """[G, nb, 384] → [G, 16, nb, 24] (inverse of ``_interleave_q5_1``)."""
    G, nb, _ = p.shape
    out = np.empty((G, GROUP, nb, 24), np.uint8)
    q41 = deinterleave(np.ascontiguousarray(p[..., :320]).reshape(G, nb * 320), "q4_1").reshape(G, GROUP, nb, 20)
    out[..., :4], out[..., 8:] = q41[..., :4], q41[..., 4:]
    out[..., 4:8] = _unplane(p[..., 320:])
    return out


# the types with a layout of their own: (interleave, deinterleave) of [G, 16, nb, bytes] blocks
_OWN = {"q4_k": (_interleave_q4_k, _deinterleave_q4_k), "q6_k": (_interleave_q6_k, _deinterleave_q6_k),
        "q5_k": (_interleave_q5_k, _deinterleave_q5_k), "q5_1": (_interleave_q5_1, _deinterleave_q5_1)}


def interleave_c(kern, raw: np.ndarray, qtype: str, threads: int = 0) -> np.ndarray:
    """``interleave`` done by the C library (ifg_quant_interleave, threads over row groups): the
    loader's path, ~10x faster than the numpy reference on a 1B model."""
    N, bb = raw.shape[0], _BLOCK.get(qtype)
    if bb is None or raw.ndim != 2 or N % GROUP or raw.shape[1] % bb:
        raise InfengError(f"cannot interleave a {qtype} matrix of stored shape {list(raw.shape)}")
    src = np.ascontiguousarray(raw)
    out = np.empty((N // GROUP, raw.shape[1] * GROUP), np.uint8)
    ffi = kern.ffi
    kern.lib.ifg_quant_interleave(ffi.cast("void *", ffi.from_buffer(out)), ffi.cast("void *", ffi.from_buffer(src)),
                                  DTYPE[qtype], N, raw.shape[1] // bb * _ELEMS[qtype], threads)
    return out


def deinterleave(packed: np.ndarray, qtype: str) -> np.ndarray:
    """Inverse of ``interleave`` (``qtype`` is the plain type): back to GGUF-order blocks."""
    bb = _BLOCK[qtype]
    G = packed.shape[0]
    nb = packed.shape[1] // (GROUP * bb)
    p = packed.reshape(G, nb, GROUP * bb)
    if qtype in _OWN:
        return _OWN[qtype][1](p).reshape(G * GROUP, nb * bb)
    out = np.empty((G, GROUP, nb, bb), np.uint8)
    hb = 2 * _SCALES[qtype]
    for h in range(_SCALES[qtype]):
        out[..., 2 * h:2 * h + 2] = p[..., 2 * GROUP * h:2 * GROUP * (h + 1)].reshape(G, nb, GROUP, 2).transpose(0, 2, 1, 3)
    if qtype == "q8_0":
        q = (p[..., 2 * GROUP:] ^ np.uint8(0x80)).reshape(G, nb, 8, GROUP, 4)
        out[..., 2:] = q.transpose(0, 3, 1, 2, 4).reshape(G, GROUP, nb, 32)
    else:
        by = p[..., hb * GROUP:].reshape(G, nb, 4, GROUP, 4)                    # [G, nb, v, r, j]
        q = np.stack([by & np.uint8(0x0F), by >> np.uint8(4)], axis=-2)       # [G, nb, v, r, h, j]
        q = q.transpose(0, 3, 1, 2, 4, 5).reshape(G, GROUP, nb, 32)            # k = 8v + 4h + j
        out[..., hb:] = q[..., :16] | (q[..., 16:] << np.uint8(4))
    return out.reshape(G * GROUP, nb * bb)


_LAYOUT_IDS: dict[str, str] = {}


def layout_id(qtype: str) -> str:
    """The name a file stores for ``qtype``'s interleaved layout: the layout's name and a fingerprint
    of this build's byte order (the interleaved bytes of a fixed pseudo-random 16-row matrix), so a
    file written by a build with another order is refused instead of misread."""
    if qtype not in _LAYOUT_IDS:
        raw = np.random.default_rng(16).integers(0, 256, (GROUP, 2 * _BLOCK[qtype] * (256 // _ELEMS[qtype])),
                                                 dtype=np.uint8)
        crc = zlib.crc32(memoryview(np.ascontiguousarray(interleave(raw, qtype))).cast("B")) & 0xFFFFFFFF
        _LAYOUT_IDS[qtype] = f"{INTERLEAVED[qtype]}.{crc:08x}"
    return _LAYOUT_IDS[qtype]
