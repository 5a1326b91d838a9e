"""Row-count invariance of the int8-activation linear kernels and the LoRA delta, every ISA: row i
of a T-row call has exactly the bits of a 1-row call on that row. Speculative verification (k + 1
rows of a sequence at once) and continuous batching (a sequence's rows beside other sequences')
are exact only because of this, so the comparison is np.array_equal, never a tolerance."""
import numpy as np
import pytest

from conftest import P
from infeng import quant
from infeng.kernels.abi import DTYPE
from infeng.quant.interleave import interleave
from test_kernels_lora import _adapter

TS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 33)
# K below and above 1024 (the x16 kernels' k tile) and 2048 (the row-major kernels' k chunk);
# 4160 makes a 17-token x16 call cut K into tiles while its 1-token call takes it whole
KS = (96, 544, 1056, 2080, 4160)
ROW_MAJOR = ("q8_0", "q4_0", "q5_0", "q4_1", "q5_1")
X16 = ("q8_0x16", "q4_0x16", "q4_1x16", "q5_1x16")


def _weights(kind, N, K, rng):
    w = (rng.standard_normal((N, K)) * np.exp2(rng.integers(-3, 3, (N, 1)))).astype(np.float32)
    raw = quant.quantize(w, kind.removesuffix("x16"))
    return DTYPE[kind], (interleave(raw, kind.removesuffix("x16")) if kind.endswith("x16") else raw)


def _mm(kern, code, w, x, N, acc, y0, threads, xq=False):
    T, K = x.shape
    y = y0.copy()
    if not xq:
        kern.lib.ifg_matmul(P(kern, y), N, P(kern, x), K, P(kern, w, "void *"), code, T, N, K, acc, threads)
        return y
    q = np.zeros((T, K), np.int8)
    d = np.zeros((T, K // 32), np.float32)
    s = np.zeros((T, K // 32), np.int32)
    kern.lib.ifg_quantize_x(P(kern, q, "int8_t *"), P(kern, d), P(kern, s, "int32_t *"), P(kern, x), K,
                            0, T, 0, K, K, K // 32)
    st = kern.ffi.new("struct ifg_xq *")
    st.q, st.d, st.s, st.ldq, st.ldd = P(kern, q, "int8_t *"), P(kern, d), P(kern, s, "int32_t *"), K, K // 32
    kern.lib.ifg_matmul_xq(P(kern, y), N, P(kern, x), K, P(kern, w, "void *"), code, T, N, K, acc, st, threads)
    return y


@pytest.mark.parametrize("kind", ROW_MAJOR + X16)
@pytest.mark.parametrize("K", KS)
def test_rows_independent_of_row_count(kern, kind, K):
    rng = np.random.default_rng(K + len(kind))
    N = 48 if kind in X16 else 40
    code, w = _weights(kind, N, K, rng)
    x = rng.standard_normal((max(TS), K)).astype(np.float32)
    y0 = rng.standard_normal((max(TS), N)).astype(np.float32)
    for acc in (0, 1):
        for xq in ((False, True) if kind in X16 or kind in ("q4_1", "q5_1") else (False,)):
            one = np.concatenate([_mm(kern, code, w, x[i:i + 1], N, acc, y0[i:i + 1], 1, xq) for i in range(max(TS))])
            for T in TS:
                got = _mm(kern, code, w, x[:T], N, acc, y0[:T], 1 + T % 2, xq)
                bad = [i for i in range(T) if not np.array_equal(got[i], one[i])]
                assert not bad, f"{kind} K={K} T={T} acc={acc} xq={xq}: rows {bad} differ from 1-row calls"


# the bases: the x16 kernels (the expand as their epilogue), row-major ones (slab by slab), and
# none (ifg_lora_apply: odd K); the float bases' invariance is matmul.c's
@pytest.mark.parametrize("base,K", [("q8_0", 96), ("q8_0", 1120), ("q8_0x16", 96), ("q8_0x16", 1120),
                                    ("q4_1x16", 1120), ("q4_1", 1120), ("none", 1101), ("none", 37)])
@pytest.mark.parametrize("dtype", ["f32", "bf16", "int8"])
def test_lora_rows_independent_of_neighbours(kern, base, dtype, K):
    """Row i keeps its adapter; the rows around it change in number and adapter (none, others,
    DoRA, the same one in a longer segment). Its output must not change by a bit."""
    rng = np.random.default_rng(K + len(base) + len(dtype))
    N = 48
    code, w = _weights(base, N, K, rng) if base != "none" else (None, None)
    ads = [_adapter(kern, rng, N, K, r, dtype, dora=(i == 2)) for i, r in enumerate((16, 32, 8))]
    X = rng.standard_normal((40, K)).astype(np.float32)
    Y0 = rng.standard_normal((40, N)).astype(np.float32)

    def run(rows, adapters, seg_lens, acc):
        T = len(rows)
        starts = np.concatenate([[0], np.cumsum(seg_lens)]).astype(np.int32)
        sel = kern.ffi.new("struct ifg_lora *[]", [ads[a][0] if a is not None else kern.ffi.NULL for a in adapters])
        x, y = np.ascontiguousarray(X[rows]), np.ascontiguousarray(Y0[rows])
        h = np.zeros((kern.lib.ifg_lora_h_rows(T, K), 32), np.float32)
        tmp = np.zeros((T, N), np.float32)
        if base == "none":      # y += the low-rank part alone
            kern.lib.ifg_lora_apply(P(kern, y), N, P(kern, x), K, N, K, sel, P(kern, starts, "int32_t *"),
                                    len(adapters), P(kern, h), 32, 1 + T % 2)
        else:
            kern.lib.ifg_lora_matmul(P(kern, y), N, P(kern, x), K, P(kern, w, "void *"), code, T, N, K, acc, sel,
                                     P(kern, starts, "int32_t *"), len(adapters), P(kern, h), 32, P(kern, tmp),
                                     1 + T % 2)
        return y

    target, mine = 0, 0                                               # row 0 of X, adapter 0
    for acc in ((0, 1) if base != "none" else (1,)):
        alone = run([target], [mine], [1], acc)[0]
        for n_before, n_same, n_after, others in ((0, 3, 0, []), (2, 1, 3, [1, None]), (5, 6, 12, [2, 1]),
                                                  (1, 0, 7, [None]), (8, 24, 1, [1])):
            rows = list(range(1, 1 + n_before)) + [target] + list(range(10, 10 + n_same)) + \
                list(range(20, 20 + n_after))
            adapters, lens = [], []
            if n_before:
                adapters.append(others[0] if others else None)
                lens.append(n_before)
            adapters.append(mine)
            lens.append(1 + n_same)
            if n_after:
                adapters.append(others[-1] if others else 2)
                lens.append(n_after)
            got = run(rows, adapters, lens, acc)[n_before]
            assert np.array_equal(got, alone), (base, dtype, K, acc, n_before, n_same, n_after)
