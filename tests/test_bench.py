"""`infeng bench` code paths on stories260K with a tiny budget (no timing assertions), the kernel
micro-benchmarks, the bandwidth kernel, telemetry output and the peers' clean skip."""
import builtins
import csv
import json
import sys
import types

import numpy as np
import pytest

from infeng.bench import micro, peers, suite as S
from infeng.bench.comparisons import COMPARISONS, ComparisonSuite
from infeng.bench.kinds import KINDS
from infeng.cli.main import main
from infeng.errors import InfengError

from conftest import P


def test_read_sum_every_isa_and_thread_count(kern):
    rng = np.random.default_rng(0)
    for n in (0, 1, 63, 64, 65, 1000, 100_003):
        x = rng.standard_normal(n).astype(np.float32)
        want = float(x.astype(np.float64).sum())
        for th in (1, 2, 3):
            got = kern.lib.ifg_read_sum(P(kern, x), n, th)
            assert abs(got - want) <= 1e-4 * max(1.0, np.abs(x).sum()), (n, th)
        # deterministic for a given thread count
        assert kern.lib.ifg_read_sum(P(kern, x), n, 2) == kern.lib.ifg_read_sum(P(kern, x), n, 2)


def test_micro_cases_run(kern):
    for case in (micro.matmul_case(kern, "bf16", "64x172", 1, 1), micro.matmul_case(kern, "f32", "32x64", 4, 1),
                 micro.attention_case(kern, 40, 8, 4, 8, threads=1), micro.bandwidth_case(kern, 1, 1),
                 micro.attention_case(kern, 40, 8, 4, 16, threads=1, kv="int4")):
        dt = micro.time_once(case, min_time=0.0, max_iters=2)
        assert dt > 0 and case.bytes > 0


def test_gemv_case_matches_numpy(kern):
    case = micro.matmul_case(kern, "f32", "48x64", 1, 1)
    case.run()
    w, x, y = case.keep
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-5)


def test_gemm_case_with_x_quantized_beforehand(kern):
    """"+xq" hands the kernel x quantized once (as forward.c does): the same products."""
    outs = []
    for dtype in ("q6_k", "q6_k+xq"):
        case = micro.matmul_case(kern, dtype, "32x512", 20, 1)
        case.run()
        outs.append(case.keep[2])
    assert np.abs(outs[0]).max() > 0
    np.testing.assert_array_equal(outs[0], outs[1])


PEAK_BUILD = {"scalar": set(), "avx2": {"vfmadd_ymm", "vpmaddubsw_ymm"},
              "avx512": {"vpdpbusd_zmm", "vdpbf16ps_zmm", "vfmadd_zmm", "vfmadd_ymm", "vpmaddubsw_ymm"}}


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_peak_probe_issues_what_its_build_has(kern, threads):
    """ifg_peak issues 16 instructions a round on every thread when the build has the op, none
    otherwise (so a probe never reports a rate the kernels cannot use); bad op codes issue none."""
    from infeng.kernels.abi import PEAK_OP
    isa = kern.__name__.rsplit("_", 1)[-1]
    assert set(micro.PEAK_OPS_PER_INSTR) == set(PEAK_OP)
    for op, code in PEAK_OP.items():
        got = kern.lib.ifg_peak(code, 5, threads)
        assert got == (16 * 5 * threads if op in PEAK_BUILD[isa] else 0), (isa, op)
    assert kern.lib.ifg_peak(-1, 5, threads) == 0 and kern.lib.ifg_peak(len(PEAK_OP), 5, threads) == 0
    assert kern.lib.ifg_peak(PEAK_OP["vfmadd_ymm"], 0, threads) == 0
    for op in PEAK_BUILD[isa]:
        case = micro.peak_case(kern, op, threads)
        assert micro.time_once(case, min_time=0.0, max_iters=1) > 0
        assert case.flops == 16 * threads * micro.PEAK_ROUNDS * micro.PEAK_OPS_PER_INSTR[op]
    for op in set(PEAK_OP) - PEAK_BUILD[isa]:
        with pytest.raises(InfengError, match=f"build {isa} cannot issue it"):
            micro.peak_case(kern, op, threads)
    with pytest.raises(InfengError, match="expected one of int8_dot, bf16_dot, f32_fma, vpdpbusd_zmm"):
        micro.peak_case(kern, "vpdpbusd", threads)
    for role, ops in micro.PEAK_ROLES.items():   # a role is the widest op of the build
        have = [o for o in ops if o in PEAK_BUILD[isa]]
        if have:
            assert micro.peak_case(kern, role, threads).name == f"peak {have[0]}"
        else:
            with pytest.raises(InfengError, match=f"build {isa} issues none of"):
                micro.peak_case(kern, role, threads)


def test_bad_shape_and_dtype():
    with pytest.raises(InfengError, match="ROWSxCOLS"):
        micro.parse_shape("2048")
    with pytest.raises(InfengError, match="dtype"):
        micro.random_weight("f8", 4, 4)


TINY = """
model: {model}
threads: 1
repeats: 2
peers: [llama.cpp]
scenarios:
  - {{kind: bandwidth, mb: 1, min_time: 0.0}}
  - {{kind: gemv, dtype: bf16, shape: 64x172, min_time: 0.0}}
  - {{kind: gemm, dtype: f32, shape: 64x64, tokens: 4, min_time: 0.0}}
  - {{kind: attention, depth: 20, n_heads: 8, n_kv_heads: 4, head_dim: 8, min_time: 0.0}}
  - {{kind: prefill, tokens: 12}}
  - {{kind: decode, tokens: 4, depth: 8}}
  - {{kind: batch_decode, batch: 2, tokens: 3}}
"""


@pytest.fixture()
def tiny_suite(tmp_path, data_dir):
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY.format(model=data_dir / "stories260K"))
    return p


def test_bench_suite_end_to_end(tiny_suite, tmp_path, capsys, monkeypatch):
    # the peer is made absent even where llama-cpp-python is installed (make bench installs it)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    j, c, png = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.png"
    rc = main(["bench", "--suite", str(tiny_suite), "--json", str(j), "--csv", str(c), "--plot", str(png)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "llama.cpp" in err and "skipped" in err          # the missing peer is a note
    d = json.loads(j.read_text())
    assert d["schema"] == "infeng.telemetry/1" and d["command"] == "bench"
    names = {r["scenario"] for r in d["records"]}
    assert {"pp12", "tg4@d8", "batch2 tg3", "gemv bf16 64x172", "attention@d20", "bandwidth 1MiB"} <= names
    for r in d["records"]:
        assert r["runner"] == "infeng" and len(r["values"]) == 2 and r["median"] > 0
    dec = next(r for r in d["records"] if r["scenario"] == "tg4@d8")
    assert dec["roofline_pct"] > 0 and "py_overhead_us_per_tok" in dec
    assert d["metrics"]["read_bandwidth_gb_s"] > 0 and "pp12.infeng_tok_s" in d["metrics"]
    rows = list(csv.reader(c.open()))
    assert rows[0] == ["kind", "index", "key", "value"]
    assert ["run", "0", "command", "bench"] in rows
    try:
        import matplotlib  # noqa: F401
        assert png.exists()
    except ImportError:
        assert "matplotlib not installed" in err and not png.exists()


def test_bench_kernel_cli(tmp_path, capsys):
    j = tmp_path / "k.json"
    assert main(["bench", "--kernel", "gemv", "--dtype", "bf16", "--shape", "64x128", "--repeats", "1",
                 "--threads", "1", "--json", str(j)]) == 0
    d = json.loads(j.read_text())
    assert d["records"][0]["scenario"] == "gemv bf16 64x128" and d["records"][0]["unit"] == "GB/s"
    assert "gemv bf16 64x128" in capsys.readouterr().err


def test_bench_peak_suite_reports_gop_s(tmp_path, capsys):
    """A suite with the compute ceilings: GOP/s in the JSON and the CSV, under the op's name; on the
    scalar build the same suite is refused by name."""
    y = tmp_path / "peak.yaml"
    y.write_text("threads: 1\nrepeats: 1\nscenarios:\n  - {kind: peak, op: f32_fma, min_time: 0.01}\n")
    j, c = tmp_path / "p.json", tmp_path / "p.csv"
    from infeng import kernels
    if kernels.active().ffi.string(kernels.active().lib.ifg_isa()).decode() != "scalar":
        assert main(["bench", "--suite", str(y), "--json", str(j), "--csv", str(c)]) == 0
        rec = json.loads(j.read_text())["records"][0]
        assert rec["scenario"] == "peak f32_fma" and rec["unit"] == "GOP/s" and rec["median"] > 0
        assert "peak f32_fma" in c.read_text()
    with pytest.raises(InfengError, match="build scalar issues none of vfmadd_zmm, vfmadd_ymm"):
        S.run_suite(S.load_suite(y), isa="scalar")


def test_bench_bad_input(tmp_path, capsys):
    assert main(["bench"]) == 1
    assert main(["bench", "--kernel", "fft"]) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("scenarios:\n  - {kind: warp}\n")
    assert main(["bench", "--suite", str(bad)]) == 1
    bad.write_text("scenarios:\n  - {kind: gemv}\n")
    assert main(["bench", "--suite", str(bad)]) == 1
    assert main(["bench", "--kernel", "gemv", "--json", str(tmp_path / "x.txt")]) == 1
    err = capsys.readouterr().err
    assert "kind" in err and "needs shape" in err and "Traceback" not in err


def test_shipped_suites_parse():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "bench"
    for f in sorted(root.glob("**/*.yaml")):          # bench/serve/load.yaml too
        s = S.load_suite(f)
        assert (s.kind.name in COMPARISONS) if isinstance(s, ComparisonSuite) else s.scenarios, f


def test_scenario_kinds_registry():
    """One class per kind: its YAML name, unit, required parameters and label; a suite refuses an
    unknown kind by listing the registered ones."""
    params = {"shape": "64x128", "depth": 8, "tokens": 4, "batch": 2, "op": "vfmadd_ymm"}
    units = {k.unit for k in KINDS.values()}
    assert units == {"GB/s", "GFLOP/s", "GOP/s", "tok/s"}
    for name, k in KINDS.items():
        assert k.name == name and set(k.required) <= set(params) and k.label(params)
        assert k.e2e == (k.unit == "tok/s")
    assert [k.decode_shape(params) for k in KINDS.values() if k.e2e] == [None, (1, 10.0), (2, 18.0)]
    assert S.Scenario("gemm", params).name == "gemm4 bf16 64x128"


def test_comparison_suite_bad_input(tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text("kind: warp\n")
    assert main(["bench", "--suite", str(y)]) == 1
    y.write_text("kind: lora_overhead\nranks: [16, 0]\n")
    assert main(["bench", "--suite", str(y), "--model", str(tmp_path / "m.infeng")]) == 1
    y.write_text("kind: engine\n")
    assert main(["bench", "--suite", str(y), "--peer", "torch"]) == 1
    assert main(["bench", "--suite", str(y), "--repeats", "2"]) == 1
    err = capsys.readouterr().err
    assert "`kind` 'warp': one of lora_overhead, peft_lora, llamacpp_lora, llamacpp_kld, engine" in err
    assert "`ranks` must be a list of positive integers" in err
    assert "--peer: not used by kind engine" in err and "kind engine takes no repeats" in err
    assert "Traceback" not in err


def test_sim_kind_end_to_end(data_dir, tmp_path):
    """kind sim: the engine and the simulator on one small trace; bad ranges refused by name."""
    y = tmp_path / "sim.yaml"
    y.write_text("kind: sim\nrequests: 4\nprompt: [4, 8]\noutput: [2, 4]\nthreads: 1\nmax_batch: 4\n")
    out = tmp_path / "sim.json"
    assert main(["bench", "--suite", str(y), "--model", str(data_dir / "stories260K"), "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    assert [r["runner"] for r in run["records"]] == ["engine", "simulator", "cost_model"]
    assert run["records"][1]["requests"] == 4 and "throughput_ratio" in run["metrics"]


def test_kv_cache_kind_end_to_end(data_dir, tmp_path):
    """kind kv_cache on stories260K: each KV kind's KLD against the f32 cache (int8 small, int4
    larger, bytes as the layout says), and decode speed per kind with ratios to f32."""
    text = tmp_path / "t.txt"
    text.write_text((data_dir / "text" / "tinystories_sample.txt").read_text().split("<|endoftext|>")[0])
    y = tmp_path / "kv.yaml"
    y.write_text("kind: kv_cache\nctx: [64]\nkinds: [{dtype: int8}, {dtype: int4, rotate: 'off'}]\n"
                 "llamacpp: []\nspeed_llamacpp: []\ndepths: [0, 40]\ntokens: 4\nrepeats: 1\nthreads: 1\n"
                 f"text: {text}\nspeed_model: {data_dir / 'stories260K-f32'}\n"
                 "speed_kinds: [{dtype: f32}, {dtype: int8}]\n")
    out = tmp_path / "kv.json"
    assert main(["bench", "--suite", str(y), "--model", str(data_dir / "stories260K-f32"), "--json", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    q = {r["kv"]: r for r in recs if r["part"] == "quality"}
    assert 0 < q["int8"]["kld_mean"] < q["int4 rotate=off"]["kld_mean"]
    # head_dim 8, per position of K and V against 64 bytes: values 8 or 4 bytes of codes and an f16
    # scale per 8 (2 bytes); keys per channel the same codes and an f16 scale and min per 16
    # positions (2 bytes)
    assert q["int8"]["kv_bytes_vs_f32"] == 20 / 64 and q["int4 rotate=off"]["kv_bytes_vs_f32"] == 12 / 64
    assert q["int8"]["rotated"] == 5 and q["int4 rotate=off"]["rotated"] == 0
    sp = [r for r in recs if r["part"] == "speed"]
    assert sorted((r["kv"], r["depth"]) for r in sp) == [("f32", 0), ("f32", 40), ("int8", 0), ("int8", 40)]
    assert all(r["decode_tok_s"] > 0 and r["decode_vs_f32"] > 0 for r in sp)


def test_kv_cache_speed_without_an_f32_row_prints_no_ratio(data_dir, tmp_path, capsys):
    """Speed kinds with no f32 among them (e.g. infeng int4 beside llama.cpp q4_0 only): no
    decode_vs_f32 in the records and no "nan× f32" in the log."""
    y = tmp_path / "kv.yaml"
    y.write_text("kind: kv_cache\nparts: [speed]\nspeed_llamacpp: []\ndepths: [0]\ntokens: 2\nrepeats: 1\n"
                 f"threads: 1\nspeed_model: {data_dir / 'stories260K-f32'}\nspeed_kinds: [{{dtype: int8}}]\n")
    out = tmp_path / "kv.json"
    assert main(["bench", "--suite", str(y), "--model", str(data_dir / "stories260K-f32"), "--json", str(out)]) == 0
    (r,) = [r for r in json.loads(out.read_text())["records"] if r["part"] == "speed"]
    assert r["kv"] == "int8" and r["decode_tok_s"] > 0 and "decode_vs_f32" not in r
    assert "nan" not in capsys.readouterr().err


def test_kv_cache_quality_windows_and_a_ctx_past_the_model(data_dir, tmp_path, capsys):
    """`windows` scores the first windows × ctx tokens of a long text; a ctx past the model's own
    is skipped with a note, not an error; a bad `windows` is one clear error."""
    text = tmp_path / "t.txt"
    text.write_text((data_dir / "text" / "tinystories_sample.txt").read_text().replace("<|endoftext|>", " "))
    y = tmp_path / "kv.yaml"
    body = (f"kind: kv_cache\nparts: [quality]\nctx: [48, 8192]\nkinds: [{{dtype: f16}}, {{dtype: fp8}}]\n"
            f"llamacpp: []\nthreads: 1\ntext: {text}\n")
    y.write_text(body + "windows: 2\n")
    out = tmp_path / "kv.json"
    assert main(["bench", "--suite", str(y), "--model", str(data_dir / "stories260K-f32"), "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    q = {r["kv"]: r for r in run["records"]}
    assert sorted(q) == ["f16", "fp8"] and all(r["ctx"] == 48 for r in q.values())
    assert 0 < q["f16"]["kld_mean"] < q["fp8"]["kld_mean"]
    assert "ctx 8192 skipped" in capsys.readouterr().err + json.dumps(run)
    y.write_text(body + "windows: -1\n")
    assert main(["bench", "--suite", str(y), "--model", str(data_dir / "stories260K-f32")]) != 0
    assert "`windows` must be >= 0, got -1" in capsys.readouterr().err


def test_serve_load_kind_end_to_end(data_dir, tmp_path, monkeypatch):
    """kind serve_load: a server on stories260K with two random adapters, two concurrency levels."""
    monkeypatch.setenv("INFENG_CACHE", str(tmp_path / "cache"))
    y = tmp_path / "load.yaml"
    y.write_text("kind: serve_load\nthreads: 1\nmax_batch: 4\nadapters: 2\nrank: 2\nconcurrency: [1, 2]\n"
                 "requests: 4\nprompt_tokens: [4, 8]\noutput_tokens: [2, 4]\n")
    out = tmp_path / "load.json"
    assert main(["bench", "--suite", str(y), "--model", str(data_dir / "stories260K"), "--json", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    assert [r["concurrency"] for r in recs] == [1, 2, "overhead"]
    assert all(r["all_complete"] and r["errors"] == 0 and r["accepted"] == 4 for r in recs[:2])


def test_serve_load_time_limit_leaves_the_rest_unsent(data_dir, tmp_path, monkeypatch):
    """A level's time limit (here: passed before any client starts) sends nothing more; what was
    not sent is reported as unsent, not as an error."""
    monkeypatch.setenv("INFENG_CACHE", str(tmp_path / "cache"))
    y = tmp_path / "load.yaml"
    y.write_text("kind: serve_load\nthreads: 1\nmax_batch: 2\nadapters: 0\nconcurrency: [1, 2]\nrequests: 3\n"
                 "prompt_tokens: [4, 8]\noutput_tokens: [2, 4]\noverhead_repeats: 0\ntime_limit_s: 0.000001\n")
    out = tmp_path / "load.json"
    assert main(["bench", "--suite", str(y), "--model", str(data_dir / "stories260K"), "--json", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    assert [(r["requests"], r["unsent"], r["errors"], r["all_complete"]) for r in recs] == [(0, 3, 0, True)] * 2


def test_serve_load_overload_level(data_dir, tmp_path, monkeypatch):
    """2x the server's capacity in closed-loop clients: every request ends as one complete
    response or one 429, none lost; the 429s' and a /health probe's latencies are reported."""
    monkeypatch.setenv("INFENG_CACHE", str(tmp_path / "cache"))
    y = tmp_path / "load.yaml"
    y.write_text("kind: serve_load\nthreads: 1\nmax_batch: 2\nmax_queue: 1\nadapters: 1\nrank: 2\nconcurrency: [1]\n"
                 "requests: 2\nprompt_tokens: [4, 8]\noutput_tokens: [24, 32]\noverload: 2.0\n")
    out = tmp_path / "load.json"
    assert main(["bench", "--suite", str(y), "--model", str(data_dir / "stories260K"), "--json", str(out)]) == 0
    rec = json.loads(out.read_text())["records"][1]
    assert rec["concurrency"].startswith("overload 2x (6 clients, capacity 3)")
    assert rec["lost"] == 0 and rec["all_complete"] and rec["accepted"] + rec["rejected_429"] == 18
    assert rec["rejected_429"] > 0 and rec["429_ms_p99"] > 0 and rec["health_ms_p99"] > 0


def test_grammar_step_kind(data_dir, tmp_path):
    y = tmp_path / "g.yaml"
    y.write_text("kind: grammar_step\nbatch: 4\nconstrained: 2\nn_out: 8\nthreads: 1\nrepeats: 1\n")
    out = tmp_path / "g.json"
    assert main(["bench", "--suite", str(y), "--model", str(data_dir / "stories260K"), "--json", str(out)]) == 0
    rec = json.loads(out.read_text())["records"][0]
    assert rec["constrained"] == 2 and rec["decode_steps"] > 0 and rec["mask_ms_per_step"] > 0
    assert rec["step_ms_unconstrained"] > 0 and rec["step_ms_mixed"] > 0


def test_serve_llamacpp_kind_end_to_end(data_dir, tmp_path, monkeypatch):
    """kind serve_llamacpp: the same trace against infeng serve and llama.cpp's server (one alias
    per adapter), on stories260K and two random adapters exported to GGUF."""
    pytest.importorskip("llama_cpp.server.app", reason="llama.cpp's server is not installed (pip install -e '.[peers-server]')")
    monkeypatch.setenv("INFENG_CACHE", str(tmp_path / "cache"))
    y = tmp_path / "s.yaml"
    y.write_text("kind: serve_llamacpp\nthreads: 1\nmax_batch: 4\nadapters: 2\nrank: 2\nconcurrency: [2]\n"
                 "requests: 4\nprompt_tokens: [4, 8]\noutput_tokens: [2, 4]\n")
    out = tmp_path / "s.json"
    assert main(["bench", "--suite", str(y), "--model", str(data_dir / "stories260K-f32"), "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    recs = run["records"]
    assert [r["server"] for r in recs] == ["infeng", "llama.cpp", "infeng/llama.cpp"]
    assert all(r["all_complete"] and r["accepted"] == 4 and r["errors"] == 0 for r in recs[:2])
    assert recs[2]["tok_s"] > 0 and "c2.tok_s_ratio" in run["metrics"]


def test_new_kinds_refuse_bad_parameters(tmp_path, capsys, data_dir):
    y = tmp_path / "c.yaml"
    bad = [("kind: sim\nprompt: [8, 4]\n", ["--model", "m"]),
           ("kind: sim\nseed: -1\n", ["--model", "m"]),
           ("kind: serve_load\nconcurrency: [1, 0]\n", []),
           ("kind: serve_load\nbogus: 1\n", []),
           ("kind: grammar_mask\ntokens: 64\n", []),
           ("kind: grammar_mask\n", ["--threads", "2"]),
           ("kind: llamacpp_agreement\ntext: t.txt\n", []),
           ("kind: llamacpp_agreement\ntext: t.txt\n", ["--model", str(tmp_path / "no.gguf")]),
           ("kind: grammar_step\nbatch: 2\nconstrained: 3\n", ["--model", "m"]),
           ("kind: serve_llamacpp\noverload: 1.0\n", []),
           ("kind: serve_llamacpp\ntime_limit_s: -1.0\n", [])]
    for text, args in bad:
        y.write_text(text)
        assert main(["bench", "--suite", str(y), *args]) == 1, text
    err = capsys.readouterr().err
    for want in ("`prompt` must be [LOW, HIGH]", "`seed` must be >= 0", "`concurrency` must be a list of positive",
                 "unknown key(s) bogus for kind serve_load", "`tokenizers` must be a list of tokenizer.json",
                 "kind grammar_mask takes no threads", "kind llamacpp_agreement needs gguf", "no.gguf: no such file",
                 "`constrained` (3) must be <= `batch` (2)", "unknown key(s) overload for kind serve_llamacpp",
                 "`time_limit_s` must be >= 0"):
        assert want in err, want
    assert "Traceback" not in err


def test_grammar_mask_kind_notes_missing_libraries(data_dir, tmp_path, monkeypatch, capsys):
    """--model names one tokenizer; a library not installed is a note, not an error."""
    for lib in ("llguidance", "outlines_core"):
        _block_import(monkeypatch, lib)
    y = tmp_path / "g.yaml"
    y.write_text("kind: grammar_mask\ntokens: 8\n")
    assert main(["bench", "--suite", str(y), "--model", str(data_dir / "stories260K" / "tokenizer.json")]) == 0
    err = capsys.readouterr().err
    assert "llguidance not installed" in err and "outlines-core not installed" in err


def _block_import(monkeypatch, name):
    real = builtins.__import__

    def fake(mod, *a, **k):
        if mod == name or mod.startswith(name + "."):
            raise ImportError(f"No module named {name!r}")
        return real(mod, *a, **k)
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(builtins, "__import__", fake)
    import importlib
    real_im = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda mod, *a: fake(mod) if mod == name else real_im(mod, *a))


@pytest.mark.parametrize("peer,pkg", [("torch", "torch"), ("llama.cpp", "llama_cpp")])
def test_peer_skips_cleanly_when_absent(monkeypatch, data_dir, peer, pkg):
    _block_import(monkeypatch, pkg)
    from infeng.model.loader import load_model
    m = load_model(data_dir / "stories260K")
    with pytest.raises(peers.PeerSkip, match="not installed"):
        peers.make_peer(peer, m, 1, 64)
    notes = []
    s = S.Suite(model=str(data_dir / "stories260K"), threads=1, repeats=1, peers=[peer],
                scenarios=[S.Scenario("prefill", {"tokens": 8})])
    results, meta = S.run_suite(s, notes=notes)
    assert [r.runner for r in results] == ["infeng"] and meta["peers"] == []
    peer_notes = [n for n in notes if n.startswith("peer")]     # (a busy machine adds a CPU note)
    assert len(peer_notes) == 1 and "not installed" in peer_notes[0] and "\n" not in peer_notes[0]


class _FakeLlama:
    """Stands in for llama_cpp.Llama: records how the peer drives it."""
    made = []

    def __init__(self, model_path, n_threads, n_ctx, **kw):
        from infeng.converters.gguf_write import read_gguf_header
        self.kw = kw
        self.meta, self.tensors = read_gguf_header(model_path)
        self.n_ctx, self.n_tokens = n_ctx, 0
        self.scores = np.zeros((n_ctx, len(self.meta["tokenizer.ggml.tokens"])), np.float32)
        self._ctx = types.SimpleNamespace(ctx=self)
        _FakeLlama.made.append(self)

    def reset(self):
        self.n_tokens = 0

    def n_vocab(self):
        return self.scores.shape[1]

    @staticmethod
    def logits_ith(ctx, i):          # llama_cpp.llama_get_logits_ith: a float pointer into the row
        import ctypes
        return ctypes.cast(ctx.scores[max(ctx.n_tokens - 1, 0)].ctypes.data, ctypes.POINTER(ctypes.c_float))

    def eval(self, toks):
        self.n_tokens += len(toks)


def test_llama_cpp_peer_exports_gguf_and_runs(monkeypatch, data_dir, tmp_path):
    import types
    monkeypatch.setenv("INFENG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=_FakeLlama,
                                                                     llama_get_logits_ith=_FakeLlama.logits_ith))
    notes = []
    s = S.Suite(model=str(data_dir / "stories260K"), threads=1, repeats=1, peers=["llama.cpp", "llama.cpp:fa=0"],
                scenarios=[S.Scenario("prefill", {"tokens": 8}), S.Scenario("decode", {"tokens": 3, "depth": 4})])
    results, meta = S.run_suite(s, notes=notes)
    assert meta["peers"] == ["llama.cpp", "llama.cpp:fa=0"] and not [n for n in notes if "llama" in n]
    llm = _FakeLlama.made[-2]
    assert llm.meta["llama.block_count"] == 5 and "blk.4.ffn_down.weight" in llm.tensors
    assert llm.kw["flash_attn"] is True and _FakeLlama.made[-1].kw["flash_attn"] is False
    for name in meta["peers"]:
        peer = [r for r in results if r.runner == name]
        assert [len(r.values) for r in peer] == [1, 1] and all(r.median > 0 for r in peer)


def test_torch_peer_matches_reference(data_dir):
    pytest.importorskip("torch")
    from infeng.model.loader import load_model
    from infeng.model.reference import ReferenceModel
    m = load_model(data_dir / "stories260K", dtype="f32")
    ids = [1, 403, 407, 263, 31, 45]
    got = peers.TorchPeer(m, 1, 32).logits(ids)
    want = ReferenceModel(m).forward(ids)[-1]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    p = peers.TorchPeer(m, 1, 32)
    assert p.decode(ids, 3)[0] == 2 and p.batch_decode([ids, ids], 3)[0] == 4 and p.prefill(ids)[0] == 6


def test_roofline_bytes(data_dir):
    from infeng.model.loader import load_model
    m = load_model(data_dir / "stories260K")
    from infeng.bench import roofline as R
    wb = R.weight_bytes(m)
    assert wb == sum(a.nbytes for _, a in m.tensors.values())      # tied: the table is the output matrix
    assert R.decode_step_bytes(m, 2, 10) == wb + 2 * 10 * R.kv_bytes_per_position(m)


def test_synthetic_quantized_model(monkeypatch, tmp_path):
    """A suite's `dtype: q8_0` on a synthetic architecture: the bf16 model quantized (cached)."""
    from infeng.bench import synthetic
    from infeng.model.loader import load_model
    monkeypatch.setenv("INFENG_CACHE", str(tmp_path))
    p = synthetic.make("test-32k", "q8_0")
    assert p.name == "test-32k-q8_0-seed0.infeng" and (tmp_path / "synthetic" / "test-32k-bf16-seed0.infeng").exists()
    m = load_model(p)
    assert m.tensors["layers.0.wq"][0] == "q8_0" and m.tensors["layers.0.w_down"][0] == "bf16"   # 172 wide: fallback
    assert synthetic.make("test-32k", "q8_0") == p


def test_serve_load_cuts_a_stream_at_the_time_limit():
    """A request still streaming when the level's time limit passes is closed there and marked
    cut (its tokens so far counted), not reported as an error."""
    import http.server
    import threading
    import time
    from infeng.bench.serve_load import one

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'data: {"choices": [{"text": "a", "finish_reason": null}]}\n\n')
            self.wfile.flush()
            time.sleep(3)

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        t0 = time.perf_counter()
        o = one(srv.server_address[1], {"model": "m", "prompt": "x", "max_tokens": 8}, stop_at=t0 + 0.3)
        assert o.cut and o.error is None and o.tokens == 1 and not o.complete
        assert 0.3 <= o.latency_s < 2.5 and o.ttft_s is not None
        o = one(srv.server_address[1], {"model": "m", "prompt": "x", "max_tokens": 8}, stop_at=None)
        assert not o.cut and not o.complete          # no limit: waits for the end (no [DONE]: incomplete)
    finally:
        srv.shutdown()


def test_bf16_act_scenarios(monkeypatch, tmp_path, capsys):
    """A scenario's `bf16_act` runs infeng's bf16 matrices in that form (labelled so; the engine's
    model hands the kernels bf16_dp for "bf16"); a bad value or a non-bf16 model is one line."""
    monkeypatch.setenv("INFENG_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    suite = tmp_path / "act.yaml"
    suite.write_text("model: test-32k\ndtype: bf16\nthreads: 1\nrepeats: 1\nscenarios:\n"
                     "  - {kind: prefill, tokens: 8, bf16_act: f32}\n  - {kind: prefill, tokens: 8, bf16_act: bf16}\n"
                     "  - {kind: batch_decode, batch: 2, tokens: 3, bf16_act: bf16}\n")
    seen = []
    real = S.InfengRunner.engine

    def engine(self, batch, ctx):
        eng = real(self, batch, ctx)
        seen.append(eng.model.kernel_weight("layers.0.wq")[0])
        return eng
    monkeypatch.setattr(S.InfengRunner, "engine", engine)
    results, _ = S.run_suite(S.load_suite(suite))
    assert [r.scenario.name for r in results if r.scenario.e2e] == ["pp8 f32-act", "pp8 bf16-act", "batch2 tg3 bf16-act"]
    assert seen[0] == "bf16" and set(seen[1:]) == {"bf16_dp"}
    suite.write_text("model: test-32k\ndtype: bf16\nscenarios:\n  - {kind: prefill, tokens: 8, bf16_act: fp8}\n")
    assert main(["bench", "--suite", str(suite)]) == 1
    suite.write_text("model: test-32k\ndtype: f32\nthreads: 1\nrepeats: 1\nscenarios:\n"
                     "  - {kind: prefill, tokens: 8, bf16_act: bf16}\n")
    assert main(["bench", "--suite", str(suite)]) == 1
    err = capsys.readouterr().err
    assert "`bf16_act` is one of f32, bf16" in err and "applies to bf16 matrices; the model has none (its layers are f32)" in err
    assert "Traceback" not in err
