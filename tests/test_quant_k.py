"""q4_k (GGUF Q4_K super-blocks): byte layout, quantizer quality, the kernels of every ISA
variant against numpy, thread determinism, and whole models (stories260K, where every matrix
falls back, and a small random model whose rows are multiples of 256, where none does).

Kernel tolerance. The C kernels quantize x per token and 32-block as ``quantize_activations``
does (the same f32 operations, scalar in every build), and the sub-block dot products are exact
integers; what differs from the float64 reference ``sum_s d_x (d sc_s) dot_s - d_x sum(q_x)
(dmin m_s)`` is f32 rounding of the scale products and of the sums (per SIMD lane, then a
reduction): |y - ref| <= 1e-5 * sum_k |x̂_k ŵ_k| (+ the min term's magnitude) + 1e-6.
"""
import json

import numpy as np
import pytest

from conftest import P, check_c_forward_vs_int8_reference
from infeng import format as native
from infeng import quant
from infeng.cli.main import main
from infeng.errors import InfengError
from infeng.kernels.abi import DTYPE
from infeng.quant import q4_k

Q4_K = DTYPE["q4_k"]
TS = (1, 3, 17, 50)
NK = [(37, 256), (80, 768), (37, 5632)]


def _hand_block():
    """One block built from the GGUF description by hand: fields and the bytes they give."""
    sc = np.array([1, 2, 3, 40, 5, 63, 17, 33], np.uint8)
    m = np.array([0, 9, 20, 63, 1, 2, 48, 16], np.uint8)
    b = bytearray(12)
    for j in range(4):   # low 6 bits: scales 0..3 in bytes 0..3, mins 0..3 in bytes 4..7
        b[j] = sc[j] | ((sc[j + 4] >> 4) << 6)          # top 2 bits: high bits of scale j+4
        b[j + 4] = m[j] | ((m[j + 4] >> 4) << 6)        # and of min j+4
        b[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4)
    q = (np.arange(256) * 7 % 16).astype(np.uint8)      # element i: level (7 i) mod 16
    nib = bytearray(128)
    for c in range(4):
        for l in range(32):
            nib[32 * c + l] = q[64 * c + l] | (q[64 * c + 32 + l] << 4)
    raw = np.frombuffer(np.float16(0.5).tobytes() + np.float16(0.25).tobytes() + bytes(b) + bytes(nib), np.uint8)
    return sc, m, q, raw.reshape(1, 144)


def test_known_block_layout():
    sc, m, q, raw = _hand_block()
    assert raw[0, :2].tobytes() == b"\x00\x38" and raw[0, 2:4].tobytes() == b"\x00\x34"   # fp16 0.5, 0.25
    # a few bytes worked out by hand: scales[3] = sc[3] | (sc[7] >> 4) << 6 = 40 | 2 << 6 = 168;
    # scales[8] = (5 & 15) | (1 & 15) << 4 = 21; scales[11] = (33 & 15) | (16 & 15) << 4 = 1
    assert raw[0, 4 + 3] == 168 and raw[0, 4 + 8] == 21 and raw[0, 4 + 11] == 1
    # element 32 (sub-block 1) is the high nibble of byte 16 + 0: level 7*32 % 16 = 0; element 1
    # the low nibble of byte 17: 7
    assert raw[0, 16] >> 4 == 0 and raw[0, 17] & 15 == 7
    got_sc, got_m = q4_k.unpack_scales(raw[0, 4:16])
    assert got_sc.tolist() == sc.tolist() and got_m.tolist() == m.tolist()
    assert q4_k.pack_scales(sc, m).tobytes() == raw[0, 4:16].tobytes()
    want = np.float32(0.5) * sc.repeat(32).astype(np.float32) * q - np.float32(0.25) * m.repeat(32).astype(np.float32)
    np.testing.assert_array_equal(quant.dequantize(raw, "q4_k")[0], want.astype(np.float32))


def test_requantizing_a_dequantized_row_is_nearly_lossless():
    """A row that is exactly representable comes back within the 6-bit scale rounding."""
    _, _, _, raw = _hand_block()
    x = quant.dequantize(raw, "q4_k")
    again = quant.dequantize(quant.quantize(x, "q4_k"), "q4_k")
    assert np.abs(again - x).max() <= 0.02 * np.abs(x).max()


def test_error_beats_q4_0_at_the_same_size():
    rng = np.random.default_rng(0)
    # rows of different scales, some with an offset (q4_k's min helps), heavy tails
    w = (rng.standard_t(5, (64, 1024)) * np.exp2(rng.integers(-6, 2, (64, 1)))
         + 0.3 * np.exp2(rng.integers(-6, 2, (64, 1))) * (rng.random((64, 1)) < 0.3)).astype(np.float32)
    rel = {}
    for t in ("q4_0", "q4_k"):
        e = quant.dequantize(quant.quantize(w, t), t) - w
        rel[t] = np.sqrt((e ** 2).sum(1) / (w ** 2).sum(1))
    assert np.all(rel["q4_k"] < 0.1), rel["q4_k"].max()
    assert rel["q4_k"].mean() < 0.9 * rel["q4_0"].mean(), (rel["q4_k"].mean(), rel["q4_0"].mean())
    # every element within the step of its sub-block (or clipped at most one step further)
    raw = quant.quantize(w, "q4_k")
    d, dmin, sc, m, _ = q4_k.decode_q4_k(raw)
    step = (d[..., None] * sc).repeat(32, -1).reshape(64, -1)
    e = np.abs(quant.dequantize(raw, "q4_k") - w)
    assert np.all(e <= 1.5 * step + 1e-6 + 0.02 * np.abs(w).max(1, keepdims=True))


def test_importance_weights_move_the_error():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 512)).astype(np.float32)
    imp = np.ones(512)
    imp[::4] = 100.0                                   # every 4th input column matters most
    plain = quant.dequantize(quant.quantize_q4_k(w), "q4_k") - w
    weighted = quant.dequantize(quant.quantize_q4_k(w, weights=imp), "q4_k") - w
    assert (weighted[:, ::4] ** 2).mean() < 0.8 * (plain[:, ::4] ** 2).mean()
    with pytest.raises(InfengError, match="importance"):
        quant.quantize_q4_k(w, weights=np.ones(7))


def test_bad_shape_refused():
    with pytest.raises(InfengError, match="multiple of 256"):
        quant.quantize_q4_k(np.zeros((2, 160), np.float32))


def _c_quantize(kern, x, imp=None, threads=2):
    ffi = kern.ffi
    out = np.empty((x.shape[0], x.shape[1] // 256 * 144), np.uint8)
    p_imp = ffi.NULL if imp is None else P(kern, np.ascontiguousarray(imp, np.float64), "double *")
    kern.lib.ifg_quantize_q4_k(P(kern, out, "uint8_t *"), P(kern, x), p_imp, x.shape[0], x.shape[1], threads)
    return out


def _special_rows(K, rng):
    """Rows that exercise the quantizer's edge cases, a few super-blocks each."""
    x = np.zeros((9, K), np.float32)                   # row 0: all zeros
    x[1] = 3.0                                         # constant positive (min 0, flat levels)
    x[2] = -2.5                                        # constant negative (span 0)
    x[3] = rng.standard_normal(K)
    x[3, 17] = 1e4                                     # one huge outlier
    x[4, K // 2:] = 1.0                                # half zero, half constant
    x[5, ::2] = -1e-3                                  # tiny, alternating with zeros
    x[6] = np.where(rng.random(K) < 0.5, 1.0, -1.0)    # two levels
    x[7] = np.arange(K) % 16                           # exactly representable levels
    x[8] = rng.standard_normal(K) * 1e-6 + 5.0         # a large offset, small spread
    return x


@pytest.mark.parametrize("K", [256, 512, 2816])
def test_c_quantizer_is_bytewise_the_numpy_reference(kern, K):
    rng = np.random.default_rng(K)
    for N in (1, 7, 37):
        x = (rng.standard_t(4, (N, K)) * np.exp2(rng.integers(-12, 6, (N, 1)))
             + 0.3 * rng.standard_normal((N, 1)) * (rng.random((N, 1)) < 0.3)).astype(np.float32)
        x[rng.random((N, K)) < 0.03] = 0.0
        for imp in (None, rng.random(K) ** 4 * 100, np.where(rng.random(K) < 0.3, 0.0, 1.0)):
            want = q4_k.quantize_q4_k_ref(x, imp)
            np.testing.assert_array_equal(_c_quantize(kern, x, imp), want)
    x = _special_rows(K, rng)
    for imp in (None, np.ones(K), rng.random(K)):
        np.testing.assert_array_equal(_c_quantize(kern, x, imp), q4_k.quantize_q4_k_ref(x, imp))


def test_c_quantizer_threads_and_wrapper(kern):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((19, 1024)).astype(np.float32)
    one = _c_quantize(kern, x, threads=1)
    np.testing.assert_array_equal(_c_quantize(kern, x, threads=3), one)
    np.testing.assert_array_equal(q4_k.quantize_q4_k(x), one)          # the active variant
    imp = rng.random(1024)
    np.testing.assert_array_equal(q4_k.quantize_q4_k(x, weights=imp, threads=2), q4_k.quantize_q4_k_ref(x, imp))


def test_c_dequant_row_is_bitwise_numpy(kern):
    rng = np.random.default_rng(2)
    raw = quant.quantize(rng.standard_normal((3, 768)).astype(np.float32), "q4_k")
    want = quant.dequantize(raw, "q4_k")
    for r in range(3):
        o = np.zeros(768, np.float32)
        kern.lib.ifg_qk_dequant_row(P(kern, o), P(kern, np.ascontiguousarray(raw[r]), "uint8_t *"), Q4_K, 768)
        np.testing.assert_array_equal(o, want[r])


def _ref(raw, x):
    """float64 reference of the kernel math and the magnitude of its terms."""
    N, T = raw.shape[0], x.shape[0]
    d, dmin, sc, m, q = q4_k.decode_q4_k(raw)
    a = (d[..., None] * sc.astype(np.float32)).astype(np.float64).reshape(N, -1)       # [N, nsub]
    b = (dmin[..., None] * m.astype(np.float32)).astype(np.float64).reshape(N, -1)
    qw = q.reshape(N, -1, 32).astype(np.float64)
    xq, dx = quant.quantize_activations(x)
    xq = xq.reshape(T, -1, 32).astype(np.float64)
    dx = dx.astype(np.float64)
    dot = np.einsum("tsk,nsk->tns", xq, qw)
    sx = xq.sum(-1)                                                                       # [T, nsub]
    y = (dx[:, None] * (a[None] * dot - b[None] * sx[:, None])).sum(-1)
    mag = (dx[:, None] * (a[None] * np.einsum("tsk,nsk->tns", np.abs(xq), qw) + b[None] * np.abs(xq).sum(-1)[:, None])).sum(-1)
    return y, mag


@pytest.mark.parametrize("N,K", NK)
def test_qk_matmul_matches_numpy(kern, N, K):
    rng = np.random.default_rng(N * 1000 + K)
    w = (rng.standard_normal((N, K)) * np.exp2(rng.integers(-4, 4, (N, 1))) + 0.1).astype(np.float32)
    raw = quant.quantize(w, "q4_k")
    buf = np.full(raw.size + 64, 0xFF, np.uint8)                 # junk after W: never read
    buf[:raw.size] = raw.ravel()
    wdq = quant.dequantize(raw, "q4_k").astype(np.float64)
    for T in TS:
        for nth in (1, 2):
            x = rng.standard_normal((T, K + 3)).astype(np.float32)  # ldx > K
            ldy = N + 2
            y = np.full((T, ldy), -7.0, np.float32)
            acc = int(T % 2 == 1 and nth == 2)
            kern.lib.ifg_matmul(P(kern, y), ldy, P(kern, x), K + 3, P(kern, buf, "void *"), Q4_K, T, N, K, acc, nth)
            xs = np.ascontiguousarray(x[:, :K])
            want, mag = _ref(raw, xs)
            if acc:
                want = want - 7.0
            got = y[:, :N].astype(np.float64)
            assert np.all(np.abs(got - want) <= 1e-5 * mag + 1e-6), (T, nth, np.abs(got - want).max())
            assert np.all(y[:, N:] == -7.0)
            # against the f64 product of the dequantized weights and the unquantized x: the
            # activations' int8 rounding (|x - x̂| <= d_x / 2) is the only extra error
            _, dx = quant.quantize_activations(xs)
            bound = (np.abs(wdq).reshape(N, -1, 32).sum(-1)[None] * dx[:, None, :] / 2).sum(-1)
            full = xs.astype(np.float64) @ wdq.T - (7.0 if acc else 0.0)
            assert np.all(np.abs(got - full) <= bound + 1e-4 * np.abs(xs) @ np.abs(wdq).T + 1e-5)


def test_qk_matmul_deterministic_across_threads(kern):
    rng = np.random.default_rng(5)
    N, K, T = 131, 4352, 19                                       # K: 2048-chunks plus a tail chunk
    raw = quant.quantize(rng.standard_normal((N, K)).astype(np.float32), "q4_k")
    x = rng.standard_normal((T, K)).astype(np.float32)
    outs = []
    for nth in (1, 2, 3):
        y = np.zeros((T, N), np.float32)
        kern.lib.ifg_matmul(P(kern, y), N, P(kern, x), K, P(kern, raw, "void *"), Q4_K, T, N, K, 0, nth)
        outs.append(y)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    y1 = np.zeros((1, N), np.float32)                             # the GEMV is the same arithmetic
    kern.lib.ifg_matmul(P(kern, y1), N, P(kern, x), K, P(kern, raw, "void *"), Q4_K, 1, N, K, 0, 2)
    np.testing.assert_array_equal(y1[0], outs[0][0])


# --- whole models ---------------------------------------------------------------------------

PROMPT = [1, 403, 407, 261, 378]   # "Once upon a time"
# stories260K has no matrix with rows of 256: q4_k falls back to q5_0 (rows of 64, as llama.cpp's
# Q4_K_M does) and bf16 (w_down, rows of 172), so its greedy output is q5_0's (recorded from the
# numpy reference, tests/test_quant_model.py), which is also the f32 model's own continuation.
GREEDY_S260 = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408,
               419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352,
               266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270,
               333, 415, 426, 13, 438, 310]       # = q5_0's (test_quant_model): every q4_k matrix fell back


def test_stories260k_q4_k_falls_back_and_generates_recorded(tmp_path, data_dir, capsys):
    out, tel = tmp_path / "s.infeng", tmp_path / "t.json"
    assert main(["quantize", str(data_dir / "stories260K-f32"), "-o", str(out), "--type", "q4_k",
                 "--telemetry", str(tel)]) == 0
    err = capsys.readouterr().err
    assert "fallback to q5_0 (q4_k needs rows that are a multiple of 256, these have 64)" in err
    assert "fallback to bf16 (q4_k needs rows that are a multiple of 256, these have 172)" in err
    f = native.NativeFile(out)
    for name, d in f.dtypes.items():
        want = "f32" if name.endswith("norm") else "bf16" if name.endswith("w_down") else \
            "q8_0" if name == "tok_embeddings" else "q5_0"          # the (tied) head stays q8_0
        assert d == want, name
    assert json.loads(tel.read_text())["metrics"]["fallbacks"] == 35
    from infeng.model.loader import load_model
    from infeng.model.reference import ReferenceModel
    assert ReferenceModel(load_model(out)).greedy(PROMPT, 60) == GREEDY_S260     # numpy, then C
    reqs = tmp_path / "r.jsonl"
    reqs.write_text(json.dumps({"id": "a", "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0}) + "\n")
    res = tmp_path / "o.jsonl"
    assert main(["generate", str(out), "--batch", str(reqs), "--output", str(res)]) == 0
    ids = json.loads(res.read_text().splitlines()[0])["token_ids"]
    assert ids[:57] == GREEDY_S260[:57] and len(ids) == 60   # then a near tie (test_quant_model.C_AGREES)


def _small_model(path, data_dir):
    """A random Llama whose matrices all have rows of 256 or 512 (q4_k applies everywhere)."""
    from infeng.format.schema import expected_shapes, is_norm
    from infeng.format.config import ModelConfig
    cfg = ModelConfig(dim=256, hidden_dim=512, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
                      vocab_size=512, max_seq_len=256, norm_eps=1e-5, rope_theta=10000.0,
                      tie_embeddings=False, bos_id=1, eos_ids=(2,))
    rng = np.random.default_rng(0)
    tensors = []
    for name, shape in expected_shapes(cfg).items():
        if is_norm(name):
            data = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            data = (rng.standard_normal(shape) * (1.5 / np.sqrt(shape[-1]))).astype(np.float32)
        tensors.append(native.Tensor(name, "f32", shape, data))
    tok = (data_dir / "stories260K" / "tokenizer.json").read_text()
    native.write(path, {"kind": "model", "config": cfg.to_dict(),
                        "tokenizer": {"json": tok, "add_bos": True, "chat_template": None},
                        "generation": {}, "source": "test:q4_k"}, tensors)


def test_c_forward_matches_q4_k_reference(kern, tmp_path, data_dir):
    from infeng.model.loader import load_model
    src, out = tmp_path / "f32.infeng", tmp_path / "q.infeng"
    _small_model(src, data_dir)
    (tmp_path / "p.yaml").write_text("tensors: {output: q4_k}\n")        # the head too (default q8_0)
    assert main(["quantize", str(src), "-o", str(out), "--type", "q4_k", "--policy", str(tmp_path / "p.yaml")]) == 0
    model = load_model(out)
    assert {d for n, (d, _) in model.tensors.items() if not n.endswith("norm")} == {"q4_k"}
    check_c_forward_vs_int8_reference(kern, model)


def test_c_forward_interleaved_equals_plain_layout(kern, tmp_path, data_dir, monkeypatch):
    """Every q4_k matrix of the small model has 16k rows: the loaded model runs them all on the
    q4_kx16 kernels, and the whole forward pass (prefill and a decode step) agrees with the
    plain-layout kernels (same int8 x, only the f32 summation order differs); the stored
    tensors keep their GGUF block order."""
    from infeng.model.llama import LlamaC
    from infeng.model.loader import Model, load_model
    from infeng.runtime.kv import KVCache
    src, out = tmp_path / "f32.infeng", tmp_path / "q.infeng"
    _small_model(src, data_dir)
    (tmp_path / "p.yaml").write_text("tensors: {output: q4_k}\n")        # the head too (default q8_0)
    assert main(["quantize", str(src), "-o", str(out), "--type", "q4_k", "--policy", str(tmp_path / "p.yaml")]) == 0
    tokens = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298]

    def logits(model):
        net = LlamaC(kern, model, max_tokens=16, max_out=16, threads=2)
        kv = KVCache(kern, model.config, n_slots=1, max_seq_len=32, block_size=4)
        assert kv.ensure(0, 32)
        T = len(tokens)
        net.tokens[:T], net.pos[:T], net.seq[:T] = tokens, range(T), [0] * T
        net.out_rows[:T] = range(T)
        net.step(kv, T, T)
        first = net.logits[:T].copy()
        net.tokens[0], net.pos[0], net.out_rows[0] = 311, T, 0
        net.step(kv, 1, 1)
        return net, np.concatenate([first, net.logits[:1].copy()])

    model = load_model(out)
    stored = {n: a.copy() for n, (d, a) in model.tensors.items()}
    net, fast = logits(model)
    L = net.layers[0]
    assert (L.wq.dtype, L.wk.dtype, L.w_down.dtype, net.m.output.dtype) == (DTYPE["q4_kx16"],) * 4
    assert net.m.tok_embeddings.dtype == Q4_K and (L.wq.rows, L.wq.cols) == (256, 256)
    for n, (d, a) in model.tensors.items():
        np.testing.assert_array_equal(a, stored[n])
    monkeypatch.setattr(Model, "kernel_weight", lambda self, name, *args: self.tensors[name])
    plain_net, plain = logits(load_model(out))
    assert plain_net.layers[0].wq.dtype == Q4_K
    # an f32 order difference can flip a later activation's int8 rounding (test_quant_model)
    err = np.abs(fast - plain).max(-1) / np.abs(plain).max()
    assert np.all(err < 1e-2) and np.sum(err < 1e-4) >= len(fast) - 2, err
