"""ifg_matmul (y (=|+=) x · Wᵀ) for every ISA variant × weight dtype × odd shapes, against a
float64 reference computed on the exactly dequantized weights.

Tolerance, |y - ref| <= 1e-5 * sum_k |x_k * w_k| + 1e-6, the same for every path built:
f32, bf16 and f16 weights all convert to f32 exactly, so the only error is the f32 rounding of
products and sums (u = 2^-24 each). Per path, the longest chain of roundings an output sees:
  - scalar reference: one sequential sum over k, K adds (<= 2100 here);
  - AVX2 / AVX-512 (GEMV and GEMM): K/8 or K/16 adds per lane, k-blocks of 1024 added
    through y, then a 3- or 4-level reduction tree.
The errors are sums of independently signed roundings, ~sqrt(chain) * u relative to
sum|x*w|: observed at most 3.4e-7 (scalar, K=1000..2100) and 1.2e-7 (SIMD), a margin of
30x or more. (The vdpbf16ps hi/lo path, which would have needed ~2^-15 because x is then
exact only to ~2^-16, was measured slower and is not built.)
bf16_dp (bf16 weights, x rounded to bf16: vdpbf16ps on AVX-512) is held to the same bound
against the reference on the rounded x: the products of two bf16 values are exact in f32.
"""
import numpy as np
import pytest

from conftest import P, bf16_bits_to_f32, to_bf16_bits

from infeng.kernels.abi import DTYPE

WTYPE = {"f32": 0, "bf16": 1, "f16": 2, "bf16_dp": DTYPE["bf16_dp"]}
TS = (1, 2, 3, 5, 17, 65)
NK = [(1, 1), (3, 7), (17, 15), (33, 31), (65, 63), (172, 64), (64, 172), (257, 129), (31, 1000)]
THREADS = (1, 2, 3)
REL, ABS = 1e-5, 1e-6
Y_SENTINEL = np.float32(-12345.5)  # padding of y (columns >= N, rows >= T) must keep it
NAN_BITS = {"f32": None, "bf16": 0x7FC0, "f16": 0x7E00, "bf16_dp": 0x7FC0}


def x_as_used(x, dtype):
    """x as the kernel multiplies it, in float64 (bf16_dp: rounded to bf16)."""
    return (bf16_bits_to_f32(to_bf16_bits(x)) if dtype == "bf16_dp" else x).astype(np.float64)


def make_weights(dtype, N, K, rng):
    """(buffer for the kernel, float64 dequantized [N][K]). The buffer has NaN after the
    matrix, so any read past the last row shows up in the result."""
    w = rng.standard_normal((N, K)).astype(np.float32)
    w *= np.exp2(rng.integers(-4, 5, size=(N, 1))).astype(np.float32)  # varied row magnitudes
    if dtype == "f32":
        buf = np.full(N * K + 64, np.nan, dtype=np.float32)
        buf[: N * K] = w.ravel()
        return buf, w.astype(np.float64)
    if dtype in ("bf16", "bf16_dp"):
        bits = to_bf16_bits(w)
        deq = bf16_bits_to_f32(bits)
    else:
        w[:, ::7] *= np.float32(1e-5)  # some f16 subnormals
        bits = w.astype(np.float16).view(np.uint16)
        deq = bits.view(np.float16).astype(np.float32)
    buf = np.full(N * K + 64, NAN_BITS[dtype], dtype=np.uint16)
    buf[: N * K] = bits.ravel()
    return buf, deq.astype(np.float64)


def make_x(T, K, ldx, rng):
    """x rows of K values in rows of ldx floats; the padding is NaN (must not be read)."""
    x = np.full((T, ldx), np.nan, dtype=np.float32)
    x[:, :K] = rng.standard_normal((T, K)).astype(np.float32)
    return x


def call(kern, y, ldy, x, ldx, wbuf, dtype, T, N, K, acc, nth):
    kern.lib.ifg_matmul(P(kern, y), ldy, P(kern, x), ldx, P(kern, wbuf, "void *"), WTYPE[dtype],
                        T, N, K, acc, nth)


def check_case(kern, dtype, wbuf, w64, T, N, K, acc, nth, pad, rng):
    ldx, ldy = (K + 5, N + 3) if pad else (K, N)
    x = make_x(T, K, ldx, rng)
    y = np.full((T + 1, ldy), Y_SENTINEL, dtype=np.float32)  # one extra row of padding
    y0 = rng.standard_normal((T, N)).astype(np.float32) if acc else np.full((T, N), np.nan, np.float32)
    y[:T, :N] = y0
    call(kern, y, ldy, x, ldx, wbuf, dtype, T, N, K, acc, nth)

    x64 = x_as_used(x[:, :K], dtype)
    ref = x64 @ w64.T + (y0.astype(np.float64) if acc else 0.0)
    bound = REL * (np.abs(x64) @ np.abs(w64).T) + ABS
    err = np.abs(y[:T, :N].astype(np.float64) - ref)
    where = f"{kern.ffi.string(kern.lib.ifg_isa()).decode()} {dtype} T={T} N={N} K={K} acc={acc} threads={nth} pad={pad}"
    assert np.all(np.isfinite(y[:T, :N])), where
    assert np.all(err <= bound), f"{where}: max err/bound {np.max(err / bound):.3g}"
    # nothing outside [T, N] is touched
    assert np.all(y[:T, N:] == Y_SENTINEL) and np.all(y[T] == Y_SENTINEL), where


@pytest.mark.parametrize("N,K", NK)
@pytest.mark.parametrize("dtype", list(WTYPE))
def test_matmul_matches_reference(kern, dtype, N, K):
    rng = np.random.default_rng(1000 * N + K + 7 * WTYPE[dtype])
    wbuf, w64 = make_weights(dtype, N, K, rng)
    for T in TS:
        for acc in (0, 1):
            for nth in THREADS:
                check_case(kern, dtype, wbuf, w64, T, N, K, acc, nth, pad=(nth != 1), rng=rng)


@pytest.mark.parametrize("dtype", list(WTYPE))
def test_matmul_blocked_deterministic(kern, dtype):
    """Sizes that cross every block boundary (several token blocks, row blocks, k-blocks with
    a tail): correct, bitwise repeatable, and the same for any thread count."""
    rng = np.random.default_rng(5)
    N, K = 300, 2100
    wbuf, w64 = make_weights(dtype, N, K, rng)
    for T in (1, 100):
        x = make_x(T, K, K, rng)
        outs = []
        for nth in THREADS:
            for _ in range(2):
                y = np.full((T, N), np.nan, dtype=np.float32)
                call(kern, y, N, x, K, wbuf, dtype, T, N, K, 0, nth)
                outs.append(y)
        for y in outs[1:]:
            assert np.array_equal(y.view(np.uint32), outs[0].view(np.uint32)), (dtype, T)
        x64 = x_as_used(x, dtype)
        err = np.abs(outs[0] - x64 @ w64.T)
        assert np.all(err <= REL * (np.abs(x64) @ np.abs(w64).T) + ABS), (dtype, T)


def test_matmul_empty_k_and_sizes(kern):
    w = np.zeros(4, dtype=np.float32)
    x = np.zeros((3, 4), dtype=np.float32)
    y = np.full((3, 5), 2.0, dtype=np.float32)
    call(kern, y, 5, x, 4, w, "f32", 3, 5, 0, 1, 2)  # K = 0, accumulate: unchanged
    assert np.all(y == 2.0)
    call(kern, y, 5, x, 4, w, "f32", 3, 5, 0, 0, 2)  # K = 0: empty sum
    assert np.all(y == 0.0)
    y[:] = 3.0
    call(kern, y, 5, x, 4, w, "f32", 0, 5, 4, 0, 2)  # T = 0 / N = 0: nothing
    call(kern, y, 5, x, 4, w, "f32", 3, 0, 4, 0, 2)
    assert np.all(y == 3.0)


ROW_TS = tuple(range(1, 10)) + (17, 33)


@pytest.mark.parametrize("K", (333, 1037))
@pytest.mark.parametrize("dtype", list(WTYPE))
def test_rows_independent_of_batch(kern, dtype, K):
    """A row's outputs are bitwise the same whatever the number of rows in the call, its place in
    it and the thread count: the GEMV (T = 1) and the GEMM (any T, any split into tiles) sum each
    output in the same order. Speculative decoding's exactness rests on it (the verify step sees
    T rows where plain decoding sees 1). Odd K: a K tail; 1037 also crosses a k-block."""
    rng = np.random.default_rng(11 + K)
    N = 37
    wbuf, _ = make_weights(dtype, N, K, rng)
    x = make_x(max(ROW_TS), K, K, rng)
    y0 = rng.standard_normal((max(ROW_TS), N)).astype(np.float32)
    for acc in (0, 1):
        alone = np.empty((max(ROW_TS), N), np.float32)
        for t in range(max(ROW_TS)):
            y1 = y0[t:t + 1].copy() if acc else np.full((1, N), np.nan, np.float32)
            call(kern, y1, N, x[t:], K, wbuf, dtype, 1, N, K, acc, 1)
            alone[t] = y1[0]
        for T in ROW_TS:
            for t0 in sorted({0, max(ROW_TS) - T}):
                for nth in (1, 2):
                    y = y0[t0:t0 + T].copy() if acc else np.full((T, N), np.nan, np.float32)
                    call(kern, y, N, x[t0:], K, wbuf, dtype, T, N, K, acc, nth)
                    same = y.view(np.uint32) == alone[t0:t0 + T].view(np.uint32)
                    assert same.all(), (f"{kern.ffi.string(kern.lib.ifg_isa()).decode()} {dtype} K={K} acc={acc} "
                                        f"T={T} from row {t0} threads={nth}: rows {sorted(set((np.nonzero(~same)[0] + t0).tolist()))} "
                                        f"differ from the same rows computed alone")
