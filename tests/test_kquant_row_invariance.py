"""Row-count invariance of the K-quant x16 kernels (q4_kx16, q5_kx16, q6_kx16), every ISA:
a token's output of a T-token call is bitwise the 1-token call's, whatever T, the token's
position in the batch, the register tile that takes it, the K chunking of large batches, the
thread count, x quantized by the kernel or shared (ifg_xq), and y written or accumulated.
Speculative decoding relies on it (a drafted token's logits must be the ones plain decoding
computes)."""
import numpy as np
import pytest

from conftest import P
from infeng import quant
from infeng.kernels.abi import DTYPE
from infeng.quant.interleave import interleave

QTYPES = ("q4_k", "q5_k", "q6_k")
TS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33, 70, 137)   # >= 16: the repacking tiles; 137 > 128: x tiles of a shared xq
N, K = 48, 2304          # 33 tokens × 2304 k exceed one x tile: the batch goes in K chunks


def _packed(qtype):
    rng = np.random.default_rng(len(qtype) + ord(qtype[1]))
    w = (rng.standard_normal((N, K)) * np.exp2(rng.integers(-4, 4, (N, 1))) + 0.05).astype(np.float32)
    return np.ascontiguousarray(interleave(quant.quantize(w, qtype), qtype))


def _xq(kern, x):
    ffi, T = kern.ffi, x.shape[0]
    q, d, s = np.zeros((T, K), np.int8), np.zeros((T, K // 32), np.float32), np.zeros((T, K // 32), np.int32)
    xq = ffi.new("struct ifg_xq *", {"q": ffi.cast("int8_t *", ffi.from_buffer(q)), "d": P(kern, d),
                                     "s": ffi.cast("int32_t *", ffi.from_buffer(s)), "ldq": K, "ldd": K // 32})
    kern.lib.ifg_quantize_x(xq.q, xq.d, xq.s, P(kern, x), K, 0, T, 0, K, K, K // 32)
    return xq, (q, d, s)


def _call(kern, w, code, x, y0, acc, nth, shared):
    y = np.ascontiguousarray(y0[:x.shape[0]]).copy()
    if shared:
        xq, keep = _xq(kern, x)
        kern.lib.ifg_matmul_xq(P(kern, y), N, P(kern, x), K, P(kern, w, "void *"), code, x.shape[0], N, K, acc, xq, nth)
    else:
        kern.lib.ifg_matmul(P(kern, y), N, P(kern, x), K, P(kern, w, "void *"), code, x.shape[0], N, K, acc, nth)
    return y


@pytest.mark.parametrize("qtype", QTYPES)
def test_rows_bitwise_independent_of_batch(kern, qtype):
    w = _packed(qtype)
    code = DTYPE[qtype + "x16"]
    rng = np.random.default_rng(7)
    xs = rng.standard_normal((max(TS), K)).astype(np.float32)
    y0 = rng.standard_normal((max(TS), N)).astype(np.float32)
    for acc, nth, shared in ((0, 1, False), (1, 2, True), (0, 2, False), (1, 1, False)):
        one = np.stack([_call(kern, w, code, xs[i:i + 1], y0[i:i + 1], acc, nth, shared)[0] for i in range(max(TS))])
        for T in TS:
            off = 2 * T % 5                                        # the tokens come from odd offsets of xs
            idx = (np.arange(T) * 3 + off) % max(TS)
            got = _call(kern, w, code, np.ascontiguousarray(xs[idx]), np.ascontiguousarray(y0[idx]), acc, nth, shared)
            for i in range(T):
                assert np.array_equal(got[i], one[idx[i]]), (qtype, T, i, acc, nth, shared)
