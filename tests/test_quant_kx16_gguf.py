"""The 16-row interleaved q6_kx16 / q5_kx16 layouts (infeng.quant.interleave) and their kernels,
every ISA variant: the layouts round-trip to GGUF bytes, the C repack is the numpy one, the
products match the float64 references of the plain types' tests (x quantized as the kernels do)
for decode and prefill shapes, with x quantized by the kernel or shared (ifg_xq, as forward.c
passes it), and are bitwise the same for any thread count."""
import numpy as np
import pytest

from conftest import P
from infeng.errors import InfengError
from infeng.kernels.abi import DTYPE
from infeng.quant import q5_k, q6_k
from infeng.quant.interleave import INTERLEAVED, deinterleave, interleave, interleave_c
import test_quant_q5_k
import test_quant_q6_k

QTYPES = {"q6_k": (q6_k.quantize_q6_k_ref, test_quant_q6_k._ref), "q5_k": (q5_k.quantize_q5_k_ref, test_quant_q5_k._ref)}
NK = [(16, 256), (48, 512), (80, 2304), (32, 5632)]


def _raw(qtype, N, K, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * np.exp2(rng.integers(-4, 4, (N, 1)))).astype(np.float32)
    w[0, :256] = 0                                                 # an all-zero block
    return QTYPES[qtype][0](w)


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_interleave_round_trip(qtype):
    raw = _raw(qtype, 48, 512, 1)
    packed = interleave(raw, qtype)
    assert packed.shape == (3, raw.size // 3) and packed.dtype == np.uint8
    np.testing.assert_array_equal(deinterleave(packed, qtype), raw)
    with pytest.raises(InfengError):
        interleave(raw[:40], qtype)


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_c_interleave_equals_numpy(kern, qtype):
    raw = _raw(qtype, 80, 1024, 2)
    for threads in (1, 3):
        np.testing.assert_array_equal(interleave_c(kern, raw, qtype, threads), interleave(raw, qtype))


def test_q6_kx16_layout_by_hand():
    """Spot-check the documented byte positions (quant_gguf.h)."""
    raw = _raw("q6_k", 16, 256, 3)
    d, sc, q = q6_k.levels(raw)
    p = interleave(raw, "q6_k")[0]
    for r, k in ((0, 0), (3, 5), (15, 255), (9, 18), (2, 100), (7, 44)):
        assert p[:32].view(np.float16)[r] == np.float16(d[r, 0])
        assert p[32 + 16 * (k // 16) + r].view(np.int8) == sc[r, 0, k // 16]
        c, e = k // 32, k % 32
        lo = p[288 + 256 * c + 64 * (e // 8) + 4 * r + e % 4]
        hb = p[2336 + 128 * c + 64 * (e % 8 // 4) + 4 * r + e % 4]
        assert ((lo & 15) if e % 8 < 4 else lo >> 4) | ((hb >> (2 * (e // 8))) & 3) << 4 == q[r, 0, k]


def _run(kern, buf, dtype, x, T, N, K, ldy, acc, nth, shared):
    y = np.full((T, ldy), -7.0, np.float32)
    if shared:                                                     # x quantized once, as forward.c does
        ffi = kern.ffi
        q = np.zeros((T, K), np.int8)
        d = np.zeros((T, K // 32), np.float32)
        s = np.zeros((T, K // 32), np.int32)
        xq = ffi.new("struct ifg_xq *", {"q": ffi.cast("int8_t *", ffi.from_buffer(q)), "d": P(kern, d),
                                         "s": ffi.cast("int32_t *", ffi.from_buffer(s)), "ldq": K, "ldd": K // 32})
        kern.lib.ifg_quantize_x(xq.q, xq.d, xq.s, P(kern, x), x.shape[1], 0, T, 0, K, K, K // 32)
        kern.lib.ifg_matmul_xq(P(kern, y), ldy, P(kern, x), x.shape[1], P(kern, buf, "void *"), dtype, T, N, K, acc, xq, nth)
    else:
        kern.lib.ifg_matmul(P(kern, y), ldy, P(kern, x), x.shape[1], P(kern, buf, "void *"), dtype, T, N, K, acc, nth)
    return y


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("N,K", NK)
def test_x16_matmul_matches_numpy(kern, qtype, N, K):
    raw = _raw(qtype, N, K, N * 1000 + K)
    packed = interleave(raw, qtype)
    buf = np.full(packed.size + 64, 0xFF, np.uint8)                # junk after W: never read
    buf[:packed.size] = packed.ravel()
    rng = np.random.default_rng(K)
    for T in (1, 2, 7, 9, 17, 70):
        x = rng.standard_normal((T, K + 3)).astype(np.float32)     # ldx > K
        want, mag = QTYPES[qtype][1](raw, np.ascontiguousarray(x[:, :K]))
        for nth, shared in ((1, False), (2, False), (2, True)):
            acc = int(T % 2 == 1 and nth == 2)
            y = _run(kern, buf, DTYPE[INTERLEAVED[qtype]], x, T, N, K, N + 5, acc, nth, shared)
            w = want - (7.0 if acc else 0.0)
            assert np.all(np.abs(y[:, :N] - w) <= 1e-5 * mag + 1e-6), (T, nth, shared)
            assert np.all(y[:, N:] == -7.0)


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_x16_deterministic_across_threads(kern, qtype):
    N, K, T = 96, 2816, 19
    raw = _raw(qtype, N, K, 5)
    packed = interleave(raw, qtype)
    x = np.random.default_rng(6).standard_normal((T, K)).astype(np.float32)
    outs = [_run(kern, packed, DTYPE[INTERLEAVED[qtype]], x, T, N, K, N, 0, nth, False) for nth in (1, 2, 3)]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    shared = _run(kern, packed, DTYPE[INTERLEAVED[qtype]], x, T, N, K, N, 0, 2, True)
    np.testing.assert_array_equal(shared, outs[0])
