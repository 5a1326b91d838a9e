"""`infeng convert` and `infeng generate` end to end, in-process, under every ISA variant."""
import json

import pytest

from infeng import kernels
from infeng.cli.main import main

from conftest import ISAS


@pytest.fixture(scope="session")
def converted(tmp_path_factory, data_dir):
    out = {}
    d = tmp_path_factory.mktemp("models")
    for folder in ("stories260K", "stories260K-f32"):
        p = d / f"{folder}.infeng"
        assert main(["convert", str(data_dir / folder), "-o", str(p)]) == 0
        out[folder] = p
    return out


@pytest.fixture
def isa(request, monkeypatch):
    monkeypatch.setenv("INFENG_ISA", request.param)
    kernels._active = None
    yield request.param
    kernels._active = None


def _reference(data_dir, folder):
    return json.loads((data_dir / folder / "reference.json").read_text())["greedy"]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("folder", ["stories260K-f32", "stories260K"])
@pytest.mark.parametrize("source", ["native", "hf"])
def test_greedy_60_tokens_equals_reference_text(isa, folder, source, converted, data_dir, capsys):
    model = converted[folder] if source == "native" else data_dir / folder
    rc = main(["generate", str(model), "--prompt", "Once upon a time", "--max-tokens", "60", "--temperature", "0"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out == _reference(data_dir, folder)["text"] + "\n"


def test_no_echo_prints_completion_only(converted, data_dir, capsys):
    assert main(["generate", str(converted["stories260K"]), "-p", "Once upon a time", "-n", "60", "-t", "0", "--no-echo"]) == 0
    ref = _reference(data_dir, "stories260K")["text"]
    assert capsys.readouterr().out == ref[len("Once upon a time"):] + "\n"


def test_empty_prompt_starts_from_bos(converted, capsys, tmp_path):
    tel = tmp_path / "t.json"
    assert main(["generate", str(converted["stories260K"]), "-p", "", "-n", "20", "-t", "0",
                 "--telemetry", str(tel)]) == 0
    assert len(capsys.readouterr().out.strip()) > 0
    rec = json.loads(tel.read_text())
    assert rec["metrics"]["prompt_tokens"] == 1 and rec["metrics"]["generated_tokens"] == 20


def test_seed_gives_identical_samples(converted, capsys):
    args = ["generate", str(converted["stories260K"]), "-p", "Lily", "-n", "40", "-t", "1.0", "--top-p", "0.9", "--top-k", "40"]
    outs = []
    for seed in ("7", "7", "8"):
        assert main(args + ["--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] != outs[2]


def test_batch_equals_one_at_a_time(converted, tmp_path, capsys):
    prompts = ["Once upon a time", "Lily", "The little dog was very happy because", "", "Tom and Sue went to"]
    req = tmp_path / "r.jsonl"
    req.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p, "max_tokens": 30 + 7 * i, "temperature": 0}) + "\n"
                           for i, p in enumerate(prompts)))
    out, tel = tmp_path / "o.jsonl", tmp_path / "t.csv"
    assert main(["generate", str(converted["stories260K-f32"]), "--batch", str(req), "--output", str(out),
                 "--telemetry", str(tel), "--max-batch", "4"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)]
    for i, (p, row) in enumerate(zip(prompts, rows)):
        capsys.readouterr()
        assert main(["generate", str(converted["stories260K-f32"]), "-p", p, "-n", str(30 + 7 * i), "-t", "0", "--no-echo"]) == 0
        single = capsys.readouterr().out
        assert row["text"] + "\n" == single, (i, p)
        assert row["usage"]["completion_tokens"] == len(row["token_ids"])
        assert row["finish_reason"] in ("length", "stop")
    assert tel.read_text().startswith("kind,index,key,value\n")


def test_telemetry_fields(converted, tmp_path, capsys):
    tel = tmp_path / "t.json"
    assert main(["generate", str(converted["stories260K"]), "-p", "Once upon a time", "-n", "30", "-t", "0",
                 "--threads", "1", "--telemetry", str(tel)]) == 0
    rec = json.loads(tel.read_text())
    assert rec["schema"] == "infeng.telemetry/1" and rec["command"] == "generate"
    m = rec["metrics"]
    for k in ("prefill_tok_s", "decode_tok_s", "ttft_ms_p50", "token_latency_ms_p50", "token_latency_ms_p99",
              "python_overhead_us_per_token", "peak_rss_mb"):
        assert m[k] > 0, k
    assert rec["meta"]["threads"] == 1 and rec["meta"]["isa"] in ISAS


def test_stdout_carries_only_text(data_dir, tmp_path, capsys):
    """Progress bars and summaries go to stderr: convert and batch runs print nothing on stdout."""
    out = tmp_path / "m.infeng"
    assert main(["convert", str(data_dir / "stories260K"), "-o", str(out)]) == 0
    req = tmp_path / "r.jsonl"
    req.write_text('{"prompt": "Once", "max_tokens": 3}\n')
    assert main(["generate", str(out), "--batch", str(req), "--output", str(tmp_path / "o.jsonl")]) == 0
    cap = capsys.readouterr()
    assert cap.out == "" and "infeng generate" in cap.err
