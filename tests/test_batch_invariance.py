"""Greedy output does not depend on what else runs in the step: a prompt alone gives the tokens it
gives batched with others (with and without adapters, mixed adapters), and speculative decoding
(lookup and a draft model) gives the plain engine's tokens — on every architecture's fixture, on
stories260K with its PEFT adapters, and on the real SmolLM2 when it is cached. The kernels make
every row's bits independent of the number of rows beside it (test_row_invariance)."""
import json
from pathlib import Path

import pytest

from infeng.bench import synthetic
from infeng.bench.spec_bench import load_prompts, prompt_ids, requantized
from infeng.model.adapter import convert_peft, requantize
from infeng.model.loader import load_model
from infeng.runtime.engine import Engine, Request
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.speculate import SpecConfig

ROOT = Path(__file__).resolve().parents[1]
ARCH = ROOT / "tests" / "fixtures" / "arch"
ARCHS = sorted(p.name for p in ARCH.iterdir() if (p / "reference.json").is_file())
PEFT = ROOT / "tests" / "fixtures" / "peft"
PROMPTS = ["Once upon a time", "Lily", "The little dog was very happy because",
           "Tom and Sue went to the park. They saw a big tree and", "One day", "Ben had a red ball"]


def _greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, seed=0, ignore_eos=True)


def _gen(model, reqs, adapters=(), spec=None, **kw):
    eng = Engine(model, threads=2, detokenize=False, prefix_cache=False, speculate=spec, **kw)
    for name, path in adapters:
        eng.load_adapter(path, name)
    out = {}
    for r in eng.generate(reqs):
        assert not isinstance(r, tuple), r
        out[r.id] = r.token_ids
    return out


def _check(model, reqs, adapters=(), draft=None, **kw):
    """Each request alone, all of them in one batch (and in pairs), lookup and draft speculation:
    the same tokens every way. ``kw``: more Engine keywords (the KV cache's)."""
    alone = {}
    for r in reqs:
        alone.update(_gen(model, [r], adapters, max_batch=1, **kw))
    runs = {"batch": _gen(model, reqs, adapters, max_batch=len(reqs), **kw),
            "pairs": _gen(model, reqs, adapters, max_batch=2, **kw),
            "lookup": _gen(model, reqs, adapters, SpecConfig("lookup", k=4), max_batch=3, **kw)}
    if draft is not None:
        runs["draft"] = _gen(model, reqs, adapters, SpecConfig("draft", k=4, draft_model=draft), max_batch=3, **kw)
    for how, got in runs.items():
        bad = [k for k in alone if got[k] != alone[k]]
        assert not bad, f"{how}: requests {bad} differ from their run alone"


def _quantized(model, qtype):
    from infeng.quant.policy import plan, quantize_tensors
    return model.derived(quantize_tensors(model.tensors, plan(model.tensors, qtype)))


@pytest.mark.parametrize("dtype", ["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("name", ARCHS)
def test_every_architecture_alone_batched_speculative(name, dtype):
    model = load_model(ARCH / name)
    if dtype != "f32":
        model = _quantized(model, dtype)
    p = json.loads((ARCH / name / "reference.json").read_text())["prompt"]
    prompts = [p, p[:3], p + p[:5], p[2:], p[1:] + p[:2]]
    reqs = [Request(str(i), prompt_ids=q, params=_greedy(16)) for i, q in enumerate(prompts)]
    _check(model, reqs, draft=_quantized(load_model(ARCH / name), "q4_0"))


@pytest.mark.parametrize("dtype", ["f32", "bf16", "int8"])
def test_mixed_adapters_alone_batched_speculative(data_dir, tmp_path, dtype):
    base = load_model(data_dir / "stories260K-f32")
    model = _quantized(base, "q8_0")
    ads = []
    for n in sorted(p.name for p in PEFT.iterdir()):
        f32 = convert_peft(PEFT / n, tmp_path / f"{n}-f32.infeng-lora", model, dtype="f32")
        if dtype == "f32":
            ads.append((n, f32))
        else:
            out = tmp_path / f"{n}-{dtype}.infeng-lora"
            requantize(f32, out, model, dtype)
            ads.append((n, out))
    names = [n for n, _ in ads] + [None]
    reqs = [Request(str(i), p, params=_greedy(24), adapter=names[i % len(names)]) for i, p in enumerate(PROMPTS)]
    _check(model, reqs, ads, draft=_quantized(base, "q4_0"))


@pytest.mark.parametrize("kv", ["k=int4c,v=int4", "k=int8c,v=int8"])
def test_per_channel_keys_alone_batched_speculative(data_dir, kv):
    """Per-channel keys quantize a group of 16 positions once it is complete; a query reads its
    own group in f32 whether it is a prefill row, a decode step or a verified draft, and a
    rejected draft that completed a group leaves nothing behind: the same tokens every way."""
    base = load_model(data_dir / "stories260K-f32")
    reqs = [Request(str(i), p, params=_greedy(40)) for i, p in enumerate(PROMPTS)]
    _check(_quantized(base, "q8_0"), reqs, draft=_quantized(base, "q4_0"), kv_dtype=kv)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    from infeng.cli.main import main
    out = tmp_path_factory.mktemp("smollm2") / "smollm2.infeng"
    assert main(["convert", str(smollm2_gguf), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def smollm2_draft(smollm2):
    return requantized(load_model(smollm2, verify=False), "q4_0")


@pytest.mark.parametrize("adapter_dtype", [None, "bf16", "int8"])
def test_real_smollm2_alone_batched_speculative(smollm2, smollm2_draft, tmp_path, adapter_dtype):
    """The measurement that found the row-count dependence: SmolLM2 Q4_1 (K = 1536 in w_down, past
    the x16 kernels' k tile) with a random rank-16 adapter; grounded prompts from bench/spec."""
    model = load_model(smollm2, verify=False)
    ads = []
    if adapter_dtype:
        p = synthetic.make_adapter(smollm2, 16, dtype="f32", seed=1, path=tmp_path / "a-f32.infeng-lora")
        if adapter_dtype != "f32":
            q = tmp_path / f"a-{adapter_dtype}.infeng-lora"
            requantize(p, q, model, adapter_dtype)
            p = q
        ads = [("a", p)]
    prompts = load_prompts(ROOT / "bench" / "spec_prompts.jsonl")[:4]
    tok = Engine(model, threads=1).tokenizer
    reqs = [Request(p["id"], prompt_ids=prompt_ids(tok, p), params=_greedy(20),
                    adapter="a" if ads and i % 3 != 2 else None) for i, p in enumerate(prompts)]
    _check(model, reqs, ads, draft=smollm2_draft)
