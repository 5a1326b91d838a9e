"""`generate --batch` as a job: inputs expanded, one journal per output, local or on Ray."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infeng.errors import InfengError
from infeng.jobs.job import JobFile, adapter_files, open_journal, run_file, settings, stderr_log
from infeng.jobs.local import LineParser, pending, run_local
from infeng.jobs.progress import ProgressBar
from infeng.jobs.ray_runner import run_on_ray
from infeng.jobs.reader import count_lines, expand_inputs, plan_outputs
from infeng.jobs.stats import JobStats
from infeng.model.loader import load_model
from infeng.runtime.engine import Engine
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.tokenizer import Tokenizer


@dataclass
class BatchJob:
    model_path: Path
    batch: str                      # a file or a glob pattern
    output: Path                    # a file, or a directory for several inputs
    defaults: SamplingParams        # validated; seed None unless the user gave one
    threads: int | None = None
    max_batch: int = 8
    ctx: int | None = None
    verify: bool = True
    adapter: Path | None = None
    adapters_dir: Path | None = None
    restart: bool = False
    window: int | None = None       # requests parsed and queued at once [default: 8 x max_batch, >= 64]
    ray: str | None = None          # a Ray address or "auto"
    ray_workers: int | None = None
    ray_cpus: int = 1               # CPUs (= engine threads) per Ray worker
    shard_size: int = 256           # lines a Ray worker is handed at a time
    ray_ship: bool = False          # send model and adapters through Ray instead of a shared path
    progress: bool = True
    model: Any = None               # the loaded model, when the caller has it already
    speculate: Any = None           # a runtime.speculate.SpecConfig, or None
    kv: dict = field(default_factory=dict)   # the Engine's kv_* options (KV types, policy, rotation)


def window_of(job: BatchJob) -> int:
    w = job.window if job.window is not None else max(64, 8 * job.max_batch)
    if w < 1:
        raise InfengError(f"--window must be >= 1, got {w}")
    return w


def run_batch_job(job: BatchJob) -> tuple[dict[str, Any], dict[str, float]]:
    """Run every input of ``job``; returns (meta, metrics) for the telemetry."""
    pairs = [JobFile(i, o) for i, o in plan_outputs(expand_inputs(job.batch), job.output)]
    window = window_of(job)
    if job.ray is not None:
        if job.kv:
            raise InfengError("--kv-dtype / --kv-policy / --kv-rotate are not passed to Ray workers yet: "
                              "drop them or run without --ray")
        return run_on_ray(job, pairs, window)

    t_load = time.perf_counter()
    model = job.model or load_model(job.model_path, verify=job.verify)
    tok = Tokenizer(model.tokenizer, model.config.bos_id, model.config.eos_ids)
    totals = [count_lines(p.input) for p in pairs]
    engine = Engine(model, threads=job.threads, max_batch=min(job.max_batch, max(1, max(totals))),
                    max_seq_len=job.ctx, tokenizer=tok, detokenize=False, max_queue=window,
                    speculate=job.speculate, **job.kv)
    adapters, default_adapter = adapter_files(job, model)
    for name, f in adapters.items():
        engine.load_adapter(f, name)
    setup = settings(model, job.defaults, engine.max_seq_len, adapters, default_adapter)
    load_s = time.perf_counter() - t_load
    stats = JobStats()
    for pair, total in zip(pairs, totals):
        journal, defaults = open_journal(pair, setup, job.defaults, job.restart, stderr_log)
        parse = LineParser(str(pair.input), defaults, tok, frozenset(adapters), default_adapter)
        with ProgressBar(job.progress, pair.input.name, total) as advance:
            def run(st: JobStats) -> None:
                run_local(engine, pending(pair.input, parse, journal, st, lambda: advance(st)), journal, st,
                          job.model_path.name, window, lambda: advance(st))
            run_file(pair, journal, stats, run, stderr_log)
    wall = time.perf_counter() - stats.t0
    meta = {"model": str(job.model_path), "isa": engine.isa, "threads": engine.threads,
            "weight_dtype": model.weight_dtype, "max_batch": engine.max_batch, "window": window,
            "inputs": [str(p.input) for p in pairs]}
    metrics = stats.metrics(engine, wall)
    metrics["load_s"] = load_s
    return meta, metrics
