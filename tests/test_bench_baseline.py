"""`infeng bench --baseline / --tolerance / --md`: the comparison on stored JSON pairs (no timing
in the comparison tests), and the command's wiring on a one-scenario run."""
import json

import pytest

from infeng.bench.baseline import against_baseline, comparable, load_bench_report, rows_markdown
from infeng.cli.main import main
from infeng.errors import InfengError


def report(path, metrics, command="bench"):
    path.write_text(json.dumps({"schema": "infeng.telemetry/1", "command": command, "metrics": metrics}))
    return path


BASE = {"pp128.infeng_tok_s": 900.0, "pp128.infeng_norm": 40.0, "pp128.infeng_over_llama_cpp": 2.0,
        "tg32.infeng_tok_s": 80.0, "tg32.infeng_norm": 4.0, "read_bandwidth_gb_s": 20.0}


def test_only_machine_independent_figures_are_compared():
    assert set(comparable(BASE)) == {"pp128.infeng_norm", "pp128.infeng_over_llama_cpp", "tg32.infeng_norm"}


def test_a_drop_beyond_tolerance_regresses_and_within_it_does_not():
    # absolute tok/s halved (a slower machine) while the normalised figures hold: nothing regresses
    slower_machine = dict(BASE, **{"pp128.infeng_tok_s": 450.0, "tg32.infeng_tok_s": 40.0,
                                   "pp128.infeng_norm": 38.0, "tg32.infeng_norm": 4.3})
    rows = {r.metric: r.status for r in against_baseline(slower_machine, comparable(BASE), 10.0)}
    assert rows == {"pp128.infeng_norm": "ok", "pp128.infeng_over_llama_cpp": "ok", "tg32.infeng_norm": "better"}
    # a 12 % slower kernel against a 10 % tolerance
    slower_kernel = dict(BASE, **{"pp128.infeng_norm": 40.0 * 0.88, "pp128.infeng_over_llama_cpp": 2.0 * 0.88})
    rows = against_baseline(slower_kernel, comparable(BASE), 10.0)
    assert sorted(r.metric for r in rows if r.regressed) == ["pp128.infeng_norm", "pp128.infeng_over_llama_cpp"]
    assert not [r for r in against_baseline(slower_kernel, comparable(BASE), 15.0) if r.regressed]


def test_a_figure_the_run_lacks_regresses_and_a_new_one_does_not():
    now = {"pp128.infeng_norm": 41.0, "pp128.infeng_over_llama_cpp": 2.1, "pp512.infeng_norm": 30.0}
    rows = {r.metric: r for r in against_baseline(now, comparable(BASE), 10.0)}
    assert rows["tg32.infeng_norm"].status == "missing" and rows["tg32.infeng_norm"].regressed
    assert rows["pp512.infeng_norm"].status == "new" and not rows["pp512.infeng_norm"].regressed
    md = rows_markdown(list(rows.values())).splitlines()
    assert md[0] == "| figure | baseline | current | change | status |"
    assert "| pp128.infeng_norm | 40 | 41 | +2.5 % | better |" in md


def test_bad_baseline_files_are_one_line(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    cases = [(tmp_path / "missing.json", "no such file"), (bad, "not a JSON report"),
             (report(tmp_path / "e.json", {"ppl": 3.0}, "eval"), "not an infeng bench report"),
             (report(tmp_path / "old.json", {"tg32.infeng_tok_s": 80.0}), "no figure to compare")]
    for path, msg in cases:
        with pytest.raises(InfengError, match=msg):
            load_bench_report(path)


def _bench(tmp_path, *extra):
    return main(["bench", "--kernel", "gemv", "--dtype", "f32", "--shape", "64x64", "--repeats", "1",
                 "--threads", "1", "--json", str(tmp_path / "run.json"), *extra])


def test_command_exits_3_on_a_regression_and_0_without(tmp_path, capsys):
    assert _bench(tmp_path, "--md") == 0
    out = capsys.readouterr().out
    assert "| scenario | unit | infeng | ÷ probe |" in out and "| gemv f32 64x64 | GB/s |" in out
    now = json.loads((tmp_path / "run.json").read_text())["metrics"]["gemv_f32_64x64.infeng_norm"]
    assert _bench(tmp_path, "--baseline", str(report(tmp_path / "low.json", {"gemv_f32_64x64.infeng_norm": now / 1e3}))) == 0
    high = report(tmp_path / "high.json", {"gemv_f32_64x64.infeng_norm": now * 1e3})
    assert _bench(tmp_path, "--baseline", str(high), "--md") == 3
    out = capsys.readouterr().out
    assert "| gemv_f32_64x64.infeng_norm |" in out and "| REGRESSED |" in out


def test_bad_options_are_one_line(tmp_path, capsys):
    assert _bench(tmp_path, "--tolerance", "150") == 1
    assert capsys.readouterr().err.strip() == "infeng: error: --tolerance must be a percentage in [0, 100), got 150"
    assert _bench(tmp_path, "--baseline", str(tmp_path / "nope.json")) == 1
    assert "nope.json: no such file" in capsys.readouterr().err
