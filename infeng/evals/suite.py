"""Eval suites (YAML) and the regression diff against a stored report.

A suite names its tasks, their options and, per metric, how far the metric may move in the bad
direction before a run counts as a regression::

    name: nightly
    data_dir: ${INFENG_TEST_DATA:-../../shared/data}   # relative paths: against the suite's folder
    tasks:
      - name: ppl                 # the report's metric prefix ("ppl.ppl")
        task: perplexity
        text: text/tinystories_sample.txt                # text/file/base: against data_dir
        tolerance:
          ppl: {rel: 0.003}       # allowed worsening: max(abs, rel * |baseline|)

Each metric has a better direction (``ppl`` lower, ``pass@1`` higher, ...); a tolerance may state
``better: higher|lower`` for a metric this module does not know.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infeng.errors import InfengError
from infeng.evals.runner import TASK_OPTIONS

LOWER_IS_BETTER = {"ppl", "mean_nll", "ppl_ratio", "delta_ppl", "kld_mean", "kld_median", "kld_p99", "kld_max"}
HIGHER_IS_BETTER = {"top1_agreement", "pass@1", "pass@10", "pass@100", "accuracy"}
PATH_KEYS = {"text", "file", "base"}
SUITE_KEYS = {"name", "data_dir", "seed", "tasks", "description"}
# tolerances used with --baseline when no suite states them
DEFAULT_TOLERANCES = {
    "perplexity": {"ppl": {"rel": 0.003}},
    "kld": {"kld_mean": {"abs": 0.001}, "ppl": {"rel": 0.003}, "top1_agreement": {"abs": 0.005}},
    "humaneval": {"pass@1": {"abs": 0.0}},
    "gsm8k": {"accuracy": {"abs": 0.0}},
}


@dataclass
class Tolerance:
    metric: str
    abs: float = 0.0
    rel: float = 0.0
    better: str = "lower"

    def allowed(self, base: float) -> float:
        return max(self.abs, self.rel * abs(base))


@dataclass
class SuiteTask:
    name: str
    task: str
    options: dict[str, Any]
    tolerances: list[Tolerance] = field(default_factory=list)


@dataclass
class Suite:
    name: str
    path: Path | None
    tasks: list[SuiteTask]
    seed: int | None = None


def _expand(value: str, where: str) -> str:
    """${VAR} and ${VAR:-default}; an unset variable without a default is an error.
    A value from the environment is a path the user typed in their shell, so a relative one is
    made absolute against the current directory (a default stays relative to the suite)."""
    def sub(m):
        var, default = m.group(1), m.group(3)
        if var in os.environ and os.environ[var] != "":
            return os.path.abspath(os.environ[var])
        if default is not None:
            return default
        raise InfengError(f"{where}: environment variable {var} is not set")
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, value)


def parse_tolerance(metric: str, spec: Any, where: str) -> Tolerance:
    if not isinstance(spec, dict) or not spec or set(spec) - {"abs", "rel", "better"}:
        raise InfengError(f"{where}: tolerance of {metric!r} must be a mapping with abs and/or rel (and optionally better)")
    t = Tolerance(metric)
    for k in ("abs", "rel"):
        if k in spec:
            v = spec[k]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise InfengError(f"{where}: tolerance {metric}.{k} must be a number >= 0, got {v!r}")
            setattr(t, k, float(v))
    if "better" in spec:
        if spec["better"] not in ("higher", "lower"):
            raise InfengError(f"{where}: tolerance {metric}.better must be 'higher' or 'lower'")
        t.better = spec["better"]
    elif metric in HIGHER_IS_BETTER or metric.startswith("pass@"):
        t.better = "higher"
    elif metric not in LOWER_IS_BETTER:
        raise InfengError(f"{where}: unknown metric {metric!r}: say which way is better (better: higher|lower)")
    return t


def load_suite(path: Path) -> Suite:
    import yaml
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InfengError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InfengError(f"{p}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise InfengError(f"{p}: not valid YAML{at} ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise InfengError(f"{p}: a suite must be a mapping with a 'tasks' list")
    unknown = set(raw) - SUITE_KEYS
    if unknown:
        raise InfengError(f"{p}: unknown key(s) {', '.join(sorted(map(str, unknown)))} (allowed: {', '.join(sorted(SUITE_KEYS))})")
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise InfengError(f"{p}: 'tasks' must be a non-empty list")
    base_dir = p.resolve().parent
    data_dir = base_dir
    if raw.get("data_dir") is not None:
        if not isinstance(raw["data_dir"], str):
            raise InfengError(f"{p}: data_dir must be a string")
        data_dir = (base_dir / _expand(raw["data_dir"], str(p))).resolve()
    seed = raw.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise InfengError(f"{p}: seed must be an integer >= 0")
    out, names = [], set()
    for i, t in enumerate(tasks, 1):
        where = f"{p}: task {i}"
        if not isinstance(t, dict) or not isinstance(t.get("task"), str):
            raise InfengError(f"{where}: each task must be a mapping with a 'task' name")
        kind = t["task"]
        if kind not in TASK_OPTIONS:
            raise InfengError(f"{where}: unknown task {kind!r} (known: {', '.join(sorted(TASK_OPTIONS))})")
        name = t.get("name", kind)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise InfengError(f"{where}: name must be letters, digits, - or _")
        if name in names:
            raise InfengError(f"{where}: duplicate task name {name!r}")
        names.add(name)
        opts = {k: v for k, v in t.items() if k not in ("task", "name", "tolerance")}
        bad = set(opts) - TASK_OPTIONS[kind]
        if bad:
            raise InfengError(f"{where} ({kind}): unknown option(s) {', '.join(sorted(map(str, bad)))} "
                              f"(allowed: {', '.join(sorted(TASK_OPTIONS[kind]))})")
        for k in list(opts):
            if k in PATH_KEYS | {"subset"} and isinstance(opts[k], str):
                root = base_dir if k == "subset" else data_dir
                opts[k] = str((root / _expand(opts[k], where)).resolve())
        tol = t.get("tolerance") or {}
        if not isinstance(tol, dict):
            raise InfengError(f"{where}: tolerance must be a mapping metric → {{abs, rel}}")
        out.append(SuiteTask(name, kind, opts, [parse_tolerance(str(m), s, where) for m, s in tol.items()]))
    return Suite(str(raw.get("name") or p.stem), p, out, seed)


# ---- regression diff ------------------------------------------------------------------------
@dataclass
class Row:
    metric: str
    baseline: float | None
    current: float | None
    tolerance: Tolerance
    status: str          # "ok" | "better" | "REGRESSED" | "missing" | "new"

    @property
    def regressed(self) -> bool:
        return self.status in ("REGRESSED", "missing")


def read_report(path: Path, command: str) -> dict:
    """A stored telemetry report of `infeng <command> --json`, with its metrics."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InfengError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InfengError(f"{p}: not a JSON report ({e})") from None
    if not isinstance(d, dict) or d.get("schema") != "infeng.telemetry/1" or d.get("command") != command:
        raise InfengError(f"{p}: not an infeng {command} report (schema infeng.telemetry/1, command {command})")
    if not isinstance(d.get("metrics"), dict):
        raise InfengError(f"{p}: report has no metrics")
    return d


def load_report(path: Path) -> dict:
    return read_report(path, "eval")


def compare(metrics: dict[str, float], baseline: dict[str, float],
            tolerances: list[tuple[str, Tolerance]]) -> list[Row]:
    """``tolerances``: (full metric key, tolerance). A metric the baseline lacks is reported as new."""
    rows = []
    for key, tol in tolerances:
        b, c = baseline.get(key), metrics.get(key)
        if not isinstance(b, (int, float)) or isinstance(b, bool):
            rows.append(Row(key, None, c, tol, "new"))
            continue
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c):
            rows.append(Row(key, b, None if c is None else c, tol, "missing"))
            continue
        worse = (c - b) if tol.better == "lower" else (b - c)
        if worse > tol.allowed(b) * (1 + 1e-9) + 1e-12:
            status = "REGRESSED"
        elif worse < 0:
            status = "better"
        else:
            status = "ok"
        rows.append(Row(key, b, c, tol, status))
    return rows


def diff_table(rows: list[Row], title: str):
    from rich.table import Table
    t = Table(title=title, header_style="bold")
    for col, just in (("metric", "left"), ("baseline", "right"), ("current", "right"), ("delta", "right"),
                      ("allowed", "right"), ("better", "left"), ("status", "left")):
        t.add_column(col, justify=just)
    for r in rows:
        f = (lambda v: "—" if v is None else f"{v:.6g}")
        delta = None if r.baseline is None or r.current is None else r.current - r.baseline
        style = {"REGRESSED": "bold red", "missing": "bold red", "better": "green"}.get(r.status, "")
        t.add_row(r.metric, f(r.baseline), f(r.current), "—" if delta is None else f"{delta:+.4g}",
                  "—" if r.baseline is None else f"{r.tolerance.allowed(r.baseline):.4g}", r.tolerance.better,
                  f"[{style}]{r.status}[/]" if style else r.status)
    return t
