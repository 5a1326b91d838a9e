"""`generate --batch` as a job: inputs expanded, one journal per output, local or on Ray."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infeng.errors import InfengError
from infeng.jobs.job import JobFile, open_journal, run_file, settings, stderr_log
from infeng.jobs.local import LineParser, pending, run_local
from infeng.jobs.reader import count_lines, expand_inputs, plan_outputs
from infeng.jobs.stats import JobStats
from infeng.runtime.sampler import SamplingParams


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


def window_of(job: BatchJob) -> int:
    w = job.window if job.window is not None else max(64, 8 * job.max_batch)
    if w < 1:
        raise InfengError(f"--window must be >= 1, got {w}")
    return w


def adapter_files(job: BatchJob, model) -> tuple[dict[str, Path], str | None]:
    """{name: file} of the adapters the job loads (``--adapters-dir`` by file name, ``--adapter``
    by its own name, which also answers lines that name none) and that default name."""
    from infeng.model.adapter import load_adapter
    files: dict[str, Path] = {}
    if job.adapters_dir is not None:
        if not job.adapters_dir.is_dir():
            raise InfengError(f"{job.adapters_dir}: no such directory")
        files = {f.name[:-len(".infeng-lora")]: f for f in sorted(job.adapters_dir.glob("*.infeng-lora"))}
    default = None
    if job.adapter is not None:
        default = load_adapter(job.adapter, model, verify=job.verify).name
        files[default] = job.adapter
    return files, default


def run_batch_job(job: BatchJob) -> tuple[dict[str, Any], dict[str, float]]:
    """Run every input of ``job``; returns (meta, metrics) for the telemetry."""
    pairs = [JobFile(i, o) for i, o in plan_outputs(expand_inputs(job.batch), job.output)]
    window = window_of(job)
    if job.ray is not None:
        from infeng.jobs.ray_runner import run_on_ray
        return run_on_ray(job, pairs, window)
    from infeng.model.loader import load_model
    from infeng.runtime.engine import Engine
    from infeng.runtime.tokenizer import Tokenizer

    t_load = time.perf_counter()
    model = job.model or load_model(job.model_path, verify=job.verify)
    tok = Tokenizer(model.tokenizer, model.config.bos_id, model.config.eos_ids)
    totals = [count_lines(p.input) for p in pairs]
    engine = Engine(model, threads=job.threads, max_batch=min(job.max_batch, max(1, max(totals))),
                    max_seq_len=job.ctx, tokenizer=tok, detokenize=False, max_queue=window)
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


class ProgressBar:
    """The progress bar (requests done of the file's total, elapsed, ETA, tokens/s) or nothing."""

    def __init__(self, show: bool, label: str, total: int):
        self.show, self.label, self.total = show, label, total

    def __enter__(self):
        if not self.show:
            return lambda st: None
        from rich.progress import MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from infeng.telemetry import progress
        self.bar = progress(self.label, MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), TextColumn("{task.fields[tok_s]:.0f} tok/s"))
        self.bar.__enter__()
        task = self.bar.add_task("batch", total=self.total, tok_s=0.0)
        return lambda st: self.bar.update(task, advance=1, tok_s=st.tok_s())

    def __exit__(self, *exc):
        if self.show:
            self.bar.__exit__(*exc)
        return False
