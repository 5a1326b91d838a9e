"""Telemetry: one schema for every subcommand.

A ``Run`` holds ``meta`` (what ran: command, model, ISA, threads, ...), ``metrics`` (flat
name → number; the unit is the name's suffix: ``_s``, ``_ms``, ``_tok_s``, ``_mb``) and
``records`` (flat dicts, one per request / scenario / tensor). JSON writes it as is; CSV writes
it in long form, one ``kind,index,key,value`` row per field, so every command shares one CSV
layout. Imported by every layer; imports nothing of infeng.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "infeng.telemetry/1"


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0–100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


@dataclass
class Run:
    command: str
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    spans: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @contextmanager
    def span(self, name: str):
        """Adds the wall time of the block to ``spans[name]`` (seconds)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.spans[name] = self.spans.get(name, 0.0) + time.perf_counter() - t0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "command": self.command,
            "started_unix": round(self.started, 3),
            "host": {"python": platform.python_version(), "machine": platform.machine(),
                     "cpus": os.cpu_count()},
            "meta": self.meta,
            "metrics": self.metrics,
            "spans_s": self.spans,
            "records": self.records,
        }

    def rows(self):
        """Long-form rows: (kind, index, key, value)."""
        d = self.to_dict()
        yield ("run", 0, "command", self.command)
        yield ("run", 0, "schema", SCHEMA)
        for k, v in d["host"].items():
            yield ("host", 0, k, v)
        for k, v in self.meta.items():
            yield ("meta", 0, k, v if not isinstance(v, (dict, list)) else json.dumps(v))
        for k, v in self.metrics.items():
            yield ("metric", 0, k, v)
        for k, v in self.spans.items():
            yield ("span", 0, k, v)
        for i, rec in enumerate(self.records):
            for k, v in rec.items():
                yield ("record", i, k, v if not isinstance(v, (dict, list)) else json.dumps(v))

    def write(self, path: str | os.PathLike) -> Path:
        """Writes JSON or CSV by the file's suffix, atomically (temporary name, then rename)."""
        p = Path(path)
        if p.suffix.lower() == ".csv":
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["kind", "index", "key", "value"])
            w.writerows(self.rows())
            text = buf.getvalue()
        elif p.suffix.lower() == ".json":
            text = json.dumps(self.to_dict(), indent=1, default=_jsonable) + "\n"
        else:
            raise ValueError(f"telemetry file {p}: suffix must be .json or .csv")
        write_text_atomic(p, text)
        return p

    def summary_table(self, title: str | None = None):
        """A rich table of the metrics, for the terminal."""
        from rich.table import Table
        t = Table(title=title or f"infeng {self.command}", show_header=True, header_style="bold")
        t.add_column("metric")
        t.add_column("value", justify="right")
        for k, v in self.metrics.items():
            t.add_row(k, _fmt(v))
        return t

    def print_summary(self, title: str | None = None):
        stderr_console().print(self.summary_table(title))


def stderr_console():
    """The terminal for humans: summaries and progress bars go to stderr, never stdout."""
    from rich.console import Console
    return Console(file=sys.stderr)


def progress(label: str, *columns):
    """A transient rich progress bar on stderr: ``label``, a bar, then ``columns``."""
    from rich.progress import BarColumn, Progress, TextColumn
    return Progress(TextColumn(label), BarColumn(), *columns, transient=True, console=stderr_console())


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def _jsonable(o: Any):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """A temporary name beside ``path`` (``.NAME.tmp-PID`` + ``suffix``, for writers that insist
    on one) to write to; renamed onto ``path`` when the block ends cleanly, removed otherwise,
    so nobody ever sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
