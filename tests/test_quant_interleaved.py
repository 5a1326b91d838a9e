"""The 16-row interleaved q8_0x16 / q4_0x16 layouts (infeng.quant.interleave) and their matmul
kernels, every ISA variant, against the float64 reference of test_quant (same tolerance: the
kernels quantize x exactly as ``quantize_activations``; only the f32 rounding of the block
scale products and of the sums differs)."""
import numpy as np
import pytest

from conftest import P
from infeng import quant
from infeng.errors import InfengError
from infeng.kernels.abi import DTYPE
from infeng.quant.interleave import deinterleave, interleave, interleave_c
from test_quant import _ref

QX = {"q8_0": 5, "q4_0": 6}
TS = (1, 3, 7, 17, 50, 70)
NK = [(16, 32), (48, 96), (80, 2080), (32, 1056), (16, 4160)]


def _weights(qtype, N, K, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * np.exp2(rng.integers(-4, 4, (N, 1)))).astype(np.float32)
    return quant.quantize(w, qtype)


@pytest.mark.parametrize("qtype", list(QX))
def test_interleave_round_trip(qtype):
    raw = _weights(qtype, 48, 160, 1)
    packed = interleave(raw, qtype)
    assert packed.shape == (3, raw.size // 3) and packed.dtype == np.uint8
    np.testing.assert_array_equal(deinterleave(packed, qtype), raw)
    with pytest.raises(InfengError):
        interleave(raw[:40], qtype)                                  # rows not a multiple of 16


@pytest.mark.parametrize("qtype", list(QX))
def test_c_interleave_equals_numpy(kern, qtype):
    raw = _weights(qtype, 80, 2080, 2)
    for threads in (1, 3):
        np.testing.assert_array_equal(interleave_c(kern, raw, qtype, threads), interleave(raw, qtype))
    with pytest.raises(InfengError):
        interleave_c(kern, raw[:40], qtype)


def test_interleave_layout_by_hand():
    """Spot-check the documented byte positions (quant.h) on known weights."""
    q = np.arange(16 * 32).reshape(16, 32) % 15 - 7                  # row r, k → small ints
    raw = quant.quantize_q8_0(q.astype(np.float32))
    d = raw[:, :2].copy().view(np.float16)[:, 0]
    p = interleave(raw, "q8_0")[0]
    for r, k in ((0, 0), (3, 5), (15, 31), (9, 18)):
        assert p[:32].view(np.float16)[r] == d[r]
        assert np.int16(p[32 + 64 * (k // 4) + 4 * r + k % 4]) - 128 == raw[r, 2 + k].view(np.int8)
    raw4 = quant.quantize_q4_0(q.astype(np.float32))
    p4 = interleave(raw4, "q4_0")[0]
    nib = np.concatenate([raw4[:, 2:] & 15, raw4[:, 2:] >> 4], 1)     # [16][32] q of k
    for r, k in ((0, 0), (3, 5), (15, 31), (9, 18), (2, 12)):
        by = p4[32 + 64 * (k // 8) + 4 * r + k % 4]
        assert (by & 15 if k % 8 < 4 else by >> 4) == nib[r, k]


@pytest.mark.parametrize("qtype", list(QX))
@pytest.mark.parametrize("N,K", NK)
def test_x16_matmul_matches_numpy(kern, qtype, N, K):
    raw = _weights(qtype, N, K, N * 1000 + K)
    packed = interleave(raw, qtype)
    buf = np.full(packed.size + 64, 0xFF, np.uint8)                # junk after W: never read
    buf[:packed.size] = packed.ravel()
    rng = np.random.default_rng(K)
    for T in TS:
        x = rng.standard_normal((T, K + 3)).astype(np.float32)     # ldx > K
        xs = np.ascontiguousarray(x[:, :K])
        want, mag = _ref(raw, qtype, xs)
        for nth in (1, 2):
            ldy = N + 5
            y = np.full((T, ldy), -7.0, np.float32)
            acc = int(T % 2 == 1 and nth == 2)
            kern.lib.ifg_matmul(P(kern, y), ldy, P(kern, x), K + 3, P(kern, buf, "void *"), QX[qtype],
                                T, N, K, acc, nth)
            got = y[:, :N].astype(np.float64)
            exp = want - 7.0 if acc else want
            assert np.all(np.abs(got - exp) <= 1e-5 * mag + 1e-6), (T, nth)
            assert np.all(y[:, N:] == -7.0)


@pytest.mark.parametrize("qtype", list(QX))
def test_x16_deterministic_across_threads(kern, qtype):
    N, K, T = 208, 4160, 19
    packed = interleave(_weights(qtype, N, K, 5), qtype)
    x = np.random.default_rng(6).standard_normal((T, K)).astype(np.float32)
    outs = []
    for nth in (1, 2, 3):
        y = np.zeros((T, N), np.float32)
        kern.lib.ifg_matmul(P(kern, y), N, P(kern, x), K, P(kern, packed, "void *"), QX[qtype], T, N, K, 0, nth)
        outs.append(y)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_bench_case_runs_the_model_layout(kern):
    from infeng.bench import micro
    case = micro.matmul_case(kern, "q4_0", "48x64", 3, 1)
    assert case.name == "gemm3 q4_0x16 48x64"
    case.run()
    assert micro.matmul_case(kern, "q8_0", "40x64", 1, 1).name == "gemv q8_0 40x64"   # 40 rows: plain
    with pytest.raises(InfengError, match="multiple of 16"):
        micro.random_weight("q8_0x16", 40, 64)


# --- q4_k: the 16-row interleaved q4_kx16 layout ---------------------------------------------

Q4_KX16 = 9
NK_K = [(16, 256), (48, 768), (80, 2816), (32, 5632)]


def _weights_k(N, K, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * np.exp2(rng.integers(-4, 4, (N, 1))) + 0.1).astype(np.float32)
    return quant.quantize(w, "q4_k")


def test_q4_k_interleave_round_trip_and_c_repack(kern):
    raw = _weights_k(48, 768, 1)
    packed = interleave(raw, "q4_k")
    assert packed.shape == (3, raw.size // 3) and packed.dtype == np.uint8
    np.testing.assert_array_equal(deinterleave(packed, "q4_k"), raw)
    for threads in (1, 3):
        np.testing.assert_array_equal(interleave_c(kern, raw, "q4_k", threads), packed)
    with pytest.raises(InfengError):
        interleave(raw[:40], "q4_k")
    with pytest.raises(InfengError):
        interleave_c(kern, raw[:40], "q4_k")


def test_q4_k_interleave_layout_by_hand():
    """Spot-check the documented byte positions (quant_k.h) against decode_q4_k's fields."""
    from infeng.quant.q4_k import decode_q4_k
    raw = _weights_k(16, 512, 3)
    d, dmin, sc, m, q = decode_q4_k(raw)                 # [16, 2], [16, 2, 8], [16, 2, 8, 32]
    p = interleave(raw, "q4_k")[0].reshape(2, 2304)
    for r, b, s, k in ((0, 0, 0, 0), (3, 1, 5, 13), (15, 1, 7, 31), (9, 0, 2, 6), (6, 0, 1, 4)):
        g = p[b]
        assert g[2 * r:2 * r + 2].view(np.float16)[0] == np.float16(d[r, b])
        assert g[32 + 2 * r:34 + 2 * r].view(np.float16)[0] == np.float16(dmin[r, b])
        lo, hi = g[64 + 16 * s + r], g[192 + 16 * (s // 2) + r] >> (4 * (s % 2))
        assert (lo & 15) | ((hi & 3) << 4) == sc[r, b, s] and (lo >> 4) | ((hi & 12) << 2) == m[r, b, s]
        by = g[256 + 256 * s + 64 * (k // 8) + 4 * r + k % 4]
        assert (by & 15 if k % 8 < 4 else by >> 4) == q[r, b, s, k]


@pytest.mark.parametrize("N,K", NK_K)
def test_q4_kx16_matmul_matches_numpy(kern, N, K):
    from test_quant_k import _ref as ref_k
    raw = _weights_k(N, K, N * 1000 + K)
    packed = interleave(raw, "q4_k")
    buf = np.full(packed.size + 64, 0xFF, np.uint8)                # junk after W: never read
    buf[:packed.size] = packed.ravel()
    rng = np.random.default_rng(K)
    for T in TS:
        x = rng.standard_normal((T, K + 3)).astype(np.float32)     # ldx > K
        xs = np.ascontiguousarray(x[:, :K])
        want, mag = ref_k(raw, xs)
        for nth in (1, 2):
            ldy = N + 5
            y = np.full((T, ldy), -7.0, np.float32)
            acc = int(T % 2 == 1 and nth == 2)
            kern.lib.ifg_matmul(P(kern, y), ldy, P(kern, x), K + 3, P(kern, buf, "void *"), Q4_KX16,
                                T, N, K, acc, nth)
            got = y[:, :N].astype(np.float64)
            exp = want - 7.0 if acc else want
            assert np.all(np.abs(got - exp) <= 1e-5 * mag + 1e-6), (T, nth, np.abs(got - exp).max())
            assert np.all(y[:, N:] == -7.0)
            plain = np.full((T, N), -7.0, np.float32)                # the plain-layout kernel
            kern.lib.ifg_matmul(P(kern, plain), N, P(kern, xs), K, P(kern, raw, "void *"), 7, T, N, K, acc, nth)
            assert np.all(np.abs(got - plain) <= 2e-5 * mag + 2e-6), (T, nth)


def test_q4_kx16_deterministic_across_threads(kern):
    N, K, T = 208, 4352, 19                                        # K: 1024-tiles plus a 256 tail
    packed = interleave(_weights_k(N, K, 5), "q4_k")
    x = np.random.default_rng(6).standard_normal((T, K)).astype(np.float32)
    for t in (T, 1):
        outs = []
        for nth in (1, 2, 3):
            y = np.zeros((t, N), np.float32)
            kern.lib.ifg_matmul(P(kern, y), N, P(kern, x), K, P(kern, packed, "void *"), Q4_KX16, t, N, K, 0, nth)
            outs.append(y)
        np.testing.assert_array_equal(outs[0], outs[1])
        np.testing.assert_array_equal(outs[0], outs[2])


def test_bench_case_runs_q4_k_interleaved(kern):
    from infeng.bench import micro
    case = micro.matmul_case(kern, "q4_k", "48x256", 3, 1)
    assert case.name == "gemm3 q4_kx16 48x256"
    case.run()
    assert micro.matmul_case(kern, "q4_k", "40x256", 1, 1).name == "gemv q4_k 40x256"   # 40 rows: plain


def test_forward_shares_one_quantized_input(kern, data_dir, tmp_path):
    """The forward pass quantizes each projection input once for the x16 products that read it
    (struct ifg_scratch.xq: wq/wk/wv share one, w_gate/w_up another) instead of in every product
    and thread: the same int8 values, so the same bits as each product quantizing for itself."""
    from infeng.cli.main import main
    from infeng.model.llama import LlamaC
    from infeng.model.loader import load_model
    from infeng.runtime.kv import KVCache
    for qtype in ("q8_0", "q4_0"):
        src, q = tmp_path / "f32.infeng", tmp_path / f"{qtype}.infeng"
        if not src.exists():
            assert main(["convert", str(data_dir / "stories260K-f32"), "-o", str(src)]) == 0
        assert main(["quantize", str(src), "-o", str(q), "--type", qtype]) == 0
        model = load_model(q)
        tokens = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298]
        outs = []
        for shared in (True, False):
            net = LlamaC(kern, model, max_tokens=16, max_out=16, threads=2)
            assert net.m.layers[0].wq.dtype in (DTYPE["q8_0x16"], DTYPE["q4_0x16"])                # the x16 layouts run
            if not shared:
                net.s.xq = kern.ffi.NULL
            kv = KVCache(kern, model.config, n_slots=1, max_seq_len=32, block_size=4)
            assert kv.ensure(0, 32)
            T = len(tokens)
            net.tokens[:T], net.pos[:T], net.seq[:T], net.out_rows[:T] = tokens, range(T), [0] * T, range(T)
            net.step(kv, T, T)
            got = [net.logits[:T].copy()]
            net.tokens[0], net.pos[0], net.seq[0], net.out_rows[0] = 311, T, 0, 0      # a decode step
            net.step(kv, 1, 1)
            outs.append(got + [net.logits[:1].copy()])
        for a, b in zip(*outs):
            np.testing.assert_array_equal(a, b)
