"""q5_k (GGUF Q5_K, infeng.quant.q5_k): the C quantizer of every ISA build against the numpy
reference byte for byte, the layout against a per-element loop written from ggml's block layout,
and the matmul kernels and embedding lookups of every ISA variant against numpy. (llama.cpp's own
quantizer: tests/test_gguf_llamacpp_types.py.)"""
import numpy as np
import pytest

from conftest import P
from infeng import quant
from infeng.kernels.abi import DTYPE
from infeng.quant import q5_k

NK = [(1, 256), (3, 512), (17, 256), (33, 768), (64, 2304), (7, 4352)]


def _weights(rng, N, K):
    w = (rng.standard_normal((N, K)) * np.exp2(rng.integers(-6, 4, (N, 1))) + 0.05).astype(np.float32)
    w[0, :256] = 0.0                                    # an all-zero super-block
    if N > 1:
        w[1, 32:64] = -0.5                              # a constant (negative) sub-block
        w[1, 64:96] = np.abs(w[1, 64:96]) + 1.0         # all positive: the min clamps to 0
    return w


def _loop(blk: np.ndarray) -> np.ndarray:
    """One 176-byte block → 256 f32, element by element as ggml's dequantize_row_q5_K reads it."""
    f16 = lambda o: float(blk[o:o + 2].view(np.float16)[0])   # noqa: E731
    d, dmin, s = f16(0), f16(2), blk[4:16]
    out = []
    for j in range(8):
        if j < 4:
            sc, m = s[j] & 63, s[j + 4] & 63
        else:
            sc, m = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)
        for l in range(32):
            q = (blk[48 + 32 * (j // 2) + l] >> (4 * (j % 2))) & 15
            q += 16 if blk[16 + l] & (1 << j) else 0
            out.append(np.float32(d * sc) * np.float32(q) - np.float32(dmin * m))
    return np.array(out, np.float32)


def test_c_quantizer_is_the_numpy_reference(kern):
    rng = np.random.default_rng(0)
    for N, K in ((5, 256), (13, 1024)):
        x = _weights(rng, N, K)
        x[2, 200] = 40.0
        want = q5_k.quantize_q5_k_ref(x)
        for nth in (1, 2):
            got = np.empty_like(want)
            kern.lib.ifg_quantize_q5_k(P(kern, got, "uint8_t *"), P(kern, x), N, K, nth)
            np.testing.assert_array_equal(got, want)


def test_layout_and_round_trip():
    rng = np.random.default_rng(1)
    x = _weights(rng, 6, 512)
    raw = q5_k.quantize_q5_k_ref(x)
    y = q5_k.dequantize_q5_k(raw)
    for r in range(6):
        for b in range(2):
            np.testing.assert_allclose(y[r, 256 * b:256 * (b + 1)], _loop(raw[r, 176 * b:176 * (b + 1)]),
                                       rtol=1e-6, atol=1e-7)
    assert np.all(y[0, :256] == 0)
    rel = np.sqrt(((y - x) ** 2).sum() / (x ** 2).sum())
    assert rel < 0.05, rel                             # 5 bits: ~2-3% relative RMS on Gaussian rows


def _ref(raw, x):
    d, dmin, sc, m, q = q5_k.levels(raw)
    N = raw.shape[0]
    xq, dx = quant.quantize_activations(x)
    T = x.shape[0]
    xq = xq.reshape(T, -1, 32).astype(np.float64)
    qs = q.reshape(N, -1, 32).astype(np.float64)
    isum = np.einsum("tbk,nbk->tnb", xq, qs)
    a = (d[..., None] * sc.astype(np.float32)).reshape(N, -1).astype(np.float64)          # [N, blocks]
    c = (dmin[..., None] * m.astype(np.float32)).reshape(N, -1).astype(np.float64)
    s = xq.sum(-1)
    dx = dx.astype(np.float64)
    val = isum * a[None] * dx[:, None, :] - c[None] * (dx * s)[:, None, :]
    mag = np.abs(a[None] * dx[:, None, :]) * np.einsum("tbk,nbk->tnb", np.abs(xq), qs) + np.abs(c[None] * (dx * s)[:, None, :])
    return val.sum(-1), mag.sum(-1)


@pytest.mark.parametrize("N,K", NK)
def test_qmatmul_matches_numpy(kern, N, K):
    rng = np.random.default_rng(N * 1000 + K)
    raw = q5_k.quantize_q5_k_ref(_weights(rng, N, K))
    buf = np.full(raw.size + 64, 0xFF, np.uint8)
    buf[:raw.size] = raw.ravel()
    for T in (1, 2, 3, 5, 17, 33):
        for nth in (1, 2):
            x = rng.standard_normal((T, K + 3)).astype(np.float32)
            ldy = N + 2
            y = np.full((T, ldy), -7.0, np.float32)
            acc = int(T % 2 == 1 and nth == 2)
            kern.lib.ifg_matmul(P(kern, y), ldy, P(kern, x), K + 3, P(kern, buf, "void *"), DTYPE["q5_k"],
                                T, N, K, acc, nth)
            want, mag = _ref(raw, np.ascontiguousarray(x[:, :K]))
            want = want - (7.0 if acc else 0.0)
            assert np.all(np.abs(y[:, :N] - want) <= 1e-5 * mag + 1e-6), (T, nth)
            assert np.all(y[:, N:] == -7.0)


def test_qmatmul_deterministic_and_embedding(kern):
    rng = np.random.default_rng(5)
    N, K, T = 131, 4352, 19
    raw = q5_k.quantize_q5_k_ref(rng.standard_normal((N, K)).astype(np.float32))
    x = rng.standard_normal((T, K)).astype(np.float32)
    outs = []
    for nth in (1, 2, 3):
        y = np.zeros((T, N), np.float32)
        kern.lib.ifg_matmul(P(kern, y), N, P(kern, x), K, P(kern, raw, "void *"), DTYPE["q5_k"], T, N, K, 0, nth)
        outs.append(y)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    want = quant.dequantize(raw, "q5_k")
    tokens = np.array([0, 7, N - 1], np.int32)
    out = np.full((4, K), np.nan, np.float32)
    kern.lib.ifg_embed(P(kern, out), P(kern, raw, "void *"), DTYPE["q5_k"], P(kern, tokens, "int32_t *"), 3, K, 2)
    np.testing.assert_array_equal(out[:3], want[tokens])
    assert np.isnan(out[3]).all()
