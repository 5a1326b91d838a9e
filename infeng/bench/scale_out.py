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
alone, saturates — its rate is measured here too (lines keyed and checked + records journaled
per second). Needs the `ray` extra.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from infeng.bench.job_memory import write_requests
from infeng.errors import InfengError
from infeng.jobs import BatchJob, run_batch_job
from infeng.jobs.job import JobFile, assemble
from infeng.jobs.journal import Journal, line_key
from infeng.jobs.reader import iter_lines
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
            "cpu_s": cpu, "tok_per_cpu_s": m["generated_tokens"] / cpu, "worker_cpu_s": m["worker_cpu_s"]}


def driver_rate(d: Path, n: int = 50000) -> tuple[float, float]:
    """Lines per second the driver alone can key, look up and journal (no engine), and lines per
    second of the final assembly (input reread, each record fetched from the journal)."""
    req = d / "driver.jsonl"
    write_requests(req, n, 8)
    j = Journal(d / "driver-out.jsonl", {"bench": 1}, seed=1)
    rec = {"id": "q", "text": " she was very happy and", "token_ids": list(range(8)), "finish_reason": "length",
           "seed": 1, "usage": {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}}
    t0 = time.perf_counter()
    for ln, line, _ in iter_lines(req):
        k = line_key(ln, line)
        if not j.done(k):
            j.append(k, rec)
    j.sync()
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    assemble(JobFile(req, d / "driver-out.jsonl"), j)
    da = time.perf_counter() - t0
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
    summary = {k: v for k, v in report.items() if k != "rows"}
    log(json.dumps(summary, indent=1))
    return rows + [{"summary": json.dumps(summary)}]
