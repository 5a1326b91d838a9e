"""The compressed KV cache formats in numpy: the reference the C store and attention are checked
against, with exactly the C kernels' rounding (kernels_c/kvq.h describes the layout).

A kv head's share of one block (a *part*) holds ``bs`` positions of ``hd`` values:

- keys channel-major (``[hd][bs]`` codes), values row-major (``[bs][hd]``);
- int8 / fp8 / int4: f16 scales first (keys ``[hd/group][bs]``, values ``[bs][hd/group]``), one
  per ``group`` values of one position, rounded to f16 before the codes use them; int8 ``d = amax/127``, ``q = rint(x·(1/d))`` in -127..127;
  fp8 ``d = amax/448``, ``q`` = x·(1/d) rounded to the nearest E4M3 value (ties to the even code,
  saturated at ±448), one code byte; int4 ``d = m/-8`` (``m`` the value of largest magnitude),
  ``q`` clamped to -8..7 and stored ``q+8``, two rows of the code matrix in one row of bytes
  (byte c of byte row i: column c of row 2i in its low nibble, of row 2i + 1 in its high one: a
  key part's channels 2i and 2i + 1 at one position, a value part's positions 2i and 2i + 1 at
  one channel — the two a bf16 dot product pairs);
- bf16, f16: round to nearest even; f32: as is;
- int8c / int4c, keys only (KIVI's per-channel keys): each channel of each group of ``POS`` = 16
  positions has an f16 min ``mn`` and scale ``d = f16((max - mn)/L)`` (L = 255 / 15), codes
  ``q = rint((x - mn)·(1/d))`` clamped to 0..L, read back as ``q·d + mn``; the part holds the
  scales ``[bs/16][hd]``, the mins ``[bs/16][hd]`` (f16), then the codes ``[hd][bs]`` (int4c
  packed as int4, nibble = q).

The value read back is ``q·d`` in f32. ``hadamard`` is the rotation of ``ifg_hadamard`` (and of
``ifg_hadamard_t``, its inverse).
"""
from __future__ import annotations

import numpy as np

from infeng.format.schema import convert_dtype, to_f32
from infeng.quant.fp8 import FP8_MAX, e4m3_values, encode_e4m3

KV_TYPES = ("f32", "bf16", "f16", "int8", "fp8", "int4", "int8c", "int4c")
SCALED = ("int8", "fp8", "int4")            # codes with one f16 scale per group
CHANNEL = ("int8c", "int4c")                # keys only: f16 scale and min per channel of POS positions
POS = 16
CODE_BITS = {"f32": 32, "bf16": 16, "f16": 16, "int8": 8, "fp8": 8, "int4": 4, "int8c": 8, "int4c": 4}
_E4M3 = np.nan_to_num(e4m3_values()).astype(np.float32)


def scale_bytes(t: str, bs: int, hd: int, group: int) -> int:
    if t in CHANNEL:
        return bs // POS * hd * 4
    return bs * (hd // group) * 2 if t in SCALED else 0


def part_bytes(t: str, bs: int, hd: int, group: int) -> int:
    return scale_bytes(t, bs, hd, group) + bs * hd * CODE_BITS[t] // 8


def quantize(x: np.ndarray, t: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes and scales (f16 values, as f32) of groups x[..., group] (int8 / int4 as int8, fp8 as
    E4M3 bytes), as the C store."""
    x = np.asarray(x, np.float32)
    ax = np.abs(x)
    if t == "fp8":
        d = (ax.max(-1) / np.float32(FP8_MAX)).astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        return encode_e4m3((x * inv[..., None]).astype(np.float32)), d
    if t == "int8":
        d = ax.max(-1) / np.float32(127)
        lo, hi = -127, 127
    else:
        m = np.take_along_axis(x, ax.argmax(-1)[..., None], -1)[..., 0]
        d = m / np.float32(-8)
        lo, hi = -8, 7
    d = d.astype(np.float32).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(x * inv[..., None]), lo, hi).astype(np.int8)
    return q, d


def quantize_channel(x: np.ndarray, t: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (uint8), f16 scales and f16 mins of groups x[POS, ...] along axis 0, as the C store."""
    x = np.asarray(x, np.float32)
    L = np.float32(255 if t == "int8c" else 15)
    mn = x.min(0).astype(np.float16)
    m = mn.astype(np.float32)
    d = ((x.max(0) - m) / L).astype(np.float16)
    df = d.astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(df != 0, np.float32(1) / df, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint((x - m) * inv), 0, L).astype(np.uint8)
    return q, d, mn


def round_bf16(x: np.ndarray) -> np.ndarray:
    """f32 values rounded to bf16 (nearest even), as f32: what the bf16 dot products multiply."""
    return to_f32(convert_dtype(np.ascontiguousarray(x, np.float32), "f32", "bf16"), "bf16")


def channel_groups(x: np.ndarray, t: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys x[n, ...] (n a multiple of POS) as per-channel groups: codes [n, ...], f16 scales and
    mins [n / POS, ...]."""
    g = np.asarray(x, np.float32).reshape(x.shape[0] // POS, POS, *x.shape[1:])
    parts = [quantize_channel(g[i], t) for i in range(g.shape[0])]
    shape = (0, *x.shape[1:])
    if not parts:
        return np.zeros(shape, np.uint8), np.zeros(shape, np.float16), np.zeros(shape, np.float16)
    return (np.concatenate([p[0] for p in parts]), np.stack([p[1] for p in parts]), np.stack([p[2] for p in parts]))


def channel_scores(q: np.ndarray, codes: np.ndarray, d: np.ndarray, mn: np.ndarray, t: str) -> np.ndarray:
    """q [T, heads, hd] · per-channel key groups of type t (channel_groups of [n, kv_heads, hd]) as
    the cache's attention sums them, [heads, T, n] float64: Σ_d r(q_d·s_d)·c_d + Σ_d q_d·m_d for
    each group's scale s and min m, r rounding to bf16 for int4c (what lets AVX-512 use bf16 dot
    products; int8c keys stay exact)."""
    T, H, hd = q.shape
    G = H // codes.shape[1]
    out = np.empty((H, T, codes.shape[0]))
    q64 = q.astype(np.float64)
    r = round_bf16 if t == "int4c" else (lambda x: x)
    for g in range(codes.shape[0] // POS):
        s = np.repeat(d[g].astype(np.float32), G, axis=0)                               # [H, hd]
        qs = r(q * s[None]).astype(np.float64)                                          # [T, H, hd]
        c = np.repeat(codes[g * POS:(g + 1) * POS], G, axis=1).astype(np.float64)       # [POS, H, hd]
        m = np.einsum("thd,hd->ht", q64, np.repeat(mn[g].astype(np.float64), G, axis=0))
        out[:, :, g * POS:(g + 1) * POS] = np.einsum("thd,phd->htp", qs, c) + m[:, :, None]
    return out


def int4_weighted(w: np.ndarray, v: np.ndarray, group: int) -> np.ndarray:
    """Σ_j w_j·v_j / Σ_j w_j over decoded int4 values v [S, heads, hd] (groups of ``group``
    channels) for weights w [heads, T, S] (f32, a softmax's exp(s - max)), as the cache's
    attention sums them: each weight times its position's group scale rounded to bf16, times the
    code (what lets AVX-512 use bf16 dot products). A group's scale is its largest |value| / 8
    (the code -8 holds it). → [T, heads, hd] float64. The kernel's exp and running max (per span
    of 256 positions) can round a weight one bf16 step the other way."""
    S, H, hd = v.shape
    g = np.asarray(v, np.float32).reshape(S, H, hd // group, group)
    s = (np.abs(g).max(-1) / np.float32(8)).astype(np.float32)                    # [S, H, ng]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(s[..., None] > 0, g / s[..., None], 0).astype(np.float64)
    wq = round_bf16(w[..., None] * s.transpose(1, 0, 2)[:, None]).astype(np.float64)   # [H, T, S, ng]
    out = np.einsum("htsg,shgc->thgc", wq, codes).reshape(w.shape[1], H, hd)
    return out / w.sum(-1).T[:, :, None].astype(np.float64)


def roundtrip(x: np.ndarray, t: str, group: int) -> np.ndarray:
    """x[..., hd] as the cache gives it back (f32); per-channel keys: channel_groups / channel_scores."""
    x = np.asarray(x, np.float32)
    if t in CHANNEL:
        raise ValueError(f"{t} groups positions: use channel_groups")
    if t == "f32":
        return x.copy()
    if t in ("bf16", "f16"):
        return to_f32(convert_dtype(x, "f32", t), t)
    g = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    q, d = quantize(g, t)
    return (_code_values(q, t) * d[..., None]).reshape(x.shape)


def _code_values(q: np.ndarray, t: str) -> np.ndarray:
    """f32 value of each code (the C kernels' fp8 value/256 × scale·256 is the same product)."""
    return _E4M3[q] if t == "fp8" else q.astype(np.float32)


def _pack4(q: np.ndarray) -> np.ndarray:
    """int4 codes [rows, cols] (rows even) → bytes [rows/2, cols]: row 2i in the low nibbles of
    byte row i, row 2i + 1 in the high ones."""
    u = (q.astype(np.int16) + 8).astype(np.uint8).reshape(q.shape[0] // 2, 2, q.shape[1])
    return u[:, 0] | (u[:, 1] << 4)


def _unpack4(b: np.ndarray) -> np.ndarray:
    """_pack4's inverse: bytes [rows/2, cols] → codes [rows, cols]."""
    return np.stack([b & 0xF, b >> 4], axis=1).reshape(2 * b.shape[0], b.shape[1]).astype(np.int8) - 8


def encode_part(x: np.ndarray, t: str, group: int, key: bool) -> np.ndarray:
    """One part's bytes from its values x[bs][hd]."""
    x = np.asarray(x, np.float32)
    bs, hd = x.shape
    if t in CHANNEL:
        assert key, f"{t} is a key type"
        q, d, mn = quantize_channel(x.reshape(bs // POS, POS, hd).swapaxes(0, 1), t)   # [bs/POS][hd]
        codes = np.ascontiguousarray(q.transpose(2, 1, 0).reshape(hd, bs))           # [hd][bs]
        if t == "int4c":
            codes = _pack4(codes.astype(np.int16) - 8)
        return np.concatenate([d.view(np.uint8).reshape(-1), mn.view(np.uint8).reshape(-1), codes.reshape(-1)])
    if t in ("f32", "bf16", "f16"):
        c = x if t == "f32" else convert_dtype(x, "f32", t)
        return np.ascontiguousarray(c.T if key else c).view(np.uint8).reshape(-1)
    q, d = quantize(x.reshape(bs, hd // group, group), t)
    q = q.reshape(bs, hd)
    if key:
        q, d = q.T, d.T
    codes = _pack4(np.ascontiguousarray(q)) if t == "int4" else np.ascontiguousarray(q).view(np.uint8)
    return np.concatenate([np.ascontiguousarray(d.astype(np.float16)).view(np.uint8).reshape(-1), codes.reshape(-1)])


def decode_part(b: np.ndarray, t: str, bs: int, hd: int, group: int, key: bool) -> np.ndarray:
    """Values [bs][hd] (f32) of one part's bytes."""
    b = np.ascontiguousarray(b, np.uint8)
    rows, cols = (hd, bs) if key else (bs, hd)
    sb = scale_bytes(t, bs, hd, group)
    c = b[sb:]
    if t in CHANNEL:
        q = c.reshape(hd, bs) if t == "int8c" else (_unpack4(c.reshape(hd // 2, bs)).astype(np.int16) + 8)
        d = np.repeat(b[:sb // 2].view(np.float16).reshape(bs // POS, hd).astype(np.float32), POS, axis=0)
        m = np.repeat(b[sb // 2:sb].view(np.float16).reshape(bs // POS, hd).astype(np.float32), POS, axis=0)
        return np.ascontiguousarray(q.T.astype(np.float32) * d + m)
    if t == "f32":
        v = c.view(np.float32).reshape(rows, cols)
    elif t in ("bf16", "f16"):
        v = to_f32(c.view(np.uint16 if t == "bf16" else np.float16).reshape(rows, cols), t)
    else:
        if t == "int8":
            q = c.view(np.int8).reshape(rows, cols)
        elif t == "fp8":
            q = c.reshape(rows, cols)
        else:
            q = _unpack4(c.reshape(rows // 2, cols))
        d = b[:sb].view(np.float16).astype(np.float32)
        if key:
            v = _code_values(q, t) * np.repeat(d.reshape(hd // group, bs), group, axis=0)
        else:
            v = _code_values(q, t) * np.repeat(d.reshape(bs, hd // group), group, axis=1)
    return np.ascontiguousarray(v.T if key else v)


def rotation_signs(head_dim: int, seed: int) -> np.ndarray:
    """The rotation's random ±1 per channel, a function of the run's seed alone."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, head_dim]))
    return np.where(rng.random(head_dim) < 0.5, np.float32(-1), np.float32(1)).astype(np.float32)


def hadamard(x: np.ndarray, signs: np.ndarray, transpose: bool = False) -> np.ndarray:
    """x[..., n] rotated as ifg_hadamard: signs, butterflies of stride 1, 2, 4, …, then 1/sqrt(n);
    ``transpose``: its inverse as ifg_hadamard_t, the signs after the butterflies."""
    v = np.array(x, np.float32) * (np.float32(1) if transpose else signs)
    n = v.shape[-1]
    length = 1
    while length < n:
        w = v.reshape(*v.shape[:-1], n // (2 * length), 2, length)
        a, b = w[..., 0, :].copy(), w[..., 1, :].copy()
        w[..., 0, :], w[..., 1, :] = a + b, a - b
        length *= 2
    v = v * (np.float32(1) / np.sqrt(np.float32(n)))
    return v * signs if transpose else v
