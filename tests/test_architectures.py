"""Every listed architecture against transformers: tiny random checkpoints recorded by
tools/record_arch_fixtures.py (tests/fixtures/arch/), their greedy tokens and the logits of every
position. The numpy reference, the C forward pass in every ISA and the engine must give the same
greedy tokens and logits within 1e-3 of the largest |logit| (f32)."""
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from infeng import format as native
from infeng.model.llama import LlamaC
from infeng.model.loader import load_gguf, load_model
from infeng.model.reference import ReferenceModel
from infeng.runtime.engine import Engine, Request
from infeng.runtime.kv import KVCache
from infeng.runtime.sampler import SamplingParams

FIXTURES = Path(__file__).parent / "fixtures" / "arch"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.json").is_file())
TOL = 1e-3     # max |Δlogit| relative to the largest |logit|
ARCH = {"llama2": "llama", "llama3": "llama", "llama_linear": "llama", "smollm2": "llama", "mistral": "mistral",
        "qwen2": "qwen2", "qwen2_yarn": "qwen2", "qwen3": "qwen3", "smollm3": "smollm3", "phi3": "phi3",
        "phi3_longrope": "phi3", "phi3_longrope_past": "phi3", "llama_dynamic": "llama"}


def fixture(name):
    d = FIXTURES / name
    ref = json.loads((d / "reference.json").read_text())
    return d, ref, load_file(str(d / "reference.safetensors"))["logits"]


def rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_every_architecture_has_a_fixture():
    assert set(NAMES) == set(ARCH), "re-record with tools/record_arch_fixtures.py"


@pytest.mark.parametrize("name", NAMES)
def test_reference_model_matches_transformers(name):
    d, ref, want = fixture(name)
    model = load_model(d)
    assert model.config.arch == ARCH[name]
    rm = ReferenceModel(model)
    seq = ref["prompt"] + ref["greedy"]
    assert rel_err(rm.forward(seq), want) <= TOL
    assert rm.greedy(ref["prompt"], len(ref["greedy"])) == ref["greedy"]


def _step(net, kv, toks, start):
    T = len(toks)
    net.tokens[:T], net.pos[:T], net.seq[:T] = toks, range(start, start + T), [0] * T
    net.out_rows[:T] = range(T)
    net.step(kv, T, T)
    return net.logits[:T].copy()


@pytest.mark.parametrize("name", NAMES)
def test_c_forward_matches_transformers(kern, name):
    """All positions in one prefill, then greedy decode one token at a time, on every ISA."""
    d, ref, want = fixture(name)
    model = load_model(d)
    net = LlamaC(kern, model, max_tokens=32, max_out=32, threads=2)
    kv = KVCache(kern, model.config, n_slots=1, max_seq_len=32, block_size=4)
    kv.ensure(0, 32)
    seq = ref["prompt"] + ref["greedy"]
    assert rel_err(_step(net, kv, seq, 0), want) <= TOL
    kv2 = KVCache(kern, model.config, n_slots=1, max_seq_len=32, block_size=4)
    kv2.ensure(0, 32)
    logits = _step(net, kv2, ref["prompt"], 0)[-1]
    out = []
    for _ in ref["greedy"]:
        out.append(int(np.argmax(logits)))
        logits = _step(net, kv2, [out[-1]], len(ref["prompt"]) + len(out) - 1)[0]
    assert out == ref["greedy"]


@pytest.mark.parametrize("name", NAMES)
def test_engine_greedy_and_native_file(tmp_path, name):
    """The engine's greedy tokens, from the HF folder and from the converted native file (which
    records the architecture)."""
    d, ref, _ = fixture(name)
    model = load_model(d)
    path = tmp_path / "m.infeng"
    native.write(path, model.manifest(), model.native_tensors())
    again = load_model(path)
    assert again.config == model.config and again.config.arch == ARCH[name]
    for m in (model, again):
        (r,) = Engine(m, threads=1, max_batch=1).generate([Request(
            "a", prompt_ids=ref["prompt"], params=SamplingParams(max_tokens=len(ref["greedy"]), temperature=0,
                                                                  ignore_eos=True))])
        assert r.token_ids == ref["greedy"]


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "phi3", "smollm3", "mistral"])
def test_quantized_c_matches_int8_reference(kern, name):
    """q8_0 weights: the C pass equals the numpy model of the int8 kernels on each architecture."""
    from infeng.quant.policy import plan, quantize_tensors
    d, ref, _ = fixture(name)
    model = load_model(d)
    q = model.derived(quantize_tensors(model.tensors, plan(model.tensors, "q8_0")))
    seq = ref["prompt"] + ref["greedy"]
    check_int8(kern, q, seq)


def check_int8(kern, model, seq):
    """C vs ReferenceModel(int8_activations=True): equal to f32 rounding but for rare int8
    rounding flips (C vs numpy at a .5), each moving a row by up to ~1e-2 of the logit scale."""
    want = ReferenceModel(model, int8_activations=True).forward(seq)
    net = LlamaC(kern, model, max_tokens=32, max_out=32, threads=2)
    kv = KVCache(kern, model.config, n_slots=1, max_seq_len=32, block_size=4)
    kv.ensure(0, 32)
    err = np.abs(_step(net, kv, seq, 0) - want).max(-1) / np.abs(want).max()
    assert np.all(err < 1e-2) and np.sum(err < 1e-4) >= len(seq) - 3, err


GGUF = Path(__file__).parent / "fixtures" / "gguf" / "arch"
# llama.cpp's GGUFs (tools/record_gguf_fixtures.py) of the fixtures; none yet of the two that run
# past the original length (phi3_longrope_past, llama_dynamic)
GGUF_NAMES = [n for n in NAMES if (GGUF / f"{n}-q8_0.gguf").is_file()]
# what llama.cpp's converter keeps of each HF config (the rest is checked field by field)
GGUF_DROPS = {"mistral": ("arch", "sliding_window", "swa_layers")}   # llama.cpp converts it as "llama", no window


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_llamacpp_gguf_loads_as_its_hf_folder(kern, name):
    """llama.cpp's own converter's q8_0 GGUF of each fixture: the same config, the same tensors
    (its Q8_0 blocks are infeng's byte for byte; fused Phi-3 tensors split, Q/K un-permuted where
    llama.cpp permutes them), so the same logits as the HF folder quantized by infeng."""
    from infeng.quant import quantize_q8_0
    d, ref, _ = fixture(name)
    hf = load_model(d)
    g, _ = load_gguf(GGUF / f"{name}-q8_0.gguf")
    skip = set(GGUF_DROPS.get(name.split("_")[0], ())) | {"eos_ids", "bos_id", "extra", "rope_scaling"}
    for field in hf.config.to_dict():
        if field not in skip:
            assert getattr(g.config, field) == pytest.approx(getattr(hf.config, field)), field
    # RoPE scaling as llama.cpp stores it (llama3: a divisor tensor; yarn, longrope: keys) gives
    # the same frequencies and attention factor
    np.testing.assert_allclose(g.config.inv_freq(), hf.config.inv_freq(), rtol=1e-6)
    assert g.config.attn_factor() == pytest.approx(hf.config.attn_factor(), rel=1e-6)
    assert set(g.tensors) == set(hf.tensors)
    for n, (dt, arr) in g.tensors.items():
        want = hf.f32(n)
        if dt == "q8_0":
            np.testing.assert_array_equal(arr, quantize_q8_0(want), err_msg=n)
        elif dt == "f16":           # rows not a multiple of 32 (SmolLM2's 48): llama.cpp falls back to F16
            np.testing.assert_array_equal(arr, want.astype(np.float16), err_msg=n)
        else:
            assert dt == "f32", (n, dt)
            np.testing.assert_array_equal(arr, want, err_msg=n)
    if name.startswith("mistral"):
        return                      # beyond its window, llama.cpp's Mistral is another model
    check_int8(kern, g, ref["prompt"] + ref["greedy"])


LORA_NAMES = [n for n in NAMES if (FIXTURES / n / "lora" / "reference.json").is_file()]


@pytest.mark.parametrize("name", LORA_NAMES)
def test_peft_lora_matches_transformers(tmp_path, name):
    """A PEFT LoRA on Qwen2 (biased q/k/v), Qwen3 and Phi-3 (fused qkv_proj / gate_up_proj, split
    per part): the reference with the adapter gives PEFT's logits, the engine its greedy tokens."""
    from infeng.model.adapter import convert_peft, load_adapter, reference_with_adapter
    d, ref, _ = fixture(name)
    rec = json.loads((d / "lora" / "reference.json").read_text())
    want = load_file(str(d / "lora" / "reference.safetensors"))["logits"]
    base = load_model(d)
    path = convert_peft(d / "lora", tmp_path / "a.infeng-lora", base, dtype="f32")
    seq = ref["prompt"] + rec["greedy"]
    assert rel_err(reference_with_adapter(base, load_adapter(path, base)).forward(seq), want) <= TOL
    eng = Engine(base, threads=1, max_batch=2)
    eng.load_adapter(path, "a")
    params = SamplingParams(max_tokens=len(rec["greedy"]), temperature=0, ignore_eos=True)
    out = {r.id: r.token_ids for r in eng.generate([
        Request("x", prompt_ids=ref["prompt"], params=params, adapter="a"),
        Request("y", prompt_ids=ref["prompt"], params=params)])}
    assert out == {"x": rec["greedy"], "y": ref["greedy"]}


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_gguf_export_round_trip(tmp_path, name):
    """infeng's own GGUF export of each architecture (llama.cpp's names) reads back as the same
    model; what llama.cpp's architecture would compute differently is refused by name."""
    from infeng.converters.gguf_write import write_gguf
    from infeng.errors import InfengError
    d, ref, want = fixture(name)
    model = load_model(d)
    # the export writes BPE vocabularies: take the one llama.cpp's GGUF of this folder carries
    model.tokenizer = load_gguf(GGUF / f"{name}-q8_0.gguf")[0].tokenizer
    if name == "mistral":
        with pytest.raises(InfengError, match="sliding window on layers .* has no llama.cpp 'llama' equivalent"):
            write_gguf(model, tmp_path / "m.gguf")
        return
    back, _ = load_gguf(write_gguf(model, tmp_path / "m.gguf"))
    assert back.config.arch == model.config.arch and set(back.tensors) == set(model.tensors)
    for n in model.tensors:
        np.testing.assert_array_equal(back.f32(n), model.f32(n), err_msg=n)
    assert rel_err(ReferenceModel(back).forward(ref["prompt"] + ref["greedy"]), want) <= TOL


def test_awq_fold_scales_the_v_bias_with_wv():
    """AWQ folds wo's input scales into wv's rows; Qwen2's v bias must be scaled with them, or
    the transformed model is another function."""
    from infeng.quant.awq import fold
    d, ref, _ = fixture("qwen2")
    m = load_model(d)
    c, g = m.config, m.config.n_heads // m.config.n_kv_heads
    base = ReferenceModel(m).forward(ref["prompt"])
    w = {n: m.f32(n).copy() for n in m.tensors}
    kv = np.random.default_rng(0).uniform(0.5, 2, (c.n_kv_heads, c.head_dim)).astype(np.float32)
    s = np.repeat(kv[:, None, :], g, axis=1).reshape(-1)
    w["layers.0.wo"] = w["layers.0.wo"] * s
    fold(w, "layers.0.", "o_in", s, c, g)
    m2 = m.derived({n: ("f32", np.ascontiguousarray(a, np.float32)) for n, a in w.items()})
    assert rel_err(ReferenceModel(m2).forward(ref["prompt"]), base) < 1e-5


@pytest.mark.parametrize("name", ["mistral", "phi3"])
def test_sliding_window_kv_cache_stays_bounded(name):
    """Every layer windowed: past its prompt a sequence holds the blocks of its window only
    (older ones go back to the pool), with the tokens of the reference (which keeps every
    position and masks)."""
    d, ref, _ = fixture(name)
    model = load_model(d)
    w, bs, n = model.config.sliding_window, 4, 40
    eng = Engine(model, threads=1, max_batch=2, block_size=bs)
    assert eng.kv.window == w
    used = []
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    reqs = [Request("a", prompt_ids=ref["prompt"], params=params),
            Request("b", prompt_ids=ref["prompt"][::-1], params=params)]
    out = {}
    for ev in eng.stream(reqs):
        used.append(eng.kv.blocks_used())
        if hasattr(ev, "result"):
            out[ev.result.id] = ev.result.token_ids
    assert max(used) <= 2 * ((w - 1) // bs + 2) < 2 * -(-(len(ref["prompt"]) + n) // bs)
    rm = ReferenceModel(model)
    assert out == {"a": rm.greedy(ref["prompt"], n), "b": rm.greedy(ref["prompt"][::-1], n)}
