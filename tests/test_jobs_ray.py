"""Batch jobs on a local Ray cluster (127.0.0.1, 2 CPUs): the output equals a local run's, a
worker killed mid-job still gives every result exactly once, and the Ray Data predictor.
Skipped when Ray (the `ray` extra) is not installed."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from infeng.cli.main import main  # noqa: E402
from infeng.jobs.journal import journal_path  # noqa: E402
from tests.test_jobs import requests  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("rayjobs") / "s.infeng"
    assert main(["convert", str(data_dir / "stories260K-f32"), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def job(model, tmp_path_factory):
    """A request file and its local run's output (1 thread, the threads a Ray worker gets)."""
    d = tmp_path_factory.mktemp("rayjob")
    req, local = d / "r.jsonl", d / "local.jsonl"
    lines = requests(160, tokens=(8, 24))
    lines[5] = "{broken"
    req.write_text("\n".join(lines) + "\n")
    assert main(["generate", str(model), "--batch", str(req), "-o", str(local), "--threads", "1", "--seed", "3"]) == 0
    return req, local


def _ray_args(model, req, out, *extra):
    return ["generate", str(model), "--batch", str(req), "-o", str(out), "--seed", "3", "--ray", "auto",
            "--ray-workers", "2", "--shard-size", "16", *extra]


@pytest.mark.parametrize("ship", [False, True])
def test_ray_output_equals_local(cluster, model, job, tmp_path, ship):
    req, local = job
    out, tel = tmp_path / "ray.jsonl", tmp_path / "t.json"
    assert main(_ray_args(model, req, out, "--telemetry", str(tel), *(["--ray-ship"] if ship else []))) == 0
    assert out.read_text() == local.read_text()
    m = json.loads(tel.read_text())
    assert m["meta"]["workers"] == 2 and m["metrics"]["requests"] == 159 and m["metrics"]["failed_requests"] == 1
    mt = m["metrics"]           # every request's latencies came back from the workers
    assert mt["latency_sample_requests"] == 159
    for name in ("latency_ms", "ttft_ms", "tpot_ms", "queue_ms"):
        assert 0 <= mt[f"{name}_p50"] <= mt[f"{name}_p99"] < 600e3, name
    assert mt["ttft_ms_p50"] <= mt["latency_ms_p50"]


def _worker_pids() -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes().startswith(b"ray::EngineWorker"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def test_killed_worker_shard_rerun_nothing_twice(cluster, model, job, tmp_path):
    req, local = job
    out, tel = tmp_path / "ray.jsonl", tmp_path / "t.json"
    killed = []

    def killer():
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end and not out.exists():
            j = journal_path(out)
            if j.exists() and j.read_bytes().count(b"\n") > 16:      # a shard is in; others run
                pids = _worker_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.01)
    t = threading.Thread(target=killer)
    t.start()
    assert main(_ray_args(model, req, out, "--telemetry", str(tel))) == 0
    t.join()
    assert killed, "no worker was killed"
    m = json.loads(tel.read_text())["metrics"]
    assert m["workers_lost"] >= 1 and m["shards_rerun"] >= 1
    assert out.read_text() == local.read_text()              # every line once, the local run's text


def test_ray_resumes_a_local_journal(cluster, model, job, tmp_path, monkeypatch, capsys):
    """A local run stopped (Ctrl-C) after 40 results continues on Ray: the journal does not care
    who wrote it, and nothing is computed twice."""
    import infeng.jobs.local as local_mod
    req, local = job
    out = tmp_path / "o.jsonl"
    real, calls = local_mod.record, []

    def record_then_stop(*a):
        calls.append(1)
        if len(calls) > 40:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(local_mod, "record", record_then_stop)
    assert main(["generate", str(model), "--batch", str(req), "-o", str(out), "--threads", "1", "--seed", "3"]) == 130
    monkeypatch.setattr(local_mod, "record", real)
    assert journal_path(out).exists() and not out.exists()
    capsys.readouterr()
    assert main(_ray_args(model, req, out)) == 0
    assert "40 request(s) skipped" in capsys.readouterr().err
    assert out.read_text() == local.read_text()
    assert not journal_path(out).exists()


def test_predictor_in_ray_data(cluster, model, job):
    import numpy as np
    from infeng.jobs.predictor import InfengPredictor
    req, local = job
    want = [json.loads(x) for x in local.read_text().splitlines()][:12]
    rows = [json.loads(x) for x in req.read_text().splitlines()[:12] if x != "{broken"]
    ds = ray.data.from_items(rows)
    got = ds.map_batches(InfengPredictor, fn_constructor_kwargs={"model_path": str(model), "seed": 3},
                         concurrency=1, num_cpus=1, batch_size=5).take_all()
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    texts = {w["id"]: w["text"] for w in want if "text" in w}
    assert all(g["text"] == texts[g["id"]] and g["error"] is None for g in got)
    direct = InfengPredictor(str(model), seed=3)({"prompt": np.array(["Lily", "x"], dtype=object),
                                                  "max_tokens": np.array([3.0, -1.0])})
    assert direct["completion_tokens"][0] == 3 and "max_tokens" in direct["error"][1]
