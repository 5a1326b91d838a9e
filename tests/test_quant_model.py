"""Quantized stories260K (from the f32 checkpoint): `infeng quantize` end to end, the recorded
greedy output, the C forward pass against the numpy reference of the quantized model, and bad
input at the CLI (one line, exit != 0, nothing written)."""
import json
from pathlib import Path

import numpy as np
import pytest

from infeng import format as native
from infeng.cli.main import main
from infeng.kernels.abi import DTYPE
from infeng.model.llama import LlamaC
from infeng.model.loader import load_model
from infeng.model.reference import ReferenceModel
from infeng.runtime.kv import KVCache

PROMPT = [1, 403, 407, 261, 378]   # "Once upon a time"
# Greedy 60 tokens, numpy reference of the quantized model. q8_0 is the f32 model's own
# continuation ("...Lily. She loved to play outside in the park. One day, she saw a big, red
# ball..."); q4_0 (its output head, the tied embedding table, in q8_0) follows it for 23 tokens,
# q5_0 (head in q8_0 too) for all 60.
GREEDY = {
    "q8_0": [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408,
             419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352,
             266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270,
             333, 415, 426, 13, 438, 310],
    "q4_0": [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408,
             419, 292, 411, 322, 265, 262, 379, 426, 385, 328, 432, 358, 263, 377, 267, 265, 282, 295,
             433, 335, 311, 357, 343, 269, 279, 380, 418, 422, 426, 342, 394, 261, 370, 432, 352, 266,
             268, 388, 269, 261, 262, 423],
    "q5_0": [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408,
             419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352,
             266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270,
             333, 415, 426, 13, 438, 310],
}
# Tokens of GREEDY the C path must reproduce. q5_0: C's int8 activations round one value the
# other way than numpy's at position 22 (f32 rounding at a .5: see _close_rows), which moves
# later logits by ~0.02–0.08; at token 57 the reference's top two (13 over 338) are 0.125 apart,
# and C picks 338. q4_0 sees its first such flip at position 40, with no near tie after it.
C_AGREES = {"q8_0": 60, "q4_0": 60, "q5_0": 57}
TOKENS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338]


@pytest.fixture(scope="module")
def qfiles(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("q")
    out = {}
    for t in GREEDY:
        p = d / f"s-{t}.infeng"
        assert main(["quantize", str(data_dir / "stories260K-f32"), "-o", str(p), "--type", t,
                     "--telemetry", str(d / f"{t}.json")]) == 0
        out[t] = p
    return out


@pytest.mark.parametrize("qtype", list(GREEDY))
def test_quantized_file_types_and_fallbacks(qfiles, qtype):
    f = native.NativeFile(qfiles[qtype])
    # 35 matrices + the (tied) embedding table; w_down has rows of 172: bf16 fallback
    for name, d in f.dtypes.items():
        if name.endswith("_norm") or name == "norm":
            assert d == "f32"
        elif name.endswith("w_down"):
            assert d == "bf16" and f.shapes[name] == (64, 172)
        else:
            want = "q8_0" if name == "tok_embeddings" else qtype       # a 4/5-bit type keeps the head q8_0
            assert d == want
            assert f.tensors[name].shape == (f.shapes[name][0], f.shapes[name][1] // 32 * native.BLOCKS[want][1])
    tel = json.loads((qfiles[qtype].parent / f"{qtype}.json").read_text())
    assert tel["command"] == "quantize" and tel["metrics"]["fallbacks"] == 5
    assert tel["metrics"]["tensors"] == 47 and len(tel["records"]) == 47
    want_bpw = {"q8_0": 10.15, "q4_0": 7.51, "q5_0": 8.17}[qtype]   # 5 bf16 w_down of 55k weights weigh in
    assert tel["metrics"]["bits_per_weight"] == pytest.approx(want_bpw, abs=0.01)


@pytest.mark.parametrize("qtype", list(GREEDY))
def test_reference_greedy_recorded(qfiles, qtype):
    assert ReferenceModel(load_model(qfiles[qtype])).greedy(PROMPT, 60) == GREEDY[qtype]


def _close_rows(got, want):
    """Rows (tokens) within 1e-4 of the largest logit; every row within 1e-2.

    C and numpy compute the activations with different f32 rounding, so a value within an ulp
    of a .5 boundary can round to a different int8 on the two sides: that moves the logits of
    the token it belongs to (and, through K/V, maybe later ones) by ~d_x * |w|, observed
    7.5e-2 on a logit of 19 (4e-3 relative), against < 1e-5 for rows without a flip."""
    scale = np.abs(want).max()
    err = np.abs(got - want).max(-1) / scale
    assert np.all(err < 1e-2), err
    return int(np.sum(err < 1e-4))


@pytest.mark.parametrize("qtype", list(GREEDY))
def test_c_forward_matches_quantized_reference(kern, qfiles, qtype):
    """The C kernels quantize activations to int8 blocks; the reference does the same
    (int8_activations), so they agree to f32 rounding but for rare int8 rounding flips."""
    model = load_model(qfiles[qtype])
    ref = ReferenceModel(model, int8_activations=True)
    want = ref.forward(TOKENS)
    net = LlamaC(kern, model, max_tokens=32, max_out=32, threads=2)
    kv = KVCache(kern, model.config, n_slots=1, max_seq_len=64, block_size=4)
    assert kv.ensure(0, 64)
    T = len(TOKENS)
    net.tokens[:T], net.pos[:T], net.seq[:T] = TOKENS, range(T), [0] * T
    net.out_rows[:T] = range(T)
    net.step(kv, T, T)
    tight = _close_rows(net.logits[:T], want)
    for t in (311, 265, 345):   # decode steps (GEMV) continue the cache
        w = ref.forward([t])
        net.tokens[0], net.pos[0], net.seq[0], net.out_rows[0] = t, ref.pos - 1, 0, 0
        net.step(kv, 1, 1)
        tight += _close_rows(net.logits[:1], w)
    assert tight >= T + 3 - 2, tight   # at most two rows touched by a flip
    # and the activation rounding is the only difference from the plain dequantized reference
    plain = ReferenceModel(model).forward(TOKENS)
    assert np.abs(plain - want).max() < 0.05 * np.abs(plain).max()


def test_c_greedy_through_cli_equals_recorded(qfiles, tmp_path):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text(json.dumps({"id": "a", "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0}) + "\n")
    for qtype, p in qfiles.items():
        out = tmp_path / f"{qtype}.jsonl"
        assert main(["generate", str(p), "--batch", str(reqs), "--output", str(out)]) == 0
        ids = json.loads(out.read_text().splitlines()[0])["token_ids"]
        n = C_AGREES[qtype]   # int8 activations in C: the reference's tokens up to a near tie
        assert ids[:n] == GREEDY[qtype][:n] and len(ids) == 60


def test_policy_file(qfiles, tmp_path, data_dir, capsys):
    pol = tmp_path / "p.yaml"
    pol.write_text('fallback: f16\ntensors:\n  tok_embeddings: bf16\n  "layers.*.w_down": q8_0\n  "layers.[0-1].*": q8_0\n')
    out = tmp_path / "mixed.infeng"
    assert main(["quantize", str(data_dir / "stories260K-f32"), "-o", str(out), "--type", "q4_0", "--policy", str(pol)]) == 0
    f = native.NativeFile(out)
    assert f.dtypes["tok_embeddings"] == "bf16"
    assert f.dtypes["layers.0.w_down"] == "f16"     # asked q8_0, rows of 172: the policy's fallback
    assert f.dtypes["layers.1.wq"] == "q8_0" and f.dtypes["layers.3.wq"] == "q4_0"
    assert "fallback to f16" in capsys.readouterr().err


def _fails(capsys, argv, message):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc != 0 and len(lines) == 1 and "Traceback" not in err and message in lines[0], err


@pytest.mark.parametrize("policy,message", [
    ("tensors:\n  'layers.*.w_nope': q8_0\n", "matches no tensor"),
    ("tensors: [1, 2\n", "not valid YAML"),
    ("tensors:\n  output: q3_k\n", "unknown type 'q3_k'"),
    ("fallback: q8_0\n", "unknown type 'q8_0'"),
    ("bogus: 1\n", "unknown policy key"),
    ("- a\n- b\n", "a policy is a mapping"),
])
def test_bad_policy_writes_nothing(capsys, tmp_path, data_dir, policy, message):
    pol = tmp_path / "p.yaml"
    pol.write_text(policy)
    out = tmp_path / "o.infeng"
    _fails(capsys, ["quantize", str(data_dir / "stories260K-f32"), "-o", str(out), "--type", "q8_0", "--policy", str(pol)], message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def test_bad_type_and_source(capsys, tmp_path, data_dir, qfiles):
    out = tmp_path / "o.infeng"
    _fails(capsys, ["quantize", str(data_dir / "stories260K-f32"), "-o", str(out), "--type", "q3_k"], "unknown type 'q3_k'")
    _fails(capsys, ["quantize", str(qfiles["q8_0"]), "-o", str(out), "--type", "q4_0"], "already quantized (q8_0)")
    _fails(capsys, ["quantize", str(tmp_path / "nope.infeng"), "-o", str(out), "--type", "q8_0"], "no such file")
    _fails(capsys, ["quantize", str(data_dir / "stories260K-f32"), "-o", str(out), "--type", "q8_0",
                    "--policy", str(tmp_path / "nope.yaml")], "no such policy file")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_quantized_length_rejected(tmp_path, qfiles):
    """The reader's exact length check holds for block types: logical shape ↔ bytes."""
    from conftest import patch_manifest
    from infeng.errors import InfengError
    bad = tmp_path / "bad.infeng"

    def grow(man):
        for e in man["tensors"]:
            if e["name"] == "layers.0.wq":
                e["shape"] = [64, 96]     # 3 blocks a row: 102 bytes, the data holds 68
    patch_manifest(qfiles["q8_0"], bad, grow)
    with pytest.raises(InfengError, match="does not match shape"):
        native.NativeFile(bad)

    def odd(man):
        for e in man["tensors"]:
            if e["name"] == "layers.0.wq":
                e["shape"] = [64, 60]     # not a whole number of blocks
    patch_manifest(qfiles["q8_0"], bad, odd)
    with pytest.raises(InfengError, match="whole number of q8_0 blocks"):
        native.NativeFile(bad)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])    # the types with an interleaved layout
def test_c_forward_interleaved_equals_plain_layout(kern, qfiles, qtype, monkeypatch):
    """Matrices with 16k rows (wq wk wv wo and the tied output head of stories260K; w_gate/w_up
    have 172 rows and stay plain) run on the interleaved kernels; the whole forward pass agrees
    with the plain-layout kernels (same int8 x quantization, only the f32 summation order differs), and the
    stored tensors (GGUF export, reference) keep their GGUF block order."""
    from infeng.model.loader import Model

    def logits(model):
        net = LlamaC(kern, model, max_tokens=32, max_out=32, threads=2)
        kv = KVCache(kern, model.config, n_slots=1, max_seq_len=64, block_size=4)
        assert kv.ensure(0, 64)
        T = len(TOKENS)
        net.tokens[:T], net.pos[:T], net.seq[:T] = TOKENS, range(T), [0] * T
        net.out_rows[:T] = range(T)
        net.step(kv, T, T)
        out = [net.logits[:T].copy()]
        net.tokens[0], net.pos[0], net.out_rows[0] = 311, T, 0
        net.step(kv, 1, 1)                                     # one decode step (GEMV)
        return net, np.concatenate(out + [net.logits[:1].copy()])

    model = load_model(qfiles[qtype])
    stored = {n: a.copy() for n, (d, a) in model.tensors.items()}
    net, fast = logits(model)
    code = DTYPE[qtype + "x16"]
    L = net.layers[0]
    assert (L.wq.dtype, L.wk.dtype, L.wo.dtype) == (code,) * 3
    assert net.m.output.dtype == DTYPE["q8_0x16"]                               # the head (tied table) is q8_0 either way
    assert (L.w_gate.dtype, net.m.tok_embeddings.dtype) == (DTYPE[qtype], DTYPE["q8_0"])
    assert (L.wq.rows, L.wq.cols, net.m.output.rows) == (64, 64, 512)
    for n, (d, a) in model.tensors.items():
        np.testing.assert_array_equal(a, stored[n])
    monkeypatch.setattr(Model, "kernel_weight", lambda self, name, *args: self.tensors[name])
    _, plain = logits(load_model(qfiles[qtype]))
    # f32 order differences can flip an int8 rounding of a later activation (see _close_rows)
    assert _close_rows(fast, plain) >= len(TOKENS) + 1 - 2


def test_q4_k_m_policy_is_llamacpp_recipe():
    """policies/q4_k_m-22-layers.yaml stores in q6_k exactly what llama.cpp's Q4_K_M stores in Q6_K
    on a 22-layer model: wv and w_down of the layers its use_more_bits picks, and the output head."""
    from infeng.quant.policy import load_policy, plan
    n = 22

    def more_bits(i):                    # llama.cpp's use_more_bits(i_layer, n_layers)
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2
    tensors = {"tok_embeddings": ("f32", np.zeros((32, 256), np.float32)),
               "output": ("f32", np.zeros((32, 256), np.float32))}
    for i in range(n):
        for p in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            tensors[f"layers.{i}.{p}"] = ("f32", np.zeros((16, 256), np.float32))
    pol = load_policy(Path(__file__).resolve().parents[1] / "policies" / "q4_k_m-22-layers.yaml")
    got = {it.name: it.dtype for it in plan(tensors, "q4_k", pol)}
    def q6(name):
        parts = name.split(".")
        return name == "output" or (len(parts) == 3 and parts[2] in ("wv", "w_down") and more_bits(int(parts[1])))
    want = {name: "q6_k" if q6(name) else "q4_k" for name in tensors}
    assert got == want
