"""Batch-job throughput against workers, measured and projected.

    infeng bench --suite bench/scale_out.yaml --model MODEL     (kind: scale_out)

Measured, side by side in rounds (A B C, A B C, ...): a local job on 1 thread, and the same job
on a local Ray cluster (127.0.0.1, 2 CPUs) with 1 and with 2 single-core workers. Throughput is
generated tokens over the job's wall time after its engines are up (start-up is reported apart),
and generated tokens per CPU-second of every process of the job (driver and workers): on a
machine shared with other work, wall-clock shares follow the number of busy processes, CPU time
does not.

Projected: one worker's steady throughput comes from the engine simulator (the engine's own
scheduler on a cost model fitted to real steps of this model, on requests of the job's shape);
N workers give N times that until the driver, which reads every line and journals every result
alone, saturates — at its CPU cost per line in the 2-worker Ray runs. The driver's loop alone
(no Ray, no engine) and the final assembly are timed too. Every run reports the requests'
latency percentiles. Needs the `ray` extra.
"""
from __future__ import annotations

import json
import pickle
import statistics
import tempfile
import time
from pathlib import Path

from infeng.bench.job_memory import write_requests
from infeng.errors import InfengError
from infeng.jobs import BatchJob, run_batch_job
from infeng.jobs.job import JobFile, assemble
from infeng.jobs.journal import Journal, encode_result, line_key
from infeng.jobs.ray_runner import pending_shards
from infeng.jobs.reader import iter_lines
from infeng.jobs.stats import JobStats
from infeng.model.loader import load_model
from infeng.runtime.engine import Engine
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.sim import CostModel, make_trace, replay, sim_engine, trace_requests


def measure(model_path: Path, req: Path, d: Path, variant: str) -> dict:
    out = d / f"{variant}.jsonl"
    kw = dict(threads=1) if variant == "local-1t" else dict(ray="auto", ray_cpus=1,
                                                            ray_workers=int(variant.split("-")[1][0]))
    job = BatchJob(model_path, str(req), out, SamplingParams(temperature=0.0, seed=1).validated(), max_batch=8,
                   progress=False, shard_size=250, **kw)
    meta, m = run_batch_job(job)
    out.unlink()
    cpu = m["cpu_s"] + m["worker_cpu_s"]
    return {"variant": variant, "tok_s": m["aggregate_tok_s"], "wall_s": m["wall_s"], "startup_s": m["load_s"],
            "cpu_s": cpu, "tok_per_cpu_s": m["generated_tokens"] / cpu, "worker_cpu_s": m["worker_cpu_s"],
            # the infeng process's CPU per line: the whole job locally, the driver's share on Ray
            "process_cpu_us_per_line": m["cpu_s"] / m["requests"] * 1e6,
            **{k: m[k] for k in ("latency_ms_p50", "latency_ms_p99", "ttft_ms_p50", "ttft_ms_p99")}}


def driver_rate(d: Path, n: int = 50000, shard: int = 250) -> tuple[float, float]:
    """Lines per second of the driver's own work in a fresh Ray job, no engine and no Ray: the
    input streamed into shards, each shard's results unpickled (as Ray hands them over: journal
    lines the workers keyed and encoded) and journaled; and lines per second of the final
    assembly (input reread and keyed, each record sliced out of the journal). CPU time."""
    req = d / "driver.jsonl"
    write_requests(req, n, 8)
    rec = {"id": "q", "text": " she was very happy and", "token_ids": list(range(8)), "finish_reason": "length",
           "seed": 1, "usage": {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}}
    done = [(k, encode_result(k, rec)) for k in (line_key(ln, line) for ln, line, _ in iter_lines(req))]
    blobs = [pickle.dumps(done[i:i + shard]) for i in range(0, n, shard)]     # the workers' side
    j = Journal(d / "driver-out.jsonl", {"bench": 1}, seed=1)
    t0 = time.process_time()
    for i, lines in enumerate(pending_shards(req, j, JobStats(), shard, lambda: None)):
        j.append_lines(pickle.loads(blobs[i]))
        j.tick()
    j.sync()
    dt = time.process_time() - t0
    t0 = time.process_time()
    assemble(JobFile(req, d / "driver-out.jsonl"), j)
    da = time.process_time() - t0
    j.remove()
    return n / dt, n / da


def simulated_worker_tok_s(model_path: Path, n: int, tokens: int) -> tuple[float, dict]:
    """One single-thread engine's throughput on n requests of the bench's shape, simulated."""
    model = load_model(model_path, verify=False)
    real = Engine(model, threads=1, max_batch=8, detokenize=False)
    calib = make_trace(400, 0, (3, 6), (tokens, tokens), seed=1)
    real.step_log = []
    replay(real, calib, trace_requests(calib, model.config.vocab_size, 1))
    cost = CostModel.fit(real.step_log)
    trace = make_trace(n, 0, (3, 6), (tokens, tokens), seed=2)
    rep = replay(sim_engine(model, cost, max_batch=8), trace, trace_requests(trace, model.config.vocab_size))
    return rep.throughput_tok_s, cost.to_dict()


def run(model: Path, requests: int, max_tokens: int, repeats: int, log=print) -> list[dict]:
    """One record per run, then a summary record (medians, ratios, driver rates, projection)."""
    try:
        import ray
    except ImportError:
        raise InfengError("scale_out needs Ray: pip install 'infeng[ray]'") from None
    model = Path(model)
    if ray.is_initialized():
        raise InfengError("scale_out starts its own 2-CPU Ray cluster; this process already has one")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    rows = []
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        req = d / "r.jsonl"
        write_requests(req, requests, max_tokens)
        for r in range(repeats):
            for v in ("local-1t", "ray-1w", "ray-2w"):
                rows.append({"round": r, **measure(model, req, d, v)})
                log(json.dumps(rows[-1]))
        drv, asm = driver_rate(d)
    ray.shutdown()
    variants = ("local-1t", "ray-1w", "ray-2w")
    med = {v: statistics.median(x["tok_s"] for x in rows if x["variant"] == v) for v in variants}
    # on a shared machine wall-clock shares follow process counts; CPU time says what a core yields
    eff = {v: statistics.median(x["tok_per_cpu_s"] for x in rows if x["variant"] == v) for v in variants}
    sim_tok_s, cost = simulated_worker_tok_s(model, 2000, max_tokens)
    lines_s_per_worker = sim_tok_s / max_tokens
    report = {"median_tok_s": med, "median_tok_per_cpu_s": eff, "ray2_over_local1": med["ray-2w"] / med["local-1t"],
              "ray2_over_ray1": med["ray-2w"] / med["ray-1w"], "driver_lines_s": drv, "assembly_lines_s": asm,
              "sim_worker_tok_s": sim_tok_s, "cost_model": cost,
              "driver_bound_workers": drv / lines_s_per_worker,
              "projection": {n: min(n * sim_tok_s, drv * max_tokens) for n in (1, 2, 8, 16, 32, 64)},
              "rows": rows}
    # the driver's rate in a real job (Ray's per-shard work and the job's fixed costs included)
    in_job = statistics.median(x["process_cpu_us_per_line"] for x in rows if x["variant"] == "ray-2w")
    report.update(driver_us_per_line=1e6 / drv, driver_in_job_us_per_line=in_job,
                  driver_bound_workers=1e6 / in_job / lines_s_per_worker,
                  projection={n: min(n * sim_tok_s, 1e6 / in_job * max_tokens) for n in (1, 2, 8, 16, 32, 64)})
    summary = {k: v for k, v in report.items() if k != "rows"}
    log(json.dumps(summary, indent=1))
    return rows + [{"summary": json.dumps(summary)}]
