"""Mixed-adapter LoRA/DoRA kernel vs numpy, every ISA variant, odd sizes, mixed segments, f32 /
bf16 / int8 adapter weights (int8: per-rank scales folded into h_scale, as the manager does; the
rank-space activations h rounded to int8 as the integer expand does, int8_lora_product; bf16_dp,
bf16 weights with bf16 activations: x and h rounded to bf16 as the bf16 dot products take them,
bf16_lora_product)."""
import numpy as np
import pytest

from conftest import P, bf16_bits_to_f32, to_bf16_bits
from infeng.kernels.abi import DTYPE, LORA_I8
from infeng.model.reference import bf16_lora_product, int8_lora_product
from infeng.runtime.adapters import kernel_rank, pack_lora

DT = {"f32": DTYPE["f32"], "bf16": DTYPE["bf16"], "bf16_dp": DTYPE["bf16_dp"], "int8": LORA_I8}


def _int8_rows(m):
    """Symmetric int8 per row: (q, scale) with q * scale[:, None] ≈ m."""
    s = np.abs(m).max(axis=1) / 127.0
    s[s == 0] = 1.0
    return np.clip(np.rint(m / s[:, None]), -127, 127).astype(np.int8), s.astype(np.float32)


def _adapter(kern, rng, N, K, r, dtype, dora):
    a = rng.standard_normal((r, K)).astype(np.float32) * 0.1
    bt = rng.standard_normal((r, N)).astype(np.float32) * 0.1      # Bᵀ [rank][N]
    hs = (rng.random(r).astype(np.float32) + 0.5)                   # LoRA scale per rank row
    ref = {"dtype": dtype}
    if dtype in ("bf16", "bf16_dp"):
        a, bt = to_bf16_bits(a), to_bf16_bits(bt)
        af, bf = bf16_bits_to_f32(a), bf16_bits_to_f32(bt)
    elif dtype == "int8":
        a, sa = _int8_rows(a)
        bt, sb = _int8_rows(bt)
        af, bf = a.astype(np.float32), bt.astype(np.float32)
        hs = (hs * sa * sb).astype(np.float32)
        ref.update(qa=a, qbt=bt)
    else:
        af, bf = a, bt
    d = (rng.random(N).astype(np.float32) + 0.5) if dora else None
    s = kern.ffi.new("struct ifg_lora *")
    a, bt = pack_lora(a, bt, dtype, dtype)                          # the kernels' layouts
    hs_k = np.zeros(kernel_rank(r), np.float32)
    hs_k[:r] = hs
    s.a, s.a_dtype, s.b, s.b_dtype = P(kern, a, "void *"), DT[dtype], P(kern, bt, "void *"), DT[dtype]
    s.rank = kernel_rank(r)
    s.h_scale = P(kern, hs_k)
    s.dora = P(kern, d) if dora else kern.ffi.NULL
    ref.update(af=af.astype(np.float64), bf=bf.astype(np.float64), d=d, hs=hs)
    return s, (a, bt, d, hs_k), ref


def _low_rank(ref, x):
    """The low-rank term numpy expects for rows x, and per row the slack for int8's rounding of h:
    the kernels sum h in another order than numpy, so a value of h within a hair of a rounding
    boundary may round the other way, which moves its row by d_h · |Bᵀ| at most (0 elsewhere)."""
    h = (x.astype(np.float64) @ ref["af"].T) * ref["hs"]
    if ref["dtype"] in ("f32", "bf16"):
        return h @ ref["bf"], np.zeros((len(x), 1))
    if ref["dtype"] == "bf16_dp":   # likewise a value of h on a bf16 rounding boundary: its step · |Bᵀ|
        near = []
        y = bf16_lora_product(x, ref["af"], ref["bf"], ref["hs"], near)
        return y, 1.05 * near[0] @ np.abs(ref["bf"]).max(1, keepdims=True)
    rounded = []
    y = int8_lora_product(x, ref["qa"], ref["qbt"], ref["hs"], rounded)
    near = (np.abs(np.abs(rounded[0]) % 1 - 0.5) < 1e-3).any(1, keepdims=True)
    return y, near * 1.05 * np.abs(h).max(1, keepdims=True) / 127 * np.abs(ref["qbt"]).max()


def _close(y, want, slack, rtol=1e-5, atol=2e-5):
    """|y - want| within rtol, atol (relative to the largest value) and each row's slack."""
    err = np.abs(y.astype(np.float64) - want)
    assert np.all(err <= rtol * np.abs(want) + atol * max(1.0, np.abs(want).max()) + slack), err.max()


@pytest.mark.parametrize("N,K", [(1, 1), (17, 15), (64, 172), (257, 33), (40, 700)])
@pytest.mark.parametrize("dtype", ["f32", "bf16", "bf16_dp", "int8"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_lora_segments_match_numpy(kern, N, K, dtype, threads):
    rng = np.random.default_rng(N * 1000 + K)
    ranks = [1, 4, 7, 16]
    adapters = [_adapter(kern, rng, N, K, r, dtype, dora=(i % 2 == 1)) for i, r in enumerate(ranks)]
    # segments: a, none, b, a again, c (dora), d (long enough for full token tiles)
    seg_lens = [3, 2, 1, 4, 2, 9]
    which = [0, None, 1, 0, 2, 3]
    T = sum(seg_lens)
    starts = np.concatenate([[0], np.cumsum(seg_lens)]).astype(np.int32)
    x = rng.standard_normal((T, K)).astype(np.float32)
    y0 = rng.standard_normal((T, N)).astype(np.float32)
    y = y0.copy()
    sel = kern.ffi.new("struct ifg_lora *[]", [adapters[w][0] if w is not None else kern.ffi.NULL for w in which])
    max_rank = max(ranks)
    h = np.zeros((kern.lib.ifg_lora_h_rows(T, K), max_rank), np.float32)
    kern.lib.ifg_lora_apply(P(kern, y), N, P(kern, x), K, N, K, sel, P(kern, starts, "int32_t *"), len(which),
                            P(kern, h), max_rank, threads)
    want = y0.astype(np.float64).copy()
    slack = np.zeros((T, 1))
    for s, w in enumerate(which):
        if w is None:
            continue
        rows = slice(starts[s], starts[s + 1])
        ref = adapters[w][2]
        delta, slack[rows] = _low_rank(ref, x[rows])
        want[rows] += delta
        if ref["d"] is not None:
            want[rows] *= ref["d"]
            slack[rows] *= ref["d"].max()
    # f32 accumulation over K (and int8 values up to 127 times small scales): relative to the scale
    _close(y, want, slack)
    # rows without an adapter are untouched, bit for bit
    assert np.array_equal(y[starts[1]:starts[2]], y0[starts[1]:starts[2]])


def test_lora_same_bits_for_any_thread_count(kern):
    rng = np.random.default_rng(5)
    N, K, T = 300, 515, 23
    ad = [_adapter(kern, rng, N, K, r, "int8", dora=False) for r in (16, 5)]
    starts = np.array([0, 11, 23], np.int32)
    sel = kern.ffi.new("struct ifg_lora *[]", [ad[0][0], ad[1][0]])
    x = rng.standard_normal((T, K)).astype(np.float32)
    outs = []
    for threads in (1, 2, 3):
        y = np.zeros((T, N), np.float32)
        h = np.zeros((kern.lib.ifg_lora_h_rows(T, K), 16), np.float32)
        kern.lib.ifg_lora_apply(P(kern, y), N, P(kern, x), K, N, K, sel, P(kern, starts, "int32_t *"), 2,
                                P(kern, h), 16, threads)
        outs.append(y)
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def _base_weight(kind, N, K, rng):
    """(C dtype code, buffer) of a random [N][K] base weight in one of the matmul formats."""
    from infeng import quant
    from infeng.quant.interleave import interleave
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.1
    if kind == "f32":
        return DTYPE[kind], w
    if kind == "bf16":
        return DTYPE[kind], to_bf16_bits(w)
    raw = quant.quantize(w, kind.removesuffix("x16"))
    if kind.endswith("x16"):
        return DTYPE[kind], interleave(raw, kind.removesuffix("x16"))
    return DTYPE[kind], raw


@pytest.mark.parametrize("kind,N,K", [("f32", 53, 40), ("bf16", 200, 33), ("q8_0", 70, 64),
                                      ("q8_0x16", 96, 128), ("q4_0x16", 48, 96), ("q4_1", 70, 64),
                                      ("q5_1", 35, 96), ("q6_k", 40, 256), ("q5_k", 24, 512),
                                      ("q4_1x16", 48, 96), ("q5_1x16", 32, 160), ("q4_kx16", 32, 512),
                                      ("q6_kx16", 16, 256)])
@pytest.mark.parametrize("T", [1, 6, 131, 300])
@pytest.mark.parametrize("acc", [0, 1])
@pytest.mark.parametrize("dtype", ["bf16", "bf16_dp", "int8"])
def test_fused_projection_equals_base_then_lora(kern, kind, N, K, T, acc, dtype):
    """ifg_lora_matmul (the base projection with each thread's rows expanded slab by slab) gives
    the bits of ifg_matmul followed by ifg_lora_apply, for every base format, token counts that
    cross slabs, any thread count, and DoRA on a residual (accumulate: through tmp)."""
    rng = np.random.default_rng(N + K + T + acc)
    code, wbuf = _base_weight(kind, N, K, rng)
    ads = [_adapter(kern, rng, N, K, r, dtype, dora=(i == 1)) for i, r in enumerate((16, 8, 5))]
    cuts = sorted(rng.choice(np.arange(1, T), size=min(3, T - 1), replace=False).tolist()) if T > 1 else []
    starts = np.array([0] + cuts + [T] * (4 - len(cuts)), np.int32)[:5]
    starts[-1] = T
    which = [ads[0][0], kern.ffi.NULL, ads[1][0], ads[2][0]]           # one segment without an adapter
    sel = kern.ffi.new("struct ifg_lora *[]", which)
    x = rng.standard_normal((T, K)).astype(np.float32)
    y0 = rng.standard_normal((T, N)).astype(np.float32)
    # reference: base, then the low-rank part; DoRA on a residual scales the projection only
    ref = y0.copy()
    proj = np.zeros((T, N), np.float32)
    kern.lib.ifg_matmul(P(kern, proj), N, P(kern, x), K, P(kern, wbuf, "void *"), code, T, N, K, 0, 1)
    h = np.zeros((kern.lib.ifg_lora_h_rows(T, K), 16), np.float32)
    kern.lib.ifg_lora_apply(P(kern, proj), N, P(kern, x), K, N, K, sel, P(kern, starts, "int32_t *"), 4,
                            P(kern, h), 16, 1)
    ref = ref + proj if acc else proj
    for threads in (1, 2, 3):
        y = y0.copy()
        tmp = np.zeros((T, N), np.float32)
        kern.lib.ifg_lora_matmul(P(kern, y), N, P(kern, x), K, P(kern, wbuf, "void *"), code, T, N, K, acc,
                                 sel, P(kern, starts, "int32_t *"), 4, P(kern, h), 16, P(kern, tmp), threads)
        if T > 1 and not acc:   # the same sums in the same order: the same bits
            assert np.array_equal(y, ref), threads
        else:                   # T == 1 is the GEMV (another order); += rounds base + residual first
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("rank", [5, 20, 36, 72, 130])
@pytest.mark.parametrize("dtype", ["bf16", "bf16_dp", "int8"])
def test_lora_ranks_and_long_segments(kern, rank, dtype):
    """Every shrink tile shape (rank blocks of 1-4 vectors, masked last vectors, 1-12 token tiles),
    several k-chunks (K > 1024), segments long enough for the converted-weights path of the
    expand, and a rank above its limit (130)."""
    rng = np.random.default_rng(rank)
    N, K = 70, 1100
    ads = [_adapter(kern, rng, N, K, r, dtype, dora=False) for r in (rank, 4)]
    starts = np.array([0, 29, 30, 53], np.int32)                    # 29 rows, 1 row, 23 rows
    which = [0, 1, 0]
    T = int(starts[-1])
    x = rng.standard_normal((T, K)).astype(np.float32)
    y0 = rng.standard_normal((T, N)).astype(np.float32)
    want = y0.astype(np.float64).copy()
    slack = np.zeros((T, 1))
    for s, w in enumerate(which):
        rows = slice(starts[s], starts[s + 1])
        delta, slack[rows] = _low_rank(ads[w][2], x[rows])
        want[rows] += delta
    sel = kern.ffi.new("struct ifg_lora *[]", [ads[w][0] for w in which])
    outs = []
    for threads in (1, 2):
        y = y0.copy()
        h = np.zeros((kern.lib.ifg_lora_h_rows(T, K), 132), np.float32)
        kern.lib.ifg_lora_apply(P(kern, y), N, P(kern, x), K, N, K, sel, P(kern, starts, "int32_t *"), 3,
                                P(kern, h), 132, threads)
        _close(y, want, slack)
        outs.append(y)
    assert np.array_equal(outs[0], outs[1])
