"""KV-cache rounding schemes tried in the numpy reference model before any goes into C: each
scheme rounds (and may rotate) the q, k, v of every layer as a cache would, and the logits are
compared with the reference's f32-cache run (mean KLD, p99, ΔPPL, top-1 agreement).

    python tools/kv_scheme_sim.py out/smollm2-f32.infeng out/gsm8k.txt 512 [SCHEME ...]
    python tools/kv_scheme_sim.py out/smollm2-f32.infeng out/gsm8k.txt 512 --residual int4 1 2 4

Use an f32 model (tools/dequantize_model.py): the whole text is one prefill, so every key is
rounded as its full block would be (KIVI's per-channel key groups need a block's positions; the
cache's int8c / int4c keep each query's own group in f32, which this does not model). --residual
does model it: the cache's own rounding of --kv-dtype DTYPE (the reference with a KVSpec), each
query reading its own and the R - 1 groups before it in f32 (R = 1 is the cache).
"""
from __future__ import annotations

import sys
import time

import numpy as np

from infeng.model.loader import load_model
from infeng.model.reference import ReferenceModel, attend
from infeng.quant.kvcache import POS, hadamard, rotation_signs, roundtrip
from infeng.runtime.kvspec import kv_spec
from infeng.runtime.tokenizer import Tokenizer


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def sym(x: np.ndarray, bits: int) -> np.ndarray:
    """Rounded along the last axis as the cache's int8 (amax/127) / int4 (m/-8) groups."""
    if bits == 8:
        d, lo, hi = np.abs(x).max(-1, keepdims=True) / 127, -127, 127
    else:
        d, lo, hi = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1) / -8, -8, 7
    return (np.clip(np.rint(x / np.where(d == 0, 1, d)), lo, hi) * d).astype(np.float32)


def asym(x: np.ndarray, bits: int) -> np.ndarray:
    """Min/max (zero-point) rounding along the last axis."""
    mn, mx = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    d = (mx - mn) / (2 ** bits - 1)
    return (np.clip(np.rint((x - mn) / np.where(d == 0, 1, d)), 0, 2 ** bits - 1) * d + mn).astype(np.float32)


def sym_mse(x: np.ndarray, bits: int) -> np.ndarray:
    """sym with the scale searched: the absmax scale times the factor in 0.70..1.00 whose
    rounding has the least squared error in each group (the search runs once, at store)."""
    best, err = None, None
    for f in np.linspace(0.70, 1.0, 16):
        y = sym(x / f, bits) * f if bits == 8 else _sym4_scaled(x, f)
        e = ((y - x) ** 2).sum(-1, keepdims=True)
        best = y if best is None else np.where(e < err, y, best)
        err = e if err is None else np.minimum(e, err)
    return best


def _sym4_scaled(x: np.ndarray, f: float) -> np.ndarray:
    d = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1) / -8 * f
    return (np.clip(np.rint(x / np.where(d == 0, 1, d)), -8, 7) * d).astype(np.float32)


def lloyd_levels(u: np.ndarray, fixed: list[float], n: int = 16, iters: int = 60) -> np.ndarray:
    """n levels minimising the squared error of the samples u, the levels in `fixed` kept."""
    lv = np.quantile(u, np.linspace(0, 1, n))
    for _ in range(iters):
        idx = np.abs(u[:, None] - lv[None]).argmin(1)
        lv = np.array([u[idx == i].mean() if (idx == i).any() else lv[i] for i in range(n)])
        for f in fixed:
            lv[np.abs(lv - f).argmin()] = f
        lv.sort()
    return lv.astype(np.float32)


def _gauss_groups(g: int, n: int = 20000) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, g)).astype(np.float32)


def sym_levels(g: int) -> np.ndarray:
    """Levels of x / -m (m the signed value of largest magnitude, so it reads -1) for groups of g
    Gaussian values: where rotated values fall."""
    x = _gauss_groups(g)
    m = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)
    u = (x / -m)
    keep = np.abs(x) < np.abs(m)
    return lloyd_levels(u[keep], [-1.0])


def asym_levels(b: int) -> np.ndarray:
    """Levels of (x - min) / (max - min) for groups of b Gaussian values (0 and 1 kept)."""
    x = _gauss_groups(b)
    mn, mx = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    u = (x - mn) / (mx - mn)
    keep = (x > mn) & (x < mx)
    return lloyd_levels(u[keep], [0.0, 1.0])


def nl_sym(levels):
    def f(x: np.ndarray, bits: int) -> np.ndarray:
        m = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)
        d = np.where(m == 0, 1, -m)
        u = x / d
        return (levels[np.abs(u[..., None] - levels).argmin(-1)] * d).astype(np.float32)
    return f


def nl_asym(levels):
    def f(x: np.ndarray, bits: int) -> np.ndarray:
        mn, mx = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
        d = np.where(mx == mn, 1, mx - mn)
        u = (x - mn) / d
        return (levels[np.abs(u[..., None] - levels).argmin(-1)] * d + mn).astype(np.float32)
    return f


def per_token(f, x: np.ndarray, g: int, bits: int) -> np.ndarray:
    """x [T, H, hd] in groups of g channels of one position (the cache's layout today; one
    group per head when head_dim is smaller)."""
    T, H, hd = x.shape
    g = min(g, hd)
    return f(x.reshape(T, H, hd // g, g), bits).reshape(T, H, hd)


def per_channel(f, x: np.ndarray, b: int, bits: int) -> np.ndarray:
    """x [T, H, hd] in groups of b positions of one channel (KIVI's keys)."""
    T, H, hd = x.shape
    n = -(-T // b) * b
    xp = np.concatenate([x, np.repeat(x[-1:], n - T, 0)]) if n > T else x
    y = np.moveaxis(f(np.moveaxis(xp.reshape(n // b, b, H, hd), 1, -1), bits), -1, 1)
    return y.reshape(n, H, hd)[:T]


SYM32 = ASYM16 = None


def scheme_table(s: np.ndarray) -> dict:
    global SYM32, ASYM16
    SYM32, ASYM16 = sym_levels(32), asym_levels(16)
    def rot(x):
        return hadamard(x, s)

    def unrot(y):                       # the inverse rotation: butterflies, then the signs
        return hadamard(y, np.ones_like(s)) * s

    return {
        "bf16": lambda q, k, v: (q, roundtrip(k, "bf16", 64), roundtrip(v, "bf16", 64)),
        "f16": lambda q, k, v: (q, roundtrip(k, "f16", 64), roundtrip(v, "f16", 64)),
        "int8": lambda q, k, v: (rot(q), per_token(sym, rot(k), 32, 8), per_token(sym, v, 32, 8)),
        "int8-g16": lambda q, k, v: (rot(q), per_token(sym, rot(k), 16, 8), per_token(sym, v, 16, 8)),
        "int4": lambda q, k, v: (rot(q), per_token(sym, rot(k), 32, 4), per_token(sym, v, 32, 4)),
        "int4-g16": lambda q, k, v: (rot(q), per_token(sym, rot(k), 16, 4), per_token(sym, v, 16, 4)),
        "int4-asym": lambda q, k, v: (rot(q), per_token(asym, rot(k), 32, 4), per_token(asym, v, 32, 4)),
        "int4-vrot": lambda q, k, v: (rot(q), per_token(sym, rot(k), 32, 4), unrot(per_token(sym, rot(v), 32, 4))),
        "k=int4,v=int8": lambda q, k, v: (rot(q), per_token(sym, rot(k), 32, 4), per_token(sym, v, 32, 8)),
        "k=int8,v=int4": lambda q, k, v: (rot(q), per_token(sym, rot(k), 32, 8), per_token(sym, v, 32, 4)),
        "kivi16-sym": lambda q, k, v: (q, per_channel(sym, k, 16, 4), per_token(sym, v, 32, 4)),
        "kivi16-asym": lambda q, k, v: (q, per_channel(asym, k, 16, 4), per_token(sym, v, 32, 4)),
        "kivi32-asym": lambda q, k, v: (q, per_channel(asym, k, 32, 4), per_token(asym, v, 32, 4)),
        "kivi16-asym-rot": lambda q, k, v: (rot(q), per_channel(asym, rot(k), 16, 4), per_token(sym, v, 32, 4)),
        # values: what int4 (kivi16-asym-rot keys) could do with the same bytes or a few more
        "kivi-k8": lambda q, k, v: (rot(q), per_channel(asym, rot(k), 16, 8), per_token(sym, v, 32, 4)),
        "kivi-vrot": lambda q, k, v: (rot(q), per_channel(asym, rot(k), 16, 4),
                                      unrot(per_token(sym, rot(v), 32, 4))),
        "kivi-vmse": lambda q, k, v: (rot(q), per_channel(asym, rot(k), 16, 4), per_token(sym_mse, v, 32, 4)),
        "kivi-vrot-mse": lambda q, k, v: (rot(q), per_channel(asym, rot(k), 16, 4),
                                          unrot(per_token(sym_mse, rot(v), 32, 4))),
        "kivi-vH": lambda q, k, v: (rot(q), per_channel(asym, rot(k), 16, 4),
                                    hadamard(per_token(sym, hadamard(v, np.ones_like(s)), 32, 4), np.ones_like(s))),
        "kivi-vrot-asym": lambda q, k, v: (rot(q), per_channel(asym, rot(k), 16, 4),
                                           unrot(per_token(asym, rot(v), 32, 4))),
        "kivi-vrot-nl": lambda q, k, v: (rot(q), per_channel(asym, rot(k), 16, 4),
                                         unrot(per_token(nl_sym(SYM32), rot(v), 32, 4))),
        "kivi-nl-vrot-nl": lambda q, k, v: (rot(q), per_channel(nl_asym(ASYM16), rot(k), 16, 4),
                                            unrot(per_token(nl_sym(SYM32), rot(v), 32, 4))),
        "kivi-nl-vrot": lambda q, k, v: (rot(q), per_channel(nl_asym(ASYM16), rot(k), 16, 4),
                                         unrot(per_token(sym, rot(v), 32, 4))),
        "kivi-vasym": lambda q, k, v: (rot(q), per_channel(asym, rot(k), 16, 4), per_token(asym, v, 32, 4)),
        "kivi-v16": lambda q, k, v: (rot(q), per_channel(asym, rot(k), 16, 4), per_token(sym, v, 16, 4)),
        # the bytes of kivi-vrot moved from the keys to the values: key groups of 32 positions
        # (1 bit of f16 scale and min a key value instead of 2), value groups of 16 (1 bit instead of 0.5)
        "kivi32-vrot16": lambda q, k, v: (rot(q), per_channel(asym, rot(k), 32, 4),
                                          unrot(per_token(sym, rot(v), 16, 4))),
        "kivi-vrot16": lambda q, k, v: (rot(q), per_channel(asym, rot(k), 16, 4),
                                        unrot(per_token(sym, rot(v), 16, 4))),
        "kivi-v8": lambda q, k, v: (rot(q), per_channel(asym, rot(k), 16, 4), per_token(sym, v, 32, 8)),
        "int8-kivi16-asym": lambda q, k, v: (q, per_channel(asym, k, 16, 8), per_token(sym, v, 32, 8)),
        # q·(k - μ) differs from q·k by a constant per query: softmax unchanged, whatever μ is
        "int4-centred-oracle": lambda q, k, v: (rot(q), per_token(sym, rot(k - k.mean(0)), 32, 4),
                                                per_token(sym, v, 32, 4)),
        "int4-centred-first16": lambda q, k, v: (rot(q), per_token(sym, rot(k - k[1:17].mean(0)), 32, 4),
                                                 per_token(sym, v, 32, 4)),
    }


class Rounded(ReferenceModel):
    """The reference with one scheme applied to every layer's q, k, v after RoPE."""

    def __init__(self, model, scheme):
        super().__init__(model)
        self.scheme = scheme

    def qkv(self, i, q, k, v, pos):
        q, k, v, scale = super().qkv(i, q, k, v, pos)
        return (*self.scheme(q, k, v), scale) if self.scheme else (q, k, v, scale)


class Residual(ReferenceModel):
    """The cache's own rounding (a KVSpec with per-channel keys), but a query reads the keys of its
    own group and the resid - 1 groups before it in f32 (KIVI's full-precision recent window)."""

    def __init__(self, model, spec, resid: int):
        super().__init__(model, kv=spec)
        self.resid = resid

    def attend_channel(self, i, q, pos, scale, window, int4_group=0):
        out = np.empty((len(pos), q.shape[1] * q.shape[2]), np.float32)
        g_of = pos // POS
        for g in np.unique(g_of):
            nq = max(0, int(g) * POS - (self.resid - 1) * POS)
            sel = g_of == g
            out[sel] = attend(q[sel], self.k[i], self.v[i], pos[sel], scale, window,
                              self.channel_scores(i, q[sel], nq), int4_group)
        return out


def main() -> None:
    path, text, n, names = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    model = load_model(path)
    residual = None
    if names[:1] == ["--residual"]:       # --residual DTYPE R...: the cache's rounding, R groups of keys in f32
        dtype, residual, names = names[1], [int(r) for r in names[2:]], []
    table = scheme_table(rotation_signs(model.config.head_dim, 0))
    bad = [x for x in names if x not in table]
    if bad:
        sys.exit(f"unknown scheme {bad[0]!r}: one of {', '.join(table)}")
    tok = Tokenizer(model.tokenizer, model.config.bos_id, model.config.eos_ids)
    ids = tok.encode(open(text, encoding="utf-8").read())[:n]
    base = log_softmax(Rounded(model, None).forward(ids))
    tgt = np.array(ids[1:])
    nll0 = -base[np.arange(len(ids) - 1), tgt].mean()
    print(f"{len(ids)} tokens, f32-cache perplexity {np.exp(nll0):.4f}")
    runs = ({f"{dtype} resid {r}": (lambda r=r: Residual(model, kv_spec(model.config, dtype), r)) for r in residual}
            if residual else {name: (lambda name=name: Rounded(model, table[name])) for name in names or table})
    for name, make in runs.items():
        t = time.perf_counter()
        lp = log_softmax(make().forward(ids))
        kld = (np.exp(base) * (base - lp)).sum(-1)
        nll = -lp[np.arange(len(ids) - 1), tgt].mean()
        print(f"{name:22s} KLD {kld.mean():.2e}  p99 {np.quantile(kld, 0.99):.2e}  "
              f"ΔPPL {100 * (np.exp(nll - nll0) - 1):+.2f}%  top-1 {(lp.argmax(-1) == base.argmax(-1)).mean():.3f}  "
              f"({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
