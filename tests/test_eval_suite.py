"""infeng eval suites: YAML loading, the stored nightly baseline, regression exit codes, bad input."""
import json
from pathlib import Path

import pytest

from infeng.cli.main import main
from infeng.errors import InfengError
from infeng.evals import suite as S

REPO = Path(__file__).resolve().parents[1]


def _suite(tmp_path, data_dir, tol="{rel: 0.003}"):
    s = tmp_path / "s.yaml"
    s.write_text(f"name: t\ndata_dir: {data_dir}\ntasks:\n  - name: ppl\n    task: perplexity\n"
                 f"    text: text/tinystories_sample.txt\n    tolerance:\n      ppl: {tol}\n")
    return s


def _with_ppl(report: Path, out: Path, factor: float) -> Path:
    d = json.loads(report.read_text())
    d["metrics"]["ppl.ppl"] *= factor
    out.write_text(json.dumps(d))
    return out


def test_regression_beyond_tolerance_exits_nonzero_with_table(data_dir, tmp_path, capsys):
    model = str(data_dir / "stories260K")
    suite = _suite(tmp_path, data_dir)
    rep = tmp_path / "r.json"
    assert main(["eval", model, "--suite", str(suite), "--json", str(rep), "--threads", "1"]) == 0
    # the stored baseline was 1% better: a regression (allowed 0.3%)
    capsys.readouterr()
    assert main(["eval", model, "--suite", str(suite), "--baseline", str(_with_ppl(rep, tmp_path / "b1.json", 0.99)),
                 "--threads", "1"]) == 3
    err = capsys.readouterr().err
    assert "REGRESSED" in err and "ppl.ppl" in err and "regressed beyond tolerance" in err
    # 0.1% better: within tolerance
    assert main(["eval", model, "--suite", str(suite), "--baseline", str(_with_ppl(rep, tmp_path / "b2.json", 0.999)),
                 "--threads", "1"]) == 0
    assert "REGRESSED" not in capsys.readouterr().err
    # a worse baseline: the run is better, exit 0
    assert main(["eval", "--threads", "1", model, "--suite", str(suite), "--baseline", str(_with_ppl(rep, tmp_path / "b3.json", 1.5))]) == 0
    assert "better" in capsys.readouterr().err


def test_compare_directions_and_missing_metrics():
    lower = S.parse_tolerance("ppl", {"rel": 0.01}, "t")
    higher = S.parse_tolerance("pass@1", {"abs": 0.05}, "t")
    rows = S.compare({"a.ppl": 10.05, "b.pass@1": 0.46}, {"a.ppl": 10.0, "b.pass@1": 0.5},
                     [("a.ppl", lower), ("b.pass@1", higher)])
    assert [r.status for r in rows] == ["ok", "ok"]
    rows = S.compare({"a.ppl": 10.2, "b.pass@1": 0.4}, {"a.ppl": 10.0, "b.pass@1": 0.5},
                     [("a.ppl", lower), ("b.pass@1", higher)])
    assert [r.status for r in rows] == ["REGRESSED", "REGRESSED"]
    rows = S.compare({}, {"a.ppl": 10.0}, [("a.ppl", lower), ("c.ppl", lower)])
    assert [r.status for r in rows] == ["missing", "new"] and rows[0].regressed and not rows[1].regressed
    with pytest.raises(InfengError, match="better"):
        S.parse_tolerance("weird_metric", {"abs": 1}, "t")


def test_nightly_suite_and_stored_baseline_are_valid(monkeypatch, data_dir):
    monkeypatch.setenv("INFENG_TEST_DATA", str(data_dir))
    suite = S.load_suite(REPO / "evals" / "nightly.yaml")
    assert [t.task for t in suite.tasks] == ["perplexity", "kld", "humaneval", "gsm8k"]
    assert Path(suite.tasks[0].options["text"]).is_file() and Path(suite.tasks[1].options["base"]).is_dir()
    rep = S.load_report(REPO / "evals" / "baselines" / "stories260K.json")
    for t in suite.tasks:
        for tol in t.tolerances:
            assert f"{t.name}.{tol.metric}" in rep["metrics"]
    assert rep["meta"]["model"]["weight_dtype"] == "bf16" and rep["meta"]["suite"] == "nightly"


def test_nightly_ppl_task_reproduces_the_stored_baseline(data_dir, tmp_path):
    """The perplexity part of the stored nightly report, recomputed (fast; the rest is the same code)."""
    rep = S.load_report(REPO / "evals" / "baselines" / "stories260K.json")
    out = tmp_path / "r.json"
    assert main(["eval", "--threads", "1", str(data_dir / "stories260K"), "--text", str(data_dir / "text" / "tinystories_sample.txt"),
                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())["metrics"]["perplexity.ppl"]
    assert got == pytest.approx(rep["metrics"]["ppl.ppl"], rel=1e-5)


BAD_SUITES = {
    "bad.yaml": ("tasks: [ {task: perplexity", "not valid YAML"),
    "unknown_task.yaml": ("tasks:\n  - task: mmlu\n", "unknown task 'mmlu'"),
    "unknown_opt.yaml": ("tasks:\n  - task: perplexity\n    txt: a.txt\n", "unknown option(s) txt"),
    "no_tasks.yaml": ("name: x\n", "'tasks' must be a non-empty list"),
    "bad_tol.yaml": ("tasks:\n  - task: perplexity\n    tolerance: {ppl: {abs: -1}}\n", "must be a number >= 0"),
    "bad_limit.yaml": ("tasks:\n  - task: perplexity\n    text: text/tinystories_sample.txt\n  - task: gsm8k\n    limit: ten\n",
                       "limit must be an integer >= 1"),
    "missing_text.yaml": ("tasks:\n  - task: perplexity\n    text: nope.txt\n", "no such file (for text)"),
    "env.yaml": ("data_dir: ${INFENG_NO_SUCH_VAR_XYZ}\ntasks:\n  - task: perplexity\n", "INFENG_NO_SUCH_VAR_XYZ is not set"),
}


@pytest.mark.parametrize("name", sorted(BAD_SUITES))
def test_bad_suite_one_line_nothing_written(name, data_dir, tmp_path, capsys):
    body, msg = BAD_SUITES[name]
    s = tmp_path / name
    s.write_text(f"data_dir: {data_dir}\n" + body if "data_dir" not in body and body.startswith("tasks") else body)
    out = tmp_path / "r.json"
    assert main(["eval", "--threads", "1", str(data_dir / "stories260K"), "--suite", str(s), "--json", str(out)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("infeng: error:") and err.count("\n") == 1 and msg in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == [s]


@pytest.mark.parametrize("args,msg", [
    (["--task", "mmlu"], "unknown task 'mmlu'"),
    (["--text", "/nonexistent/x.txt"], "no such file"),
    ([], "nothing to evaluate"),
    (["--suite", "/nonexistent/s.yaml"], "no such file"),
    (["--text", "{text}", "--baseline", "/nonexistent/b.json"], "no such file"),
    (["--text", "{text}", "--shots", "3"], "--shots do not apply"),
    (["--task", "gsm8k", "--shots", "99", "--limit", "1"], "--shots must be in 0..8"),
    (["--text", "{text}", "--stride", "600"], "--stride 600"),
    (["--text", "{text}", "--json", "/nonexistent/dir/r.json"], "no such directory"),
    (["--kld", "{text}", "--text", "{text}"], "error"),
])
def test_bad_input_one_line(args, msg, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("INFENG_TEST_DATA", str(data_dir))
    text = str(data_dir / "text" / "tinystories_sample.txt")
    args = [a.replace("{text}", text) for a in args]
    out = tmp_path / "r.json"
    rc = main(["eval", "--threads", "1", str(data_dir / "stories260K"), *args] + ([] if "--json" in args else ["--json", str(out)]))
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("infeng: error:") and err.count("\n") == 1 and msg in err, err
    assert not out.exists()


def test_missing_model_one_line(tmp_path, capsys):
    assert main(["eval", "--threads", "1", str(tmp_path / "nope.infeng"), "--text", str(tmp_path)]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_compare_variants_side_by_side(data_dir, tmp_path, capsys):
    src = (data_dir / "text" / "tinystories_sample.txt").read_text()
    (tmp_path / "one.txt").write_text(src.split("<|endoftext|>")[0])
    text = str(tmp_path / "one.txt")
    f32, bf = str(data_dir / "stories260K-f32"), str(data_dir / "stories260K")
    out, single = tmp_path / "c.json", tmp_path / "s.json"
    assert main(["eval", "--threads", "1", f32, "--kld", f32, "--text", text, "--compare", bf, "--json", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "side by side" in err and "stories260K-f32" in err
    rep = json.loads(out.read_text())
    assert main(["eval", "--threads", "1", bf, "--kld", f32, "--text", text, "--json", str(single), "--no-progress"]) == 0
    one = json.loads(single.read_text())["metrics"]
    for mm in ("kld_mean", "ppl", "top1_agreement"):
        assert rep["metrics"][f"stories260K/kld.{mm}"] == pytest.approx(one[f"kld.{mm}"], rel=1e-9)
    assert abs(rep["metrics"]["kld.kld_mean"]) < 1e-6
    assert rep["meta"]["variants"][0]["label"] == "stories260K"
    assert {r.get("variant") for r in rep["records"]} == {None, "stories260K"}
    # a variant that cannot load: one line, before any work, nothing written
    capsys.readouterr()
    assert main(["eval", "--threads", "1", f32, "--text", text, "--compare", str(tmp_path / "missing"), "--json", str(out.with_name("x.json"))]) == 1
    assert capsys.readouterr().err.count("\n") == 1 and not out.with_name("x.json").exists()


def test_suite_option_for_no_task_is_refused(data_dir, tmp_path, capsys):
    suite = _suite(tmp_path, data_dir)
    assert main(["eval", "--threads", "1", str(data_dir / "stories260K"), "--suite", str(suite), "--shots", "2"]) == 1
    err = capsys.readouterr().err
    assert "--shots apply to no task" in err and err.count("\n") == 1
