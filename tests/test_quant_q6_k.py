"""q6_k (GGUF Q6_K, infeng.quant.q6_k): the C quantizer of every ISA build against the numpy
reference byte for byte, the layout against the GGUF reader's independent dequantizer, and the
matmul kernels and embedding lookups of every ISA variant against numpy. (llama.cpp's own
quantizer: tests/test_gguf_kquant_native.py.)"""
import numpy as np
import pytest

from conftest import P
from infeng import quant
from infeng.converters import gguf_types
from infeng.kernels.abi import DTYPE as CDTYPE
from infeng.quant import q6_k

NK = [(1, 256), (3, 512), (17, 256), (33, 768), (64, 2304), (7, 4352)]


def _weights(rng, N, K):
    w = (rng.standard_normal((N, K)) * np.exp2(rng.integers(-6, 4, (N, 1)))).astype(np.float32)
    w[0, :256] = 0.0                                    # an all-zero super-block
    if N > 1:
        w[1, 16:32] = 0.0                               # an all-zero group of 16
        w[1, 32:48] = 1e-20                             # below ggml's group epsilon
    return w


def test_c_quantizer_is_the_numpy_reference(kern):
    rng = np.random.default_rng(0)
    for N, K in ((5, 256), (13, 1024)):
        x = _weights(rng, N, K)
        x[2, 200] = 40.0                                # an outlier: its group's scale dominates
        want = q6_k.quantize_q6_k_ref(x)
        for nth in (1, 2):
            got = np.empty_like(want)
            kern.lib.ifg_quantize_q6_k(P(kern, got, "uint8_t *"), P(kern, x), N, K, nth)
            np.testing.assert_array_equal(got, want)


def test_layout_matches_the_gguf_dequantizer():
    """Our dequantizer against gguf_types.dequantize_q6_k, written from ggml's block layout."""
    rng = np.random.default_rng(1)
    raw = q6_k.quantize_q6_k_ref(_weights(rng, 6, 512))
    for r in range(6):
        np.testing.assert_array_equal(q6_k.dequantize_q6_k(raw)[r], gguf_types.dequantize_q6_k(raw[r], 512))
    # and random bytes (every level and scale pattern), finite scales
    raw = rng.integers(0, 256, (3, 2 * 210), dtype=np.uint8)
    raw.reshape(3, 2, 210)[..., 208:210] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    for r in range(3):
        np.testing.assert_array_equal(q6_k.dequantize_q6_k(raw)[r], gguf_types.dequantize_q6_k(raw[r], 512))


def test_round_trip_error():
    """Per group of 16, the error is at most half a step d*|sc| where nothing clips (plus the
    fp16/int8 rounding of the scale: levels are recomputed with the rounded scale, so half a
    step holds exactly for unclipped elements); all-zero blocks stay zero."""
    rng = np.random.default_rng(2)
    x = _weights(rng, 9, 1024)
    raw = q6_k.quantize_q6_k_ref(x)
    y = quant.dequantize(raw, "q6_k")
    d, sc, q = q6_k.levels(raw)
    step = np.repeat(np.abs(d[..., None] * sc.astype(np.float32)), 16, axis=-1).reshape(9, -1)
    ql = q.reshape(9, -1)
    unclipped = (ql > 0) & (ql < 63)
    err = np.abs(y - x)
    assert np.all((err <= step / 2 * (1 + 1e-6) + 1e-30)[unclipped])
    assert np.all(y[0, :256] == 0)
    rel = np.sqrt(((y - x) ** 2).sum() / (x ** 2).sum())
    assert rel < 0.02, rel                             # 6 bits: ~1% relative RMS on Gaussian rows


def _ref(raw, x):
    """float64 reference with x quantized as the kernels do, and the tolerance's magnitude."""
    d, sc, q = q6_k.levels(raw)
    N = raw.shape[0]
    xq, dx = quant.quantize_activations(x)
    T = x.shape[0]
    xq = xq.reshape(T, -1, 16).astype(np.float64)                                   # [T, groups, 16]
    qs = (q.astype(np.float64) - 32).reshape(N, -1, 16)
    isum = np.einsum("tgk,ngk->tng", xq, qs)
    ds = (d[..., None] * sc.astype(np.float32)).reshape(N, -1).astype(np.float32)   # [N, groups]
    dxg = np.repeat(dx, 2, axis=1)                                                  # [T, groups]
    scale = (ds[None].astype(np.float32) * dxg[:, None, :].astype(np.float32)).astype(np.float64)
    mag = np.abs(scale) * np.einsum("tgk,ngk->tng", np.abs(xq), np.abs(qs))
    return (isum * scale).sum(-1), mag.sum(-1)


@pytest.mark.parametrize("N,K", NK)
def test_qmatmul_matches_numpy(kern, N, K):
    rng = np.random.default_rng(N * 1000 + K)
    raw = q6_k.quantize_q6_k_ref(_weights(rng, N, K))
    buf = np.full(raw.size + 64, 0xFF, np.uint8)
    buf[:raw.size] = raw.ravel()
    for T in (1, 2, 3, 5, 17, 33):
        for nth in (1, 2):
            x = rng.standard_normal((T, K + 3)).astype(np.float32)
            ldy = N + 2
            y = np.full((T, ldy), -7.0, np.float32)
            acc = int(T % 2 == 1 and nth == 2)
            kern.lib.ifg_matmul(P(kern, y), ldy, P(kern, x), K + 3, P(kern, buf, "void *"), CDTYPE["q6_k"],
                                T, N, K, acc, nth)
            want, mag = _ref(raw, np.ascontiguousarray(x[:, :K]))
            want = want - (7.0 if acc else 0.0)
            assert np.all(np.abs(y[:, :N] - want) <= 1e-5 * mag + 1e-6), (T, nth)
            assert np.all(y[:, N:] == -7.0)


def test_qmatmul_deterministic_across_threads(kern):
    rng = np.random.default_rng(5)
    N, K, T = 131, 4352, 19
    raw = q6_k.quantize_q6_k_ref(rng.standard_normal((N, K)).astype(np.float32))
    x = rng.standard_normal((T, K)).astype(np.float32)
    outs = []
    for nth in (1, 2, 3):
        y = np.zeros((T, N), np.float32)
        kern.lib.ifg_matmul(P(kern, y), N, P(kern, x), K, P(kern, raw, "void *"), CDTYPE["q6_k"], T, N, K, 0, nth)
        outs.append(y)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    y1 = np.zeros((1, N), np.float32)
    kern.lib.ifg_matmul(P(kern, y1), N, P(kern, x), K, P(kern, raw, "void *"), CDTYPE["q6_k"], 1, N, K, 0, 2)
    np.testing.assert_array_equal(y1[0], outs[0][0])


def test_embedding_lookup_is_dequantize(kern):
    rng = np.random.default_rng(7)
    vocab, dim = 41, 512
    raw = q6_k.quantize_q6_k_ref(rng.standard_normal((vocab, dim)).astype(np.float32))
    want = quant.dequantize(raw, "q6_k")
    for T, nth in ((1, 1), (9, 2)):
        tokens = rng.integers(0, vocab, size=T).astype(np.int32)
        tokens[-1] = vocab - 1
        out = np.full((T + 1, dim), np.nan, np.float32)
        kern.lib.ifg_embed(P(kern, out), P(kern, raw, "void *"), CDTYPE["q6_k"], P(kern, tokens, "int32_t *"), T, dim, nth)
        np.testing.assert_array_equal(out[:T], want[tokens])
        assert np.isnan(out[T]).all()
