"""`infeng bench --baseline`: this run's figures against a stored `infeng bench --json` report.

Absolute tok/s and GB/s differ between machines and drift on a shared one, so what is compared
is what survives that (docs/usage.md, "Benchmarks in CI"):

- ``<scenario>.infeng_over_<peer>``: infeng ÷ a peer measured in the same run, A B A B;
- ``<scenario>.infeng_norm``: infeng's figure ÷ the run's own probe, timed beside every repeat
  (``probes.py``), both in on-CPU time: memory-bound kinds over the read-bandwidth probe,
  compute-bound kinds over the compute probe. The probes run the scalar kernel build, which
  ``INFENG_ISA`` and a vector path's regressions leave alone, so a slower kernel shows as a
  lower ratio. Steadiest at one thread (bench/ci.yaml).

Both are higher-is-better; a figure regresses when it falls more than ``tolerance`` percent
below the baseline's. The comparison itself is ``infeng.evals.suite.compare``, as
`infeng eval --baseline` uses it.
"""
from __future__ import annotations

import math
from pathlib import Path

from infeng.errors import InfengError
from infeng.evals.suite import Row, Tolerance, compare, read_report

DEFAULT_TOLERANCE_PCT = 10.0


def comparable(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a baseline comparison uses (see the module docstring)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and (k.endswith(".infeng_norm") or ".infeng_over_" in k)}


def load_bench_report(path: Path) -> dict[str, float]:
    """The comparable metrics of a stored `infeng bench --json` report."""
    base = comparable(read_report(path, "bench")["metrics"])
    if not base:
        raise InfengError(f"{path}: no figure to compare (no *.infeng_norm or *.infeng_over_* metric: "
                          "written by an infeng bench older than --baseline?)")
    return base


def check_tolerance(pct: float) -> float:
    if not math.isfinite(pct) or not 0 <= pct < 100:
        raise InfengError(f"--tolerance must be a percentage in [0, 100), got {pct:g}")
    return pct


def against_baseline(metrics: dict[str, float], base: dict[str, float], pct: float) -> list[Row]:
    """One row per figure of the baseline (a figure it lacks is listed as new, not compared)."""
    now = comparable(metrics)
    keys = list(base) + [k for k in now if k not in base]
    return compare(now, base, [(k, Tolerance(k, rel=pct / 100.0, better="higher")) for k in keys])


def rows_markdown(rows: list[Row]) -> str:
    """The comparison as a markdown table (CI logs)."""
    out = ["| figure | baseline | current | change | status |", "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        f = (lambda v: "—" if v is None else f"{v:.4g}")
        change = "—" if r.baseline in (None, 0) or r.current is None else f"{100 * (r.current / r.baseline - 1):+.1f} %"
        out.append(f"| {r.metric} | {f(r.baseline)} | {f(r.current)} | {change} | {r.status} |")
    return "\n".join(out)
