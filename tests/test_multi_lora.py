"""Mixed-adapter batches through the C forward pass: PEFT-recorded logits, reference greedy, and
every row of a mixed batch equal to that row run alone with its adapter."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from infeng.cli.main import main
from infeng.errors import InfengError
from infeng.model.adapter import convert_peft, reference_with_adapter
from infeng.model.loader import load_model
from infeng.runtime.engine import Engine, FinishEvent, Request
from infeng.runtime.sampler import SamplingParams

FIX = Path(__file__).parent / "fixtures" / "peft"
NAMES = sorted(p.name for p in FIX.iterdir())


@pytest.fixture(scope="module")
def base(data_dir):
    return load_model(data_dir / "stories260K-f32")


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return {n: convert_peft(FIX / n, d / f"{n}.infeng-lora", base, dtype="f32") for n in NAMES}


@pytest.fixture(scope="module")
def files_int8(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters_int8")
    return {n: convert_peft(FIX / n, d / f"{n}.infeng-lora", base, dtype="int8") for n in NAMES}


def _greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, seed=0, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_c_logits_match_peft(kern, base, files, name):
    eng = Engine(base, threads=2, max_batch=2, isa=kern.ffi.string(kern.lib.ifg_isa()).decode())
    eng.load_adapter(files[name], name)
    rec = json.loads((FIX / name / "logits.json").read_text())
    eng.submit(Request(id="x", prompt_ids=rec["input_ids"], params=_greedy(1), adapter=name))
    eng.step()                                       # the prefill step: logits of the last prompt token
    np.testing.assert_allclose(eng.net.logits[0], rec["last_logits"], atol=1e-3)
    list(eng.stream())


@pytest.mark.parametrize("storage", ["f32", "int8"])
def test_mixed_batch_rows_equal_alone(base, files, files_int8, storage):
    files = files if storage == "f32" else files_int8
    prompts = ["Once upon a time", "Lily and Ben", "The little dog", "One day", "Tom had a red ball"]
    adapters = [NAMES[0], None, NAMES[1], NAMES[3], NAMES[2]]
    alone = {}
    for i, (p, a) in enumerate(zip(prompts, adapters)):
        e = Engine(base, threads=1, max_batch=1)
        if a:
            e.load_adapter(files[a], a)
        alone[str(i)] = next(e.generate([Request(id=str(i), prompt=p, params=_greedy(25), adapter=a)])).token_ids
        ref = reference_with_adapter(base, e.adapters.get(a).adapter if a else None)
        assert ref.greedy(e.tokenizer.encode(p), 25)[:len(alone[str(i)])] == alone[str(i)]
    eng = Engine(base, threads=2, max_batch=4, max_batch_tokens=9)       # chunked, mixed, preempting slots
    for a in set(filter(None, adapters)):
        eng.load_adapter(files[a], a)
    got = {r.id: r.token_ids for r in eng.generate(
        [Request(id=str(i), prompt=p, params=_greedy(25), adapter=a) for i, (p, a) in enumerate(zip(prompts, adapters))])}
    assert got == alone
    assert all(a.in_use == 0 for a in eng.adapters.loaded.values())


def test_decode_rows_grouped_by_adapter(base, files):
    """Rows of a decode step are grouped by adapter: one segment per adapter, so each adapter's
    weights are read once per step however the requests interleave."""
    eng = Engine(base, threads=2, max_batch=6, max_batch_tokens=64)
    for n in NAMES[:2]:
        eng.load_adapter(files[n], n)
    order = [NAMES[0], NAMES[1], None, NAMES[0], NAMES[1], None]
    for i, a in enumerate(order):
        eng.submit(Request(id=str(i), prompt="Once upon a time", params=_greedy(8), adapter=a))
    eng.step()                                                   # all six prompts prefill together
    eng.step()                                                   # six decode rows
    names = [a.name if a else None for a in eng.packer.seg_ad]
    assert len(names) == 3 and sorted(names, key=str) == sorted([NAMES[0], NAMES[1], None], key=str)
    list(eng.stream())


@pytest.mark.parametrize("name", NAMES)
def test_c_logits_int8_match_reference(kern, base, files_int8, name):
    """int8 adapters in the C forward pass compute what the numpy reference computes with the
    kernels' rounding of the activations (reference_with_adapter(kernel_rounding=True); the int8
    rounding itself is judged against PEFT in test_adapters.py). The kernels' arithmetic is exact
    against int8_lora_product (test_kernels_lora.py); here the C and numpy activations differ in
    the last bits, so a value on a rounding boundary may round the other way (a jump of ~1 % of
    the logit scale on these fixtures, whose adapters move the logits by 20-150 %)."""
    eng = Engine(base, threads=2, max_batch=2, isa=kern.ffi.string(kern.lib.ifg_isa()).decode())
    la = eng.load_adapter(files_int8[name], name)
    ids = json.loads((FIX / name / "logits.json").read_text())["input_ids"]
    want = reference_with_adapter(base, la.adapter, kernel_rounding=True).forward(ids)[-1]
    none = reference_with_adapter(base, None).forward(ids)[-1]
    eng.submit(Request(id="x", prompt_ids=ids, params=_greedy(1), adapter=name))
    eng.step()
    err, scale = np.abs(eng.net.logits[0] - want).max(), np.abs(want).max()
    assert err < 0.02 * scale and err < np.abs(none - want).max() / 10, (err, scale)
    list(eng.stream())


@pytest.mark.parametrize("name", NAMES)
def test_c_logits_bf16_act_match_reference(kern, base, tmp_path, name):
    """bf16 adapters on a base whose bf16_act rounds bf16 matrices' input go as bf16 dot products
    (x and h rounded to bf16: bf16_lora_product, reference_with_adapter(kernel_rounding=True)):
    the C forward pass computes what the numpy reference does, but for an h within a hair of a
    bf16 rounding boundary, which may round the other way (a bf16 step of that value)."""
    model = dataclasses.replace(base, bf16_act="bf16")
    eng = Engine(model, threads=2, max_batch=2, isa=kern.ffi.string(kern.lib.ifg_isa()).decode())
    la = eng.load_adapter(convert_peft(FIX / name, tmp_path / f"{name}.infeng-lora", base, dtype="bf16"), name)
    ids = json.loads((FIX / name / "logits.json").read_text())["input_ids"]
    want = reference_with_adapter(model, la.adapter, kernel_rounding=True).forward(ids)[-1]
    exact = reference_with_adapter(base, la.adapter).forward(ids)[-1]      # bf16 weights, exact products
    eng.submit(Request(id="x", prompt_ids=ids, params=_greedy(1), adapter=name))
    eng.step()
    err, scale = np.abs(eng.net.logits[0] - want).max(), np.abs(want).max()
    assert err < 2e-3 * scale and err < np.abs(exact - want).max() / 4, (err, scale)
    list(eng.stream())


def test_unknown_adapter_is_rejected(base, files):
    eng = Engine(base, threads=1, max_batch=1)
    fin = [ev.result for ev in eng.stream([Request(id="x", prompt="Lily", params=_greedy(3), adapter="nope")])
           if isinstance(ev, FinishEvent)]
    assert fin[0].finish_reason == "rejected" and "adapter 'nope' is not loaded" in fin[0].error


def test_hot_reload_budget_and_pinning(base, files, tmp_path):
    one = files[NAMES[0]].stat().st_size
    eng = Engine(base, threads=1, max_batch=1, adapter_budget_mb=2.5 * one / 2**20 * 1.0)
    eng.load_adapter(files[NAMES[0]], "a", pinned=True)
    eng.load_adapter(files[NAMES[0]], "b")
    eng.load_adapter(files[NAMES[0]], "c")           # over budget: evicts b (LRU, not pinned)
    assert set(eng.adapters.loaded) == {"a", "c"} and eng.adapters.evictions == 1
    before = next(eng.generate([Request(id="1", prompt="Lily", params=_greedy(10), adapter="c")])).token_ids
    # hot reload: the file behind "c" changes to another adapter
    import shutil
    import os
    path = tmp_path / "c.infeng-lora"
    shutil.copy(files[NAMES[0]], path)
    eng.load_adapter(path, "c")
    shutil.copy(files[NAMES[2]], path)
    os.utime(path, (1, 1))
    assert eng.adapters.reload_changed() == ["c"]
    after = next(eng.generate([Request(id="2", prompt="Lily", params=_greedy(10), adapter="c")])).token_ids
    assert after != before
    with pytest.raises(InfengError, match="more than the adapter budget"):
        Engine(base, threads=1, max_batch=1, adapter_budget_mb=0.001).load_adapter(files[NAMES[0]])


def test_cli_adapters(base, files, tmp_path, data_dir, capsys):
    d = tmp_path / "ad"
    d.mkdir()
    for n in NAMES:
        (d / f"{n}.infeng-lora").write_bytes(files[n].read_bytes())
    req = tmp_path / "r.jsonl"
    req.write_text("".join(json.dumps({"id": n, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0,
                                       "adapter": n}) + "\n" for n in NAMES) +
                   json.dumps({"id": "none", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}) + "\n" +
                   json.dumps({"id": "bad", "prompt": "x", "adapter": "missing"}) + "\n")
    out = tmp_path / "o.jsonl"
    model = str(data_dir / "stories260K-f32")
    assert main(["generate", model, "--adapters-dir", str(d), "--batch", str(req), "--output", str(out)]) == 0
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "adapter 'missing' is not loaded" in rows["bad"]["error"]
    for n in NAMES + ["none"]:
        e = Engine(base, threads=1, max_batch=1)
        a = e.load_adapter(d / f"{n}.infeng-lora", n).name if n != "none" else None
        want = next(e.generate([Request(id=n, prompt="Once upon a time", params=_greedy(12), adapter=a)]))
        assert rows[n]["token_ids"] == want.token_ids, n
    assert rows["lora_r8_all_rslora"]["text"] != rows["none"]["text"]
    capsys.readouterr()
    assert main(["generate", model, "--adapter", str(files[NAMES[1]]), "-p", "Once upon a time", "-n", "12",
                 "-t", "0", "--no-echo"]) == 0
    assert capsys.readouterr().out == rows[NAMES[1]]["text"] + "\n"


def test_lora_on_a_quantized_base(base, files, tmp_path, data_dir, capsys):
    """An adapter made for the f32 model applies to its q8_0 quantization (lineage), in mixed batches."""
    src = tmp_path / "f32.infeng"
    q8 = tmp_path / "q8.infeng"
    assert main(["convert", str(data_dir / "stories260K-f32"), "-o", str(src)]) == 0
    assert main(["quantize", str(src), "-o", str(q8), "--type", "q8_0"]) == 0
    qbase = load_model(q8)
    f32_adapter = convert_peft(FIX / "dora_r4_attn_down", tmp_path / "d.infeng-lora", load_model(src), dtype="f32")
    eng = Engine(qbase, threads=2, max_batch=3)
    eng.load_adapter(f32_adapter, "d")
    eng.load_adapter(convert_peft(FIX / "lora_r8_all_rslora", tmp_path / "l.infeng-lora", load_model(src)), "l")
    prompts = [("Once upon a time", "d"), ("Lily", "l"), ("One day", None)]
    got = {r.id: r.token_ids for r in eng.generate(
        [Request(id=p, prompt=p, params=_greedy(20), adapter=a) for p, a in prompts])}
    for p, a in prompts:
        e = Engine(qbase, threads=1, max_batch=1)
        if a:
            e.load_adapter(tmp_path / ("d.infeng-lora" if a == "d" else "l.infeng-lora"), a)
        assert next(e.generate([Request(id=p, prompt=p, params=_greedy(20), adapter=a)])).token_ids == got[p]
    # close to the adapter on the f32 base: the recorded PEFT logits
    rec = json.loads((FIX / "dora_r4_attn_down" / "logits.json").read_text())
    e = Engine(qbase, threads=1, max_batch=1)
    e.load_adapter(f32_adapter, "d")
    e.submit(Request(id="x", prompt_ids=rec["input_ids"], params=_greedy(1), adapter="d"))
    e.step()
    assert int(np.argmax(e.net.logits[0])) == int(np.argmax(rec["last_logits"]))
    assert np.abs(e.net.logits[0] - np.array(rec["last_logits"])).max() < 0.5


def test_peft_peer_skips_cleanly_without_torch(monkeypatch, capsys, tmp_path):
    """The PEFT peer is optional: with torch / transformers / peft missing it says so in one line
    and exits 0, before touching the model."""
    import sys
    for mod in ("torch", "transformers", "peft"):
        monkeypatch.setitem(sys.modules, mod, None)          # import raises ImportError
    suite = Path(__file__).resolve().parents[1] / "bench" / "peft_lora.yaml"
    assert main(["bench", "--suite", str(suite), "--model", str(tmp_path / "no-such-model.infeng")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "note: peft peer skipped: PEFT peer needs torch==2.13.0" in err and "torch is missing" in err


def test_scenario_int8_adapters_on_a_q8_0_base(tmp_path, data_dir, monkeypatch):
    """lora_scenarios' adapters for any base file, int8 ones rounded from the f32 ones; the
    mixed batch runs and every row equals that row run alone."""
    from infeng.bench.lora_scenarios import adapter_file
    monkeypatch.setenv("INFENG_CACHE", str(tmp_path / "cache"))
    src, q8 = tmp_path / "f32.infeng", tmp_path / "q8.infeng"
    assert main(["convert", str(data_dir / "stories260K-f32"), "-o", str(src)]) == 0
    assert main(["quantize", str(src), "-o", str(q8), "--type", "q8_0"]) == 0
    qbase = load_model(q8)
    p8 = adapter_file(q8, qbase, 8, "int8", seed=3)
    pf = adapter_file(q8, qbase, 8, "f32", seed=3)
    assert adapter_file(q8, qbase, 8, "int8", seed=3) == p8            # cached
    eng = Engine(qbase, threads=2, max_batch=3)
    assert eng.load_adapter(p8, "i8").adapter.storage == "int8"
    eng.load_adapter(pf, "f32")
    prompts = [("Once upon a time", "i8"), ("Lily", "f32"), ("One day", "i8")]
    got = {r.id: r.token_ids for r in eng.generate(
        [Request(id=p, prompt=p, params=_greedy(12), adapter=a) for p, a in prompts])}
    for p, a in prompts:
        e = Engine(qbase, threads=1, max_batch=1)
        e.load_adapter(p8 if a == "i8" else pf, a)
        assert next(e.generate([Request(id=p, prompt=p, params=_greedy(12), adapter=a)])).token_ids == got[p]
    # the forward pass rounds each projection input to int8 once (ifg_scratch.xq), shared by the x16
    # GEMMs and the int8 adapters' shrink; without it each rounds x itself: the same bits
    from infeng.runtime.session import ForwardSession
    la = eng.adapters.get("i8")
    T = 6
    logits = []
    for shared in (True, False):
        fs = ForwardSession(eng.kern, qbase, max_tokens=T, max_out=T, threads=2, n_slots=2, max_seq_len=16,
                            block_size=4)
        if not shared:
            fs.net.structs.set(fs.net.s, xq=None)
        assert fs.kv.ensure(0, 8) and fs.kv.ensure(1, 8)
        fs.lora.reserve(la.kernel_rank)
        lb = fs.lora_segments([la.table, None], [0, 3], T)                # rows 0-2 adapter i8, rows 3-5 none
        fs.tokens[:T], fs.pos[:T], fs.seq[:T], fs.out_rows[:T] = [1, 5, 9, 1, 7, 3], [0, 1, 2, 0, 1, 2], [0] * 3 + [1] * 3, range(T)
        fs.run(T, T, lb)
        logits.append(fs.logits[:T].copy())
    np.testing.assert_array_equal(logits[0], logits[1])
    # the overhead benchmark's paired steps run on this base too (a tiny run: its shape, not its numbers)
    from infeng.bench.lora_scenarios import overhead
    all7, qv = overhead(q8, [4], 2, batch=4, n_adapters=2, prompt_len=20, n_out=3, repeats=1, dtype="int8")
    assert (all7["targets"], qv["targets"]) == ("all7", "qv")          # every projection; PEFT's default
    for rec in (all7, qv):
        for k in ("prefill", "decode"):
            assert rec[f"{k}_tok_s_none"] > 0 and rec[f"{k}_tok_s_mixed"] > 0
            assert np.isfinite(rec[f"{k}_overhead"]) and np.isfinite(rec[f"{k}_overhead_pair_median"])
        assert 0 < rec["floor_step_bytes_ratio"] < rec["floor_bytes_ratio"] < 1
        assert rec["decode_overhead_above_floor"] == rec["decode_overhead"] - rec["floor_step_bytes_ratio"]
    assert qv["floor_bytes_ratio"] < all7["floor_bytes_ratio"] / 2            # 2 of 7 projections, the small ones
    # and the Zipf scenario: single adapter, then α, in two passes (the second reversed), averaged
    from infeng.bench.lora_scenarios import zipf
    single, z, hot = zipf(q8, 2, alphas=(1.0,), n_adapters=3, n_requests=4, rank=4, prompt_len=8, n_out=2,
                          batch=2, dtype="int8", rounds=2)
    assert single["distinct_adapters"] == 1 and z["runs"] == 2 and z["adapter_dtype"] == "int8"
    assert z["tok_s"] > 0 and z["tok_s_vs_single"] > 0 and hot["hot_time_to_first_token_s"] >= hot["hot_load_s"] > 0


def test_llamacpp_lora_peer_skips_cleanly_without_llama_cpp(monkeypatch, capsys, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    suite = Path(__file__).resolve().parents[1] / "bench" / "llamacpp_lora.yaml"
    out = tmp_path / "peer.json"
    assert main(["bench", "--suite", str(suite), "--model", str(tmp_path / "no-such-model.infeng"),
                 "--json", str(out)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "note: llama.cpp lora peer skipped: llama.cpp peer needs llama-cpp-python" in err
    doc = json.loads(out.read_text())
    assert doc["records"] == [] and doc["meta"]["suite"] == "llamacpp_lora"


def test_gguf_lora_runs_in_llama_cpp_like_infeng(base, files, tmp_path):
    """Optional (llama-cpp-python installed): llama.cpp with the exported base + GGUF LoRA gives
    infeng's greedy tokens with that adapter."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from infeng.converters.gguf_lora import write_gguf_lora
    from infeng.converters.gguf_write import write_gguf
    g = write_gguf(base, tmp_path / "base.gguf")
    e = Engine(base, threads=1, max_batch=1)
    a = e.load_adapter(files["lora_r8_all_rslora"], "r")
    lora = write_gguf_lora(a.adapter, base, tmp_path / "r.gguf")
    prompt = [1, 403, 407, 261, 378]
    ours = next(e.generate([Request(id="x", prompt_ids=prompt, params=_greedy(12, ignore_eos=True), adapter="r")])).token_ids
    none = next(e.generate([Request(id="y", prompt_ids=prompt, params=_greedy(12, ignore_eos=True))])).token_ids
    llm = llama_cpp.Llama(model_path=str(g), lora_path=str(lora), n_threads=1, n_ctx=64, logits_all=True, verbose=False)
    llm.eval(prompt)
    theirs = []
    for _ in range(12):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    llm.close()
    assert theirs == list(ours) and list(ours) != list(none)


def test_lora_bench_bad_input_is_one_line(tmp_path, capsys):
    """The overhead benchmark and the peers (`infeng bench` suite kinds) check what they are given
    before minutes of work: one line naming the option or file, a non-zero exit, no traceback, no
    telemetry file."""
    missing = str(tmp_path / "no-such-model.infeng")
    suite = tmp_path / "lora.yaml"
    for body, extra, msg in (("ranks: [4]", ["--json", str(tmp_path / "t.jsonl")], "suffix must be .json"),
                             ("ranks: [16, x]", [], "`ranks` must be a list of positive integers"),
                             ("ranks: [4]", ["--json", str(tmp_path / "t.json")], "no such file")):
        suite.write_text(f"kind: lora_overhead\n{body}\n")
        assert main(["bench", "--suite", str(suite), "--model", missing] + extra) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("infeng: error:") and msg in err[0]
    assert not (tmp_path / "t.json").exists()
    peer = Path(__file__).resolve().parents[1] / "bench" / "llamacpp_lora.yaml"
    if main(["bench", "--suite", str(peer), "--model", missing]) == 1:   # 0: llama-cpp-python is not installed (skipped)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no such file" in err[0]
