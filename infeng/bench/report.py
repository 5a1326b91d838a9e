"""What a bench run reports: the telemetry record, the rich table, the markdown table for CI logs
and an optional PNG chart, from ``infeng.bench.suite``'s results."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from infeng.telemetry import Run, atomic_path

if TYPE_CHECKING:
    from infeng.bench.suite import Result


def to_run(results: list[Result], meta: dict[str, Any], command: str = "bench"):
    """The results in the telemetry schema: one record per (scenario, runner), metrics by name."""
    run = Run(command, meta=dict(meta))
    base = {r.scenario.name: r.median for r in results if r.runner == "infeng"}
    for r in results:
        rec = {"scenario": r.scenario.name, "kind": r.scenario.kind, "runner": r.runner,
               "unit": r.scenario.unit, "median": r.median, "values": list(r.values),
               "seconds": list(r.seconds), "params": dict(r.scenario.params)}
        if r.skipped:
            rec["skipped"] = r.skipped
        if r.runner != "infeng" and r.values and base.get(r.scenario.name):
            rec["infeng_over_peer"] = base[r.scenario.name] / r.median
        rec.update(r.extra)
        run.records.append(rec)
        if r.values:
            key = _metric_key(r.scenario.name)
            suffix = {"GB/s": "gb_s", "GFLOP/s": "gflop_s", "GOP/s": "gop_s", "tok/s": "tok_s"}[r.scenario.unit]
            run.metrics[f"{key}.{_metric_key(r.runner)}_{suffix}"] = r.median
            if "roofline_pct" in r.extra:
                run.metrics[f"{key}.{_metric_key(r.runner)}_roofline_pct"] = r.extra["roofline_pct"]
            if "infeng_over_peer" in rec:
                run.metrics[f"{key}.infeng_over_{_metric_key(r.runner)}"] = rec["infeng_over_peer"]
            if "norm" in r.extra:   # the figure ÷ its probe (baseline.py)
                run.metrics[f"{key}.infeng_norm"] = r.extra["norm"]
    if meta.get("bandwidth_gb_s"):
        run.metrics["read_bandwidth_gb_s"] = meta["bandwidth_gb_s"]
    return run


def _metric_key(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_")


def table(results: list[Result], meta: dict[str, Any]):
    """A rich table: one row per scenario; infeng, each peer, infeng ÷ peer, % of roofline."""
    from rich.table import Table
    peers = list(meta.get("peers", []))
    t = Table(title=f"infeng bench · {meta.get('model')} · {meta.get('threads')} threads · {meta.get('isa')}",
              header_style="bold")
    roof = any("roofline_pct" in r.extra for r in results)
    py = any("py_overhead_us_per_tok" in r.extra for r in results)
    for col in ["scenario", "unit", "infeng"] + peers + [f"× {p}" for p in peers] + \
            (["% roofline"] if roof else []) + (["py µs/tok"] if py else []):
        t.add_column(col, justify="left" if col == "scenario" else "right")
    by = {}
    order = []
    for r in results:
        if r.scenario.name not in by:
            order.append(r.scenario.name)
        by.setdefault(r.scenario.name, {})[r.runner] = r
    for name in order:
        row = by[name]
        me = row.get("infeng")
        unit = me.scenario.unit if me else next(iter(row.values())).scenario.unit
        cells = [name, unit, _f(me.median) if me else "–"]
        ratios = []
        for p in peers:
            pr = row.get(p)
            if pr is None or not pr.values:
                cells.append("skip" if pr is not None else "–")
                ratios.append("–")
            else:
                cells.append(_f(pr.median))
                ratios.append(f"{me.median / pr.median:.2f}×" if me and me.values else "–")
        cells += ratios
        if roof:
            cells.append(f"{me.extra['roofline_pct']:.0f}%" if me and "roofline_pct" in me.extra else "")
        if py:
            cells.append(f"{me.extra['py_overhead_us_per_tok']:.0f}" if me and "py_overhead_us_per_tok" in me.extra else "")
        t.add_row(*cells)
    return t


def markdown(results: list[Result], meta: dict[str, Any]) -> str:
    """The table of ``table`` as markdown (CI logs, as `llama-bench -o md`): one row per scenario,
    infeng, each peer, infeng ÷ peer, and infeng's figure ÷ the run's probe."""
    peers = list(meta.get("peers", []))
    cols = ["scenario", "unit", "infeng"] + peers + [f"× {p}" for p in peers] + ["÷ probe"]
    out = [f"infeng bench · {meta.get('model')} · {meta.get('threads')} threads · {meta.get('isa')}", "",
           "| " + " | ".join(cols) + " |", "| --- | --- |" + " ---: |" * (len(cols) - 2)]
    by: dict[str, dict[str, Result]] = {}
    for r in results:
        by.setdefault(r.scenario.name, {})[r.runner] = r
    for name, row in by.items():
        me = row.get("infeng")
        unit = (me or next(iter(row.values()))).scenario.unit
        ok = me is not None and bool(me.values)
        cells = [name, unit, _f(me.median) if ok else "–"]
        got = [row.get(p) for p in peers]
        cells += [_f(pr.median) if pr is not None and pr.values else "–" for pr in got]
        cells += [f"{me.median / pr.median:.2f}" if ok and pr is not None and pr.values else "–" for pr in got]
        cells.append(f"{me.extra['norm']:.4g}" if ok and "norm" in me.extra else "–")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _f(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def plot(results: list[Result], path: str | Path) -> str | None:
    """A PNG bar chart of the end-to-end tok/s per scenario and runner. Returns a note (and
    writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib not installed (pip install -e '.[bench]')"
    rows = [r for r in results if r.scenario.unit == "tok/s" and r.values]
    names = list(dict.fromkeys(r.scenario.name for r in rows))
    runners = list(dict.fromkeys(r.runner for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) * max(1, len(runners))), 4))
    w = 0.8 / max(1, len(runners))
    for j, who in enumerate(runners):
        vals = [next((r.median for r in rows if r.scenario.name == n and r.runner == who), 0.0) for n in names]
        ax.bar([i + j * w for i in range(len(names))], vals, w, label=who)
    ax.set_xticks([i + w * (len(runners) - 1) / 2 for i in range(len(names))], names, rotation=20)
    ax.set_ylabel("tok/s")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return None
