"""Mixed-adapter LoRA/DoRA kernel vs numpy, every ISA variant, odd sizes, mixed segments."""
import numpy as np
import pytest

from conftest import P, bf16_bits_to_f32, to_bf16_bits

DT = {"f32": 0, "bf16": 1}


def _adapter(kern, rng, N, K, r, dtype, dora):
    a = rng.standard_normal((r, K)).astype(np.float32) * 0.1
    b = rng.standard_normal((N, r)).astype(np.float32) * 0.1
    if dtype == "bf16":
        a, b = to_bf16_bits(a), to_bf16_bits(b)
    d = (rng.random(N).astype(np.float32) + 0.5) if dora else None
    s = kern.ffi.new("struct ifg_lora *")
    s.a, s.a_dtype, s.b, s.b_dtype, s.rank = P(kern, a, "void *"), DT[dtype], P(kern, b, "void *"), DT[dtype], r
    s.dora = P(kern, d) if dora else kern.ffi.NULL
    af = bf16_bits_to_f32(a) if dtype == "bf16" else a
    bf = bf16_bits_to_f32(b) if dtype == "bf16" else b
    return s, (a, b, d), (af.astype(np.float64), bf.astype(np.float64), d)


@pytest.mark.parametrize("N,K", [(1, 1), (17, 15), (64, 172), (257, 33)])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_lora_segments_match_numpy(kern, N, K, dtype, threads):
    rng = np.random.default_rng(N * 1000 + K)
    ranks = [1, 4, 7, 16]
    adapters = [_adapter(kern, rng, N, K, r, dtype, dora=(i % 2 == 1)) for i, r in enumerate(ranks)]
    # segments: a, none, b, a again, c (dora), d
    seg_lens = [3, 2, 1, 4, 2, 5]
    which = [0, None, 1, 0, 2, 3]
    T = sum(seg_lens)
    starts = np.concatenate([[0], np.cumsum(seg_lens)]).astype(np.int32)
    x = rng.standard_normal((T, K)).astype(np.float32)
    y0 = rng.standard_normal((T, N)).astype(np.float32)
    y = y0.copy()
    sel = kern.ffi.new("struct ifg_lora *[]", [adapters[w][0] if w is not None else kern.ffi.NULL for w in which])
    max_rank = max(ranks)
    h = np.zeros((T, max_rank), np.float32)
    kern.lib.ifg_lora_apply(P(kern, y), N, P(kern, x), K, N, K, sel, P(kern, starts, "int32_t *"), len(which),
                            P(kern, h), max_rank, threads)
    want = y0.astype(np.float64).copy()
    for s, w in enumerate(which):
        if w is None:
            continue
        rows = slice(starts[s], starts[s + 1])
        af, bf, d = adapters[w][2]
        want[rows] += (x[rows].astype(np.float64) @ af.T) @ bf.T
        if d is not None:
            want[rows] *= d
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()))
    # rows without an adapter are untouched, bit for bit
    assert np.array_equal(y[starts[1]:starts[2]], y0[starts[1]:starts[2]])
