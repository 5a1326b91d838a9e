"""infeng eval --adapter: every task computes with a LoRA/DoRA adapter on the model."""
import json
from pathlib import Path

import numpy as np
import pytest

from infeng.cli.main import main
from infeng.model.adapter import convert_peft
from infeng.model.loader import load_model
from infeng.runtime.engine import Engine, Request
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.scorer import Scorer

FIX = Path(__file__).parent / "fixtures" / "peft"


@pytest.fixture(scope="module")
def base(data_dir):
    return load_model(data_dir / "stories260K-f32")


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-adapters")
    return {n: convert_peft(FIX / n, d / f"{n}.infeng-lora", base, dtype="f32")
            for n in ("dora_r4_attn_down", "lora_r8_all_rslora")}


@pytest.mark.parametrize("name", ["dora_r4_attn_down", "lora_r8_all_rslora"])
def test_scorer_with_adapter_matches_peft(base, files, name):
    rec = json.loads((FIX / name / "logits.json").read_text())
    for mt in (256, 5):   # one chunk, and chunks through the KV cache
        lg = Scorer(base, threads=1, adapter=files[name], max_tokens=mt).logits(rec["input_ids"])
        np.testing.assert_allclose(lg[-1], rec["last_logits"], atol=1e-3)


def test_cli_adapter_ppl_kld_and_generation(base, files, data_dir, tmp_path, capsys):
    f32 = str(data_dir / "stories260K-f32")
    src = (data_dir / "text" / "tinystories_sample.txt").read_text()
    text = tmp_path / "one.txt"
    text.write_text(src.split("<|endoftext|>")[0])
    ad = str(files["lora_r8_all_rslora"])
    out = tmp_path / "a.json"
    assert main(["eval", f32, "--threads", "1", "--adapter", ad, "--kld", f32, "--text", str(text),
                 "--json", str(out), "--no-progress"]) == 0
    rep = json.loads(out.read_text())
    m = rep["metrics"]
    assert m["kld.kld_mean"] > 1e-4 and m["kld.ppl"] != pytest.approx(m["kld.base_ppl"], rel=1e-6)
    assert rep["meta"]["adapter"]["rank"] == 8 and len(rep["meta"]["adapter"]["sha256"]) == 64
    # generation tasks run with the adapter: the same text as the Engine with that adapter
    g = tmp_path / "g.json"
    assert main(["eval", f32, "--threads", "1", "--adapter", ad, "--task", "gsm8k", "--limit", "2", "--shots", "0",
                 "--max-tokens", "20", "--json", str(g), "--no-progress",
                 "--file", str(data_dir / "evals" / "gsm8k_test.jsonl")]) == 0
    recs = json.loads(g.read_text())["records"]
    from infeng.evals import gsm8k as G
    items = G.load_items(data_dir / "evals" / "gsm8k_test.jsonl")[:2]
    eng = Engine(base, threads=1, max_batch=1)
    eng.load_adapter(ad, "x")
    for it, r in zip(items, recs):
        res = next(eng.generate([Request(id="0", prompt=G.prompt(it.question, 0), adapter="x",
                                         params=SamplingParams(max_tokens=20, temperature=0, seed=0, stop=G.STOP[:1]))]))
        assert r["completion"] == eng.tokenizer.completion_text(res.prompt_ids, res.token_ids)[:500]
    # a missing adapter: one line, nothing written
    capsys.readouterr()
    bad = tmp_path / "b.json"
    assert main(["eval", f32, "--adapter", str(tmp_path / "none.infeng-lora"), "--text", str(text), "--json", str(bad)]) == 1
    assert capsys.readouterr().err.count("\n") == 1 and not bad.exists()


def test_compare_base_adapter_quantized_side_by_side(base, files, data_dir, tmp_path, capsys):
    f32 = str(data_dir / "stories260K-f32")
    src = (data_dir / "text" / "tinystories_sample.txt").read_text()
    text = tmp_path / "one.txt"
    text.write_text(src.split("<|endoftext|>")[0])
    ad = str(files["dora_r4_attn_down"])
    out = tmp_path / "c.json"
    assert main(["eval", f32, "--threads", "1", "--kld", f32, "--text", str(text), "--compare", f"{f32}::{ad}",
                 "--compare", str(data_dir / "stories260K"), "--json", str(out), "--no-progress"]) == 0
    rep = json.loads(out.read_text())
    lab = f"stories260K-f32+{Path(ad).name}"
    assert [v["label"] for v in rep["meta"]["variants"]] == [lab, "stories260K"]
    assert rep["meta"]["variants"][0]["adapter"]["dora"] is True and rep["meta"]["variants"][1]["adapter"] is None
    m = rep["metrics"]
    assert abs(m["kld.kld_mean"]) < 1e-6 and m[f"{lab}/kld.kld_mean"] > 1e-5 and m["stories260K/kld.kld_mean"] > 1e-6
    # the adapter variant equals a run with --adapter
    one = tmp_path / "one.json"
    assert main(["eval", f32, "--threads", "1", "--adapter", ad, "--kld", f32, "--text", str(text),
                 "--json", str(one), "--no-progress"]) == 0
    assert json.loads(one.read_text())["metrics"]["kld.kld_mean"] == pytest.approx(m[f"{lab}/kld.kld_mean"], rel=1e-9)
    assert "side by side" in capsys.readouterr().err
