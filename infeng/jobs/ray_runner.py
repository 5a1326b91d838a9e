"""A batch job sharded over a Ray cluster: one engine actor per worker, owning its CPUs.

The driver streams the input, skips what the journal holds, and hands out shards of
``shard_size`` lines, at most two per actor at a time (one running, one queued, so a worker never
waits for the driver). An actor parses its lines and runs them through its own Engine exactly as
a local job does; the driver journals a shard's records when the whole shard has come back, so a
worker lost mid-shard leaves nothing of it behind and the shard is simply run again elsewhere.
The output is assembled from the journal as for a local run: same format, same order, and a
journal from either kind of run resumes on the other.

The model and adapter files are read from the same path on every node (a shared file system),
or, with ``--ray-ship``, sent through Ray's object store and written to each worker's temp dir.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from infeng.errors import InfengError
from infeng.jobs.job import JobFile, adapter_files, open_journal, run_file, settings, stderr_log
from infeng.jobs.journal import Journal, line_key
from infeng.jobs.local import Collect, LineParser, run_local
from infeng.jobs.progress import ProgressBar
from infeng.jobs.reader import count_lines, iter_lines
from infeng.jobs.stats import JobStats, latencies
from infeng.model.loader import load_model
from infeng.runtime.engine import DEFAULT_CONTEXT, Engine
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.tokenizer import Tokenizer

MAX_REPLACEMENTS = 3        # per worker slot: more lost actors than that and the job stops (resumable)


def import_ray():
    try:
        import ray
    except ImportError:
        raise InfengError("--ray needs Ray: pip install 'infeng[ray]'") from None
    return ray


class EngineWorker:
    """One Engine on one Ray worker (made a Ray actor by ``actor_class``)."""

    def __init__(self, model_path, threads: int, max_batch: int, ctx: int | None, verify: bool,
                 adapters: dict, model_name: str):
        """``model_path`` and each adapter are a path every node reads, or (file name, object
        ref of its bytes) when shipped: written to a temporary directory here, then mapped."""
        self._tmp = tempfile.TemporaryDirectory(prefix="infeng-worker-")
        model_path = _materialize(model_path, Path(self._tmp.name))
        adapters = {n: _materialize(f, Path(self._tmp.name)) for n, f in adapters.items()}
        self.model = load_model(model_path, verify=verify)
        self.tok = Tokenizer(self.model.tokenizer, self.model.config.bos_id, self.model.config.eos_ids)
        self.engine = Engine(self.model, threads=threads, max_batch=max_batch, max_seq_len=ctx,
                             tokenizer=self.tok, detokenize=False)
        for name, f in adapters.items():
            self.engine.load_adapter(f, name)
        self.model_name = model_name

    def ready(self) -> tuple[str, int]:
        """(model identity, pid): the driver checks every worker has the same model."""
        return self.model.identity(), os.getpid()

    def run(self, where: str, defaults: dict, default_adapter: str | None, window: int,
            lines: list[tuple[int, str, str | None]]) -> tuple[list[tuple[bytes, bytes]], dict[str, Any]]:
        """A shard's lines → their (key, journal line) pairs, and the shard's counts and each
        request's latencies. The worker keys and encodes (the driver only appends bytes)."""
        params = SamplingParams(**{**defaults, "stop": tuple(defaults["stop"]),
                                   "stop_token_ids": tuple(defaults["stop_token_ids"])})
        parse = LineParser(where, params, self.tok, frozenset(self.engine.adapters.loaded), default_adapter)
        sink, st, cpu0 = Collect(encoded=True), JobStats(sample=len(lines)), time.process_time()
        run_local(self.engine, (parse(*ln) for ln in lines), sink, st, self.model_name, window)
        return sink.records, {"done": st.done, "failed": st.failed, "prompt_tokens": st.prompt_tokens,
                              "generated_tokens": st.generated_tokens, "cpu_s": time.process_time() - cpu0,
                              "latencies": [latencies(r) for r in st.sample]}


def _materialize(spec, d: Path) -> str:
    if isinstance(spec, str):
        return spec
    import ray
    name, ref = spec
    (d / name).write_bytes(ray.get(ref))
    return str(d / name)


def _ship(ray, path: Path):
    """(file name, object ref of its bytes): a file sent through Ray's object store."""
    if not path.is_file():
        raise InfengError(f"--ray-ship: {path} is a folder; convert it to one .infeng file to ship it")
    return path.name, ray.put(path.read_bytes())


def connect(ray, address: str) -> None:
    if ray.is_initialized():
        return          # a driver (or a test) that started Ray itself
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise InfengError(f"--ray {address}: no Ray cluster there ({e}); start one with `ray start --head`") from None


def run_on_ray(job, pairs: list[JobFile], window: int) -> tuple[dict[str, Any], dict[str, float]]:
    ray = import_ray()
    if job.threads is not None:
        raise InfengError("--threads is for local runs; on Ray each worker runs --ray-cpus threads")
    if job.ray_cpus < 1:
        raise InfengError(f"--ray-cpus must be >= 1, got {job.ray_cpus}")
    if job.shard_size < 1:
        raise InfengError(f"--shard-size must be >= 1, got {job.shard_size}")
    t_load = time.perf_counter()
    model = job.model or load_model(job.model_path, verify=job.verify)
    ctx = job.ctx or min(model.config.max_seq_len, DEFAULT_CONTEXT)
    if not 0 < ctx <= model.config.max_seq_len:
        raise InfengError(f"context length {ctx} must be in 1..{model.config.max_seq_len} (the model's maximum)")
    adapters, default_adapter = adapter_files(job, model)
    setup = settings(model, job.defaults, ctx, adapters, default_adapter)
    connect(ray, job.ray)
    n_workers = job.ray_workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // job.ray_cpus)
    if n_workers < 1:
        raise InfengError(f"--ray-workers must be >= 1, got {n_workers}")
    if job.ray_ship:
        files = _ship(ray, Path(job.model_path)), {n: _ship(ray, Path(p)) for n, p in adapters.items()}
    else:
        files = str(Path(job.model_path).resolve()), {n: str(Path(p).resolve()) for n, p in adapters.items()}
    pool = WorkerPool(ray, job, model.identity(), ctx, files, n_workers)
    load_s = time.perf_counter() - t_load
    stats = JobStats()
    try:
        for pair in pairs:
            journal, defaults = open_journal(pair, setup, job.defaults, job.restart, stderr_log)
            d = asdict(defaults)
            total = count_lines(pair.input) if job.progress else 0      # (a pass over the file)
            with ProgressBar(job.progress, pair.input.name, total) as advance:
                def run(st: JobStats) -> None:
                    pool.run_file(pair, journal, st, d, default_adapter, window, lambda: advance(st))
                run_file(pair, journal, stats, run, stderr_log)
    finally:
        pool.shutdown()
    wall = time.perf_counter() - stats.t0
    meta = {"model": str(job.model_path), "ray": job.ray, "workers": n_workers, "cpus_per_worker": job.ray_cpus,
            "shard_size": job.shard_size, "inputs": [str(p.input) for p in pairs]}
    metrics = stats.metrics(None, wall)
    metrics.update(load_s=load_s, workers_lost=pool.lost, shards_rerun=pool.rerun)
    return meta, metrics


class WorkerPool:
    """The engine actors, replaced when one is lost, fed shards two at a time."""

    def __init__(self, ray, job, identity: str, ctx: int, files: tuple, n: int):
        self.ray, self.job, self.identity = ray, job, identity
        self.lost = self.rerun = 0
        self.budget = MAX_REPLACEMENTS * n
        self.cls = ray.remote(num_cpus=job.ray_cpus, max_restarts=0, max_task_retries=0)(EngineWorker)
        self.args = (files[0], job.ray_cpus, job.max_batch, ctx, job.verify, files[1], job.model_path.name)
        self.where = job.model_path
        self.actors = [self._start() for _ in range(n)]
        self._check_ready(self.actors)

    def _start(self):
        return self.cls.remote(*self.args)

    def _check_ready(self, actors) -> None:
        """Start-up errors (the model not on a node's path, a different file there) end the job
        with their message before any work is handed out."""
        for a in actors:
            try:
                ident, _ = self.ray.get(a.ready.remote())
            except self.ray.exceptions.RayError as e:
                raise InfengError(f"a Ray worker could not load {self.where}: {_cause(e)} (no shared path? "
                                  f"--ray-ship sends the files)") from None
            if ident != self.identity:
                raise InfengError(f"a Ray worker reads a different model at {self.where} (identity "
                                  f"{ident[:12]}…, the driver's {self.identity[:12]}…); use a shared path or --ray-ship")

    def run_file(self, pair: JobFile, journal: Journal, st: JobStats, defaults: dict, default_adapter: str | None,
                 window: int, on_done) -> None:
        ray = self.ray
        shards = pending_shards(pair.input, journal, st, self.job.shard_size, on_done)
        retry: deque = deque()
        inflight: dict = {}                 # ObjectRef → (actor, shard)
        load = {id(a): 0 for a in self.actors}
        more = True
        while True:
            for a in list(self.actors):
                while load[id(a)] < 2 and (retry or more):
                    shard = retry.popleft() if retry else next(shards, None)
                    if shard is None:
                        more = False
                        break
                    ref = a.run.remote(str(pair.input), defaults, default_adapter, window, shard)
                    inflight[ref] = (a, shard)
                    load[id(a)] += 1
            if not inflight:
                break
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            a, shard = inflight.pop(ref)
            if id(a) in load:                # (not when its actor was already found lost)
                load[id(a)] -= 1
            try:
                records, counts = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ObjectLostError) as e:
                retry.append(shard)
                self.rerun += 1
                if a in self.actors:
                    self._replace(a, load, e)
                continue
            except ray.exceptions.RayTaskError as e:
                raise InfengError(f"a Ray worker failed on {pair.input} lines {shard[0][0]}-{shard[-1][0]}: "
                                  f"{_cause(e)}") from None
            journal.append_lines(records)
            for _ in records:
                on_done()
            st.add_latencies(counts["latencies"])
            st.done += counts["done"]
            st.failed += counts["failed"]
            st.prompt_tokens += counts["prompt_tokens"]
            st.generated_tokens += counts["generated_tokens"]
            st.worker_cpu_s += counts["cpu_s"]
            journal.tick()

    def _replace(self, dead, load: dict, err) -> None:
        """A lost worker: its shards go back to the queue (done by the caller); a new actor takes
        its place while the replacement budget lasts."""
        self.lost += 1
        self.actors.remove(dead)
        load.pop(id(dead), None)
        if self.budget > 0:
            self.budget -= 1
            a = self._start()
            self.actors.append(a)
            load[id(a)] = 0
        if not self.actors:
            raise InfengError(f"every Ray worker was lost (last: {_cause(err)}); the journal keeps what is done, "
                              f"rerun to continue")

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


def pending_shards(path: Path, journal: Journal, st: JobStats, size: int, on_skip) -> Iterator[list]:
    """Lists of up to ``size`` (line number, text, error) not yet in the journal. A journal that
    held no result when the job opened it has none of them (the workers key the lines)."""
    shard: list = []
    resuming = journal.resumed > 0
    for n, line, err in iter_lines(path):
        if resuming and journal.done(line_key(n, line)):
            st.skipped += 1
            on_skip()
            continue
        shard.append((n, line, err))
        if len(shard) == size:
            yield shard
            shard = []
    if shard:
        yield shard


def _cause(e: Exception) -> str:
    """The first line of what went wrong inside Ray, without its traceback."""
    cause = getattr(e, "cause", None)
    text = str(cause if cause is not None else e).strip().splitlines()
    return text[-1] if text else type(e).__name__
