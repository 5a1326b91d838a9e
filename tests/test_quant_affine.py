"""q4_1 / q5_1 (GGUF Q4_1 / Q5_1, infeng.quant.affine): byte layout, round-trip error, and the
matmul kernels and embedding lookups of every ISA variant against numpy.

Kernel tolerance: the kernels quantize x as ``quantize_activations`` does, so the reference
``sum_b (d d_x) isum_b + m (d_x s_b)`` (float64; isum_b, s_b exact integers) differs from them only
by f32 rounding of the scale products and of the sums: |y - ref| <= 1e-5 * magnitude + 1e-6."""
import numpy as np
import pytest

from conftest import P
from infeng import quant
from infeng.kernels.abi import DTYPE
from infeng.quant import affine

TYPES = ("q4_1", "q5_1")
NK = [(1, 32), (3, 64), (17, 96), (33, 160), (65, 64), (64, 2080), (7, 4160)]


def test_q4_1_known_block_bytes():
    x = np.linspace(-1.0, 2.0, 32, dtype=np.float32).reshape(1, 32)
    x[0, 5] = 0.7
    raw = quant.quantize_q4_1(x)
    assert raw.shape == (1, 20)
    d = np.float32(3.0) / np.float32(15)
    assert raw[0, :2].tobytes() == np.float16(d).tobytes()
    assert raw[0, 2:4].tobytes() == np.float16(-1.0).tobytes()
    nib = raw[0, 4:]
    q = np.concatenate([nib & 15, nib >> 4])
    want = np.minimum(15, np.trunc((x[0] - np.float32(-1)) * (np.float32(1) / d) + np.float32(0.5)))
    assert q.tolist() == want.astype(int).tolist()
    assert q[0] == 0 and q[31] == 15
    np.testing.assert_array_equal(quant.dequantize_q4_1(raw)[0], q.astype(np.float32) * np.float32(np.float16(d)) - 1)


def test_q5_1_known_block_bytes():
    x = np.arange(32, dtype=np.float32).reshape(1, 32) * np.float32(0.5) + np.float32(3)   # d = 0.5, m = 3
    raw = quant.quantize_q5_1(x)
    assert raw.shape == (1, 24)
    assert raw[0, :2].tobytes() == np.float16(0.5).tobytes() and raw[0, 2:4].tobytes() == np.float16(3).tobytes()
    qh = int(raw[0, 4:8].view("<u4")[0])
    assert qh == 0xFFFF0000                                     # levels 16..31: bit 4 set
    nib = raw[0, 8:]
    assert (nib & 15).tolist() == list(range(16)) and (nib >> 4).tolist() == list(range(16))
    np.testing.assert_array_equal(quant.dequantize_q5_1(raw), x)


@pytest.mark.parametrize("qtype", TYPES)
def test_round_trip_error_bound(qtype):
    """|x - deq(q(x))| <= d/2 (+ the fp16 rounding of d and m: the level times d's rounding plus
    m's, each 2^-11 relative); constant blocks come back as fp16(x)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((37, 256)) * np.exp2(rng.integers(-6, 6, (37, 1))) + 0.3).astype(np.float32)
    x[3, :32] = 0.25
    y = quant.dequantize(quant.quantize(x, qtype), qtype)
    b = x.reshape(37, 8, 32)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = (hi - lo) / affine.LEVELS[qtype]
    err = np.abs(y.reshape(37, 8, 32) - b)
    assert np.all(err <= d / 2 * (1 + 2 ** -9) + 2 ** -11 * (np.abs(hi - lo) + np.abs(lo)) + 1e-12)
    assert np.all(y[3, :32] == np.float32(np.float16(0.25)))


def _ref(raw, qtype, x):
    """float64 reference with x quantized as the kernels do, and the tolerance's magnitude."""
    d, m, q = affine.levels(raw, qtype)
    xq, dx = quant.quantize_activations(x)
    T = x.shape[0]
    xq = xq.reshape(T, -1, 32).astype(np.float64)
    isum = np.einsum("tbk,nbk->tnb", xq, q.astype(np.float64))
    s = xq.sum(-1)                                                            # [T, nb]
    sc = (dx[:, None, :].astype(np.float64) * d[None].astype(np.float64)).astype(np.float32).astype(np.float64)
    mt = m[None].astype(np.float64) * (dx * s.astype(np.float32)).astype(np.float32)[:, None, :]
    mag = np.abs(sc) * np.einsum("tbk,nbk->tnb", np.abs(xq), q.astype(np.float64)) + np.abs(mt)
    return (isum * sc + mt).sum(-1), mag.sum(-1)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("N,K", NK)
def test_qmatmul_matches_numpy(kern, qtype, N, K):
    rng = np.random.default_rng(N * 1000 + K)
    w = (rng.standard_normal((N, K)) * np.exp2(rng.integers(-4, 4, (N, 1))) + 0.1).astype(np.float32)
    raw = quant.quantize(w, qtype)
    buf = np.full(raw.size + 64, 0xFF, np.uint8)                 # junk after W: never read
    buf[:raw.size] = raw.ravel()
    wdq = quant.dequantize(raw, qtype).astype(np.float64)
    for T in (1, 2, 3, 5, 17, 33):
        for nth in (1, 2):
            x = rng.standard_normal((T, K + 3)).astype(np.float32)  # ldx > K
            ldy = N + 2
            y = np.full((T, ldy), -7.0, np.float32)
            acc = int(T % 2 == 1 and nth == 2)
            kern.lib.ifg_matmul(P(kern, y), ldy, P(kern, x), K + 3, P(kern, buf, "void *"), DTYPE[qtype],
                                T, N, K, acc, nth)
            xs = np.ascontiguousarray(x[:, :K])
            want, mag = _ref(raw, qtype, xs)
            want = want - (7.0 if acc else 0.0)
            got = y[:, :N].astype(np.float64)
            assert np.all(np.abs(got - want) <= 1e-5 * mag + 1e-6), (T, nth)
            assert np.all(y[:, N:] == -7.0)
            # against the f32 product of the dequantized weights (x's int8 rounding: d_x / 2 each)
            _, dx = quant.quantize_activations(xs)
            bound = (np.abs(wdq).reshape(N, -1, 32).sum(-1)[None] * dx[:, None, :] / 2).sum(-1)
            full = xs.astype(np.float64) @ wdq.T - (7.0 if acc else 0.0)
            assert np.all(np.abs(got - full) <= bound + 1e-4 * np.abs(xs) @ np.abs(wdq).T + 1e-5)


@pytest.mark.parametrize("qtype", TYPES)
def test_qmatmul_deterministic_across_threads(kern, qtype):
    rng = np.random.default_rng(5)
    N, K, T = 131, 4160, 19
    raw = quant.quantize(rng.standard_normal((N, K)).astype(np.float32), qtype)
    x = rng.standard_normal((T, K)).astype(np.float32)
    outs = []
    for nth in (1, 2, 3):
        y = np.zeros((T, N), np.float32)
        kern.lib.ifg_matmul(P(kern, y), N, P(kern, x), K, P(kern, raw, "void *"), DTYPE[qtype], T, N, K, 0, nth)
        outs.append(y)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    y1 = np.zeros((1, N), np.float32)
    kern.lib.ifg_matmul(P(kern, y1), N, P(kern, x), K, P(kern, raw, "void *"), DTYPE[qtype], 1, N, K, 0, 2)
    np.testing.assert_array_equal(y1[0], outs[0][0])


@pytest.mark.parametrize("qtype", TYPES)
def test_embedding_lookup_is_dequantize(kern, qtype):
    rng = np.random.default_rng(7)
    vocab, dim = 41, 96
    raw = quant.quantize(rng.standard_normal((vocab, dim)).astype(np.float32), qtype)
    want = quant.dequantize(raw, qtype)
    for T, nth in ((1, 1), (9, 2)):
        tokens = rng.integers(0, vocab, size=T).astype(np.int32)
        tokens[-1] = vocab - 1
        out = np.full((T + 1, dim), np.nan, np.float32)
        kern.lib.ifg_embed(P(kern, out), P(kern, raw, "void *"), DTYPE[qtype], P(kern, tokens, "int32_t *"), T, dim, nth)
        np.testing.assert_array_equal(out[:T], want[tokens])
        assert np.isnan(out[T]).all()


# --- q4_1x16 / q5_1x16: the 16-row interleaved layouts the loader builds ----------------------

@pytest.mark.parametrize("qtype", TYPES)
def test_x16_interleave_round_trip_c_repack_and_layout(kern, qtype):
    from infeng.errors import InfengError
    from infeng.quant.interleave import deinterleave, interleave, interleave_c
    rng = np.random.default_rng(11)
    raw = quant.quantize(rng.standard_normal((48, 160)).astype(np.float32), qtype)
    packed = interleave(raw, qtype)
    assert packed.shape == (3, raw.size // 3)
    np.testing.assert_array_equal(deinterleave(packed, qtype), raw)
    for threads in (1, 3):
        np.testing.assert_array_equal(interleave_c(kern, raw, qtype, threads), packed)
    with pytest.raises(InfengError):
        interleave_c(kern, raw[:40], qtype)
    # the documented byte positions (quant_gguf.h), group 1, block 2
    d, m, q = affine.levels(raw, qtype)
    bb = 16 * affine.BYTES[qtype]
    p = packed[1].reshape(-1, bb)[2]
    for r, k in ((0, 0), (3, 5), (15, 31), (9, 18), (2, 12), (7, 27)):
        assert p[:32].view(np.float16)[r] == np.float16(d[16 + r, 2])
        assert p[32:64].view(np.float16)[r] == np.float16(m[16 + r, 2])
        by = p[64 + 64 * (k // 8) + 4 * r + k % 4]
        level = by & 15 if k % 8 < 4 else by >> 4
        if qtype == "q5_1":   # the 5th bit: plane byte 4r + k % 4, bit k // 4
            level |= (p[320 + 4 * r + k % 4] >> (k // 4) & 1) << 4
        assert level == q[16 + r, 2, k]


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("N,K", [(16, 32), (48, 96), (80, 2080), (32, 4160)])
def test_x16_matmul_matches_numpy(kern, qtype, N, K):
    from infeng.quant.interleave import interleave
    rng = np.random.default_rng(N + K)
    raw = quant.quantize((rng.standard_normal((N, K)) * np.exp2(rng.integers(-4, 4, (N, 1))) + 0.1)
                         .astype(np.float32), qtype)
    packed = interleave(raw, qtype)
    buf = np.full(packed.size + 64, 0xFF, np.uint8)
    buf[:packed.size] = packed.ravel()
    for T in (1, 3, 7, 17, 50):
        x = rng.standard_normal((T, K + 3)).astype(np.float32)
        want, mag = _ref(raw, qtype, np.ascontiguousarray(x[:, :K]))
        outs = []
        for nth in (1, 2, 3):
            ldy = N + 5
            y = np.full((T, ldy), -7.0, np.float32)
            acc = int(T % 2 == 1 and nth == 2)
            kern.lib.ifg_matmul(P(kern, y), ldy, P(kern, x), K + 3, P(kern, buf, "void *"), DTYPE[qtype + "x16"],
                                T, N, K, acc, nth)
            assert np.all(np.abs(y[:, :N] - (want - 7.0 if acc else want)) <= 1e-5 * mag + 1e-6), (T, nth)
            assert np.all(y[:, N:] == -7.0)
            outs.append(y[:, :N] + (7.0 if acc else 0.0) if not acc else None)
        np.testing.assert_array_equal(outs[0], outs[2])          # threads 1 and 3: the same bits
