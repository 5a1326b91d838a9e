"""Elementwise / row kernels (ifg_rmsnorm, ifg_rope, ifg_silu_mul, ifg_embed) for every ISA
variant, odd sizes and thread counts 1/2/3, against float64 numpy references.

Tolerances (all f32 kernels on f32 inputs):
- rmsnorm: rtol 1e-6 (sum of squares in f64; r = 1/sqrtf(var+eps) and two products: a few ulp).
- rope: |err| <= 1e-6 * (|x1| + |x2|) per element (cos/sin of the f32 angle to < 1 ulp, one
  rotation: absolute error relative to the pair's magnitude, since x1*c - x2*s can cancel).
- silu_mul: rtol 1e-6 + atol 1e-36 (vector exp ~1.5e-7 relative, a division and a product; the
  atol only matters where the result is subnormal, g < -87).
- embed: exact (bf16 / f16 → f32 conversion is exact).
Determinism: same inputs, same thread count → bitwise equal outputs.
"""
import numpy as np
import pytest

from conftest import P, bf16_bits_to_f32, to_bf16_bits

DIMS = (1, 3, 7, 8, 15, 17, 31, 33, 63, 64, 65, 172, 257)
THREADS = (1, 2, 3)
IFG_F32, IFG_BF16, IFG_F16 = 0, 1, 2


# ---------------------------------------------------------------- rmsnorm
def rmsnorm_ref(x, w, eps):
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + eps) * w.astype(np.float64)


@pytest.mark.parametrize("dim", DIMS)
def test_rmsnorm(kern, dim):
    rng = np.random.default_rng(dim)
    for T, nth in ((1, 1), (5, 2), (7, 3)):
        x = (rng.standard_normal((T, dim)) * rng.uniform(0.01, 100, size=(T, 1))).astype(np.float32)
        w = rng.standard_normal(dim).astype(np.float32)
        eps = 1e-5
        out = np.full((T + 1, dim), np.nan, np.float32)  # extra row must stay NaN
        kern.lib.ifg_rmsnorm(P(kern, out), P(kern, x), P(kern, w), T, dim, eps, nth)
        np.testing.assert_allclose(out[:T], rmsnorm_ref(x, w, eps), rtol=1e-6, atol=0)
        assert np.isnan(out[T]).all()
        # in place (out aliases x)
        y = x.copy()
        kern.lib.ifg_rmsnorm(P(kern, y), P(kern, y), P(kern, w), T, dim, eps, nth)
        np.testing.assert_array_equal(y, out[:T])


def test_rmsnorm_zero_row_and_eps(kern):
    x = np.zeros((2, 17), np.float32)
    x[1, 3] = 1e-20
    w = np.ones(17, np.float32)
    out = np.empty_like(x)
    kern.lib.ifg_rmsnorm(P(kern, out), P(kern, x), P(kern, w), 2, 17, 1e-6, 1)
    np.testing.assert_allclose(out, rmsnorm_ref(x, w, 1e-6), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- rope
def inv_freq_for(head_dim, theta=10000.0):
    return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(np.float32)


def rope_ref(x, pos, inv_freq, n_heads, head_dim):
    """HF rotate_half on float64 copies, with the angle computed in f32 as HF does."""
    T = x.shape[0]
    half = head_dim // 2
    ang = (pos.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)  # f32 product
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    xh = x[:, : n_heads * head_dim].astype(np.float64).reshape(T, n_heads, head_dim)
    x1, x2 = xh[..., :half], xh[..., half:]
    out = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(T, n_heads * head_dim)
    mag = np.concatenate([np.abs(x1) + np.abs(x2)] * 2, axis=-1).reshape(T, n_heads * head_dim)
    return out, mag


@pytest.mark.parametrize("head_dim", (2, 6, 8, 16, 30, 34, 64, 128, 130, 258, 300))
def test_rope(kern, head_dim):
    rng = np.random.default_rng(head_dim)
    for T, n_heads, pad, nth in ((1, 1, 0, 1), (5, 3, 7, 2), (9, 4, 0, 3)):
        ldx = n_heads * head_dim + pad
        x = rng.standard_normal((T, ldx)).astype(np.float32)
        pos = rng.integers(0, 4097, size=T).astype(np.int32)
        pos[0] = 0
        inv_freq = inv_freq_for(head_dim)
        ref, mag = rope_ref(x, pos, inv_freq, n_heads, head_dim)
        y = x.copy()
        kern.lib.ifg_rope(P(kern, y), ldx, P(kern, pos, "int32_t *"), P(kern, inv_freq), T, n_heads, head_dim, nth)
        err = np.abs(y[:, : n_heads * head_dim].astype(np.float64) - ref)
        assert (err <= 1e-6 * mag + 1e-30).all(), err.max()
        np.testing.assert_array_equal(y[:, n_heads * head_dim:], x[:, n_heads * head_dim:])  # padding untouched
        np.testing.assert_array_equal(y[pos == 0, : n_heads * head_dim], x[pos == 0, : n_heads * head_dim])


# ---------------------------------------------------------------- silu_mul
def silu_mul_ref(g, u):
    g64 = g.astype(np.float64)
    with np.errstate(over="ignore"):
        return g64 / (1.0 + np.exp(-g64)) * u.astype(np.float64)


@pytest.mark.parametrize("n", DIMS + (4096, 4097, 10000))
def test_silu_mul(kern, n):
    rng = np.random.default_rng(n)
    for nth in THREADS:
        g = (rng.standard_normal(n) * 4).astype(np.float32)
        u = rng.standard_normal(n).astype(np.float32)
        out = np.concatenate([g, np.full(3, np.nan, np.float32)])  # tail must stay NaN
        kern.lib.ifg_silu_mul(P(kern, out), P(kern, u), n, nth)
        np.testing.assert_allclose(out[:n], silu_mul_ref(g, u), rtol=1e-6, atol=1e-36)
        assert np.isnan(out[n:]).all()


def test_silu_mul_full_range(kern):
    """Dense sweep of the exp argument over the whole f32 range (overflow, subnormals)."""
    g = np.concatenate([np.linspace(-110, 110, 200001), [0.0, -0.0, 1e-30, -1e-30, 88.7, -88.7, 104, -104]])
    g = g.astype(np.float32)
    u = np.ones_like(g)
    out = g.copy()
    kern.lib.ifg_silu_mul(P(kern, out), P(kern, u), g.size, 2)
    np.testing.assert_allclose(out, silu_mul_ref(g, u), rtol=1e-6, atol=1e-36)
    big = np.array([-1e30, 1e30, -np.float32(3.4e38), np.float32(3.4e38)], np.float32)
    out = big.copy()
    kern.lib.ifg_silu_mul(P(kern, out), P(kern, np.ones_like(big)), big.size, 1)
    np.testing.assert_array_equal(out, np.array([0, 1e30, 0, np.float32(3.4e38)], np.float32))
    nan = np.array([np.nan] * 17, np.float32)
    kern.lib.ifg_silu_mul(P(kern, nan), P(kern, np.ones_like(nan)), nan.size, 1)
    assert np.isnan(nan).all()


# ---------------------------------------------------------------- embed
def make_table(dtype, vocab, dim, rng):
    t = rng.standard_normal((vocab, dim)).astype(np.float32)
    if dtype == IFG_F32:
        return t, t
    if dtype == IFG_BF16:
        bits = to_bf16_bits(t)
        return bits, bf16_bits_to_f32(bits)
    t[:, ::5] *= np.float32(1e-6)  # f16 subnormals
    t[0, 0] = np.inf
    bits = t.astype(np.float16).view(np.uint16)
    return bits, bits.view(np.float16).astype(np.float32)


@pytest.mark.parametrize("dtype", (IFG_F32, IFG_BF16, IFG_F16))
@pytest.mark.parametrize("dim", DIMS)
def test_embed(kern, dtype, dim):
    rng = np.random.default_rng(dim * 3 + dtype)
    vocab = 50
    table, ref = make_table(dtype, vocab, dim, rng)
    for T, nth in ((1, 1), (6, 2), (11, 3)):
        tokens = rng.integers(0, vocab, size=T).astype(np.int32)
        tokens[-1] = vocab - 1
        tokens[0] = 0
        out = np.full((T + 1, dim), np.nan, np.float32)
        kern.lib.ifg_embed(P(kern, out), P(kern, table, "void *"), dtype, P(kern, tokens, "int32_t *"), T, dim, nth)
        np.testing.assert_array_equal(out[:T], ref[tokens])
        assert np.isnan(out[T]).all()


def test_embed_f16_all_bit_patterns(kern):
    """Every f16 bit pattern converts exactly (subnormals, inf, NaN payloads)."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    out = np.empty((256, 256), np.float32)
    tokens = np.arange(256, dtype=np.int32)
    kern.lib.ifg_embed(P(kern, out), P(kern, bits, "void *"), IFG_F16, P(kern, tokens, "int32_t *"), 256, 256, 2)
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(out[~nan], ref[~nan])
    assert np.isnan(out[nan]).all()


# ---------------------------------------------------------------- determinism
def test_ops_deterministic(kern):
    rng = np.random.default_rng(7)
    T, dim = 13, 257
    x = rng.standard_normal((T, dim)).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    u = rng.standard_normal(T * dim).astype(np.float32)
    pos = np.arange(T, dtype=np.int32) * 300
    inv_freq = inv_freq_for(64)
    for nth in THREADS:
        res = []
        for _ in range(2):
            a = np.empty_like(x)
            kern.lib.ifg_rmsnorm(P(kern, a), P(kern, x), P(kern, w), T, dim, 1e-6, nth)
            b = x[:, :256].copy()
            kern.lib.ifg_rope(P(kern, b), 256, P(kern, pos, "int32_t *"), P(kern, inv_freq), T, 4, 64, nth)
            c = x.ravel().copy()
            kern.lib.ifg_silu_mul(P(kern, c), P(kern, u), c.size, nth)
            res.append((a, b, c))
        for r0, r1 in zip(*res):
            assert r0.tobytes() == r1.tobytes()
