"""The engine scenarios behind the engine issue's figures run end to end on stories260K with a
tiny budget: the code paths and their bookkeeping, never their timings."""
from infeng.bench import engine_scenarios as es
from infeng.model.loader import load_model


def _model(data_dir):
    return load_model(data_dir / "stories260K", verify=False)


def test_mixed_batched_vs_one_at_a_time_and_simulator(data_dir):
    r = es.mixed(_model(data_dir), 1, 4, max_batch=4)
    assert r["requests"] == 4 and r["max_batch"] == 4
    assert r["one_at_a_time_tok_s"] > 0 and r["batched_tok_s"] > 0 and r["sim_tok_s"] > 0
    # paged KV holds only what the requests use, never more than every slot at full length
    assert 0 < r["kv_used_mb_max"] <= r["kv_contiguous_mb"]
    assert r["batched_ttft_s_p50"] <= r["batched_ttft_s_p99"]


def test_prefix_reuse_prefills_fewer_tokens(data_dir):
    r = es.prefix(_model(data_dir), 1, n=4, prefix_len=64)
    assert r["prefill_tokens_with_reuse"] < r["prefill_tokens_without_reuse"]
    assert 0 < r["prefix_hit_rate"] <= 1


def test_priority_high_request_served_while_low_ones_continue(data_dir):
    r = es.priority(_model(data_dir), 1, n_low=4)
    assert r["all_finished"] and r["low_tokens_after_high_arrived"] > 0
    # every slot was busy: the high one took a slot by preempting a low one (recomputed later)
    assert r["preemptions"] >= 1


def test_engine_suite_kind_through_the_cli(data_dir, tmp_path, capsys):
    """`infeng bench --suite` with `kind: engine`: the scenarios run, one record each, printed as a
    table and written in the telemetry schema."""
    import json
    from infeng.cli.main import main
    suite, out = tmp_path / "engine.yaml", tmp_path / "engine.json"
    suite.write_text("kind: engine\nthreads: 1\nrequests: 4\nmax_batch: 4\nonly: [mixed]\n")
    assert main(["bench", "--suite", str(suite), "--model", str(data_dir / "stories260K"), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    [rec] = doc["records"]
    assert doc["meta"]["suite"] == "engine" and doc["meta"]["model"] == str(data_dir / "stories260K")
    assert rec["scenario"] == "mixed" and rec["requests"] == 4 and rec["batched_tok_s"] > 0
    assert "batched_over_one_at_a_time" in capsys.readouterr().err
    suite.write_text("kind: engine\nonly: [mixed, fastest]\n")
    assert main(["bench", "--suite", str(suite), "--model", str(data_dir / "stories260K")]) == 1
    assert "unknown scenario 'fastest'" in capsys.readouterr().err
