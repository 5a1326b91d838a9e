"""One batch job from end to end: journal opened (or resumed), pending requests run, output
assembled in input order and renamed into place, journal removed.

Ctrl-C or SIGTERM (a preempted VM) stops it cleanly: what is done is synced to the journal and
the same command continues later. A SIGKILL loses at most the group not yet written.
"""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from infeng.errors import InfengError
from infeng.jobs.atomic import atomic_output
from infeng.jobs.journal import Journal, line_key
from infeng.jobs.reader import iter_lines
from infeng.jobs.stats import JobStats
from infeng.model.adapter import load_adapter
from infeng.runtime.sampler import SamplingParams


class Interrupted(Exception):
    """The job was stopped by Ctrl-C / SIGTERM after saving its journal."""


@dataclass
class JobFile:
    input: Path
    output: Path


def settings(model, defaults: SamplingParams, max_seq_len: int, adapters: dict[str, Path],
             default_adapter: str | None) -> dict[str, Any]:
    """What decides a request's output besides its own line (the seed is kept apart)."""
    d = {k: v for k, v in vars(defaults).items() if k != "seed"}
    d["stop"], d["stop_token_ids"] = list(d["stop"]), list(d["stop_token_ids"])
    return {"model": model.identity(), "defaults": d, "context": max_seq_len,
            "adapters": {n: _file_id(p) for n, p in sorted(adapters.items())},
            "default_adapter": default_adapter}


def adapter_files(job, model) -> tuple[dict[str, Path], str | None]:
    """{name: file} of the adapters the job loads (``--adapters-dir`` by file name, ``--adapter``
    by its own name, which also answers lines that name none) and that default name."""
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


def _file_id(p: Path) -> str:
    st = Path(p).stat()
    return f"{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}"


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (what a scheduler or a spot VM's preemption sends) stops the job like Ctrl-C."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:          # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def open_journal(job: JobFile, settings_: dict[str, Any], defaults: SamplingParams, restart: bool,
                 log: Callable[[str], None]) -> tuple[Journal, SamplingParams]:
    """The job's journal and its sampling defaults with the job's seed."""
    journal = Journal(job.output, settings_, seed=defaults.seed, restart=restart)
    if journal.resumed or journal.dropped:
        msg = f"{journal.path.name}: {journal.resumed} result(s) from an earlier run"
        if journal.dropped:
            msg += f", {journal.dropped} torn or corrupt record(s) dropped (recomputed)"
        log(msg)
    return journal, replace(defaults, seed=journal.seed).validated()


def run_file(job: JobFile, journal: Journal, stats: JobStats, run: Callable[[JobStats], None],
             log: Callable[[str], None]) -> None:
    """``run`` computes what the journal lacks; then the output is assembled and the journal goes."""
    try:
        with stop_on_sigterm():
            run(stats)
    except KeyboardInterrupt:
        journal.sync()
        journal.close()
        raise Interrupted(f"interrupted: {stats.done + stats.failed} request(s) of {job.input.name} done in this run, "
                          f"kept in {journal.path}; rerun the same command to continue") from None
    except BaseException:
        journal.close()         # whatever was synced stays for a rerun
        raise
    journal.sync()
    try:
        assemble(job, journal)
    except BaseException:
        journal.close()
        raise
    journal.remove()
    if stats.skipped:
        log(f"{job.output.name}: {stats.skipped} request(s) skipped, done by an earlier run")


def assemble(job: JobFile, journal: Journal) -> None:
    """The output, one line per input line in input order, from the journal; renamed into place."""
    with atomic_output(job.output) as out:
        for n, line, _ in iter_lines(job.input):
            rec = journal.record(line_key(n, line))
            if rec is None:
                raise InfengError(f"{job.input}:{n}: has no result in {journal.path.name} (was the input "
                                  f"changed while the job ran? rerun to compute it)")
            out.write(rec)


def stderr_log(msg: str) -> None:
    print(f"infeng: {msg}", file=sys.stderr)
