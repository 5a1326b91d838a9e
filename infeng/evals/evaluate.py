"""What `infeng eval` does, below its options: plan the tasks (from --task or a suite, command-line
options over the suite's), load every model before any work, run the plan on the model and on each
variant, and compare the metrics with a stored baseline."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from infeng.errors import InfengError
from infeng.evals import runner, suite as S
from infeng.evals.perplexity import adapter_identity, model_identity
from infeng.model.adapter import load_adapter
from infeng.model.loader import Model, load_model
from infeng.runtime.kvspec import kv_spec
from infeng.telemetry import Run, peak_rss_mb

SAVE_LOGITS_OPTIONS = {"text", "separator", "ctx", "stride", "top_k", "save_logits"}


@dataclass
class Plan:
    tasks: list[S.SuiteTask]
    suite: S.Suite | None = None
    save_only: bool = False          # --save-logits alone: save the model's own baseline logits
    seed: int = 0


def plan(task_names: list[str], suite_path: Path | None, opts: dict[str, Any], seed: int) -> Plan:
    """The tasks to run with their options (``opts``: the command line's, by task option name);
    an option no planned task takes is an error naming it."""
    out = Plan([], seed=seed)
    if suite_path is not None:
        if task_names:
            raise InfengError("--suite and --task cannot be used together")
        out.suite = S.load_suite(suite_path)
        for t in out.suite.tasks:
            # command-line options override the suite's, for the tasks that take them
            merged = {**t.options, **{n: v for n, v in opts.items() if n in runner.TASK_OPTIONS[t.task]}}
            out.tasks.append(S.SuiteTask(t.name, t.task, merged, t.tolerances))
        if out.suite.seed is not None and seed == 0:
            out.seed = out.suite.seed
        stray = [o for o in opts if not any(o in runner.TASK_OPTIONS[t.task] for t in out.tasks)]
        if stray:
            raise InfengError(f"option(s) {_flags(stray)} apply to no task of the suite {suite_path}")
    else:
        names = list(task_names)
        if not names:
            if "base" in opts:
                names = ["kld"]
            elif "save_logits" in opts:
                out.save_only = True
            elif "text" in opts:
                names = ["perplexity"]
            else:
                raise InfengError("nothing to evaluate: give --task, --suite, --text or --kld")
        for n in names:
            if n not in runner.TASK_OPTIONS:
                raise InfengError(f"unknown task {n!r} (known: {', '.join(sorted(runner.TASK_OPTIONS))})")
        if len(set(names)) != len(names):
            raise InfengError("a task is named twice in --task")
        out.tasks = [S.SuiteTask(n, n, {o: v for o, v in opts.items() if o in runner.TASK_OPTIONS[n]}, [])
                     for n in names]
        used = {o for t in out.tasks for o in runner.TASK_OPTIONS[t.task]}
        used |= SAVE_LOGITS_OPTIONS if out.save_only else set()
        stray = [o for o in opts if o not in used]
        if stray:
            raise InfengError(f"option(s) {_flags(stray)} do not apply to "
                              f"{', '.join(t.task for t in out.tasks) or 'saving logits'}")
    for t in out.tasks:
        runner.check_options(t.task, t.options, f"task {t.name}")
    return out


def _flags(names: list[str]) -> str:
    return ", ".join("--" + o.replace("_", "-") for o in names)


@dataclass
class Variant:
    """A model (and adapter) run through the same tasks as the main one, reported beside it."""
    path: Path
    model: Model
    adapter: Path | None
    adapter_id: dict | None


def load_variants(specs: list[str]) -> list[Variant]:
    """``MODEL`` or ``MODEL::ADAPTER`` each, loaded (and the adapter checked against its model) now."""
    out = []
    for spec in specs:
        vp, _, va = spec.partition("::")
        vm = load_model(Path(vp))
        va_id = adapter_identity(Path(va), load_adapter(Path(va), vm)) if va else None
        out.append(Variant(Path(vp), vm, Path(va) if va else None, va_id))
    return out


def labels(models: list[tuple[Path, Path | None]]) -> list[str]:
    """Short, unique column names: the file or folder name (+ the adapter's)."""
    out: list[str] = []
    for p, a in models:
        base = (Path(p).name or str(p)) + (f"+{Path(a).name}" if a else "")
        lab, n = base, 2
        while lab in out:
            lab, n = f"{base}#{n}", n + 1
        out.append(lab)
    return out


def evaluate(model_path: Path, p: Plan, opts: dict[str, Any], compare: list[str], threads: int | None,
             progress_bars: bool, adapter: Path | None = None, suite_path: Path | None = None,
             on_saved: Callable[[dict], None] | None = None, kv: dict | None = None) -> tuple[Run, list[str]]:
    """Load the model, the variants of ``compare`` and the adapter (all before any work), run the
    plan on the model, then on each variant (sharing the baseline cache). The report, and the
    column label of each model (the main one first). ``kv``: the Engine's kv_* options for the
    model and its variants (a KLD baseline model keeps the f32 cache)."""
    t_load = time.perf_counter()
    model = load_model(model_path)
    variants = load_variants(compare)
    adapter_id = adapter_identity(adapter, load_adapter(adapter, model)) if adapter is not None else None
    names = labels([(model_path, adapter)] + [(v.path, v.adapter) for v in variants])
    kv = kv or {}
    ec = runner.EvalContext(model_path, model, threads, p.seed, progress_bars, adapter=adapter, kv=kv)
    run = Run("eval", meta={"model": model_identity(model_path, model), "seed": p.seed,
                            "suite": p.suite.name if p.suite else None,
                            "suite_file": str(suite_path) if suite_path else None,
                            "adapter": adapter_id, "quantization": model.weight_dtype,
                            "kv_dtype": kv_spec(model.config, kv.get("kv_dtype", "f32"), kv.get("kv_policy"),
                                                kv.get("kv_rotate", "auto")).describe()})
    run.metrics["load_s"] = time.perf_counter() - t_load
    t_all = time.perf_counter()
    if p.save_only:
        m = runner.save_own_logits(ec, opts)
        run.metrics.update({f"baseline.{k}": v for k, v in m.items()})
        if on_saved:
            on_saved(m)
    _run_tasks(run, ec, p, "", {})
    if variants:
        run.meta["variants"] = []
        for label, v in zip(names[1:], variants):
            ecv = runner.EvalContext(v.path, v.model, threads, p.seed, progress_bars, cache=ec.cache, adapter=v.adapter,
                                     kv=kv)
            _run_tasks(run, ecv, p, f"{label}/", {"variant": label})
            run.meta["variants"].append({"label": label, "model": model_identity(v.path, v.model),
                                         "adapter": v.adapter_id, **ecv.meta})
    run.metrics["total_s"] = time.perf_counter() - t_all
    run.metrics["peak_rss_mb"] = peak_rss_mb()
    run.meta.update(ec.meta)
    run.meta["tasks"] = [{"name": t.name, "task": t.task, "options": t.options,
                          "tolerance": {x.metric: {"abs": x.abs, "rel": x.rel, "better": x.better} for x in t.tolerances}}
                         for t in p.tasks]
    return run, names


def _run_tasks(run: Run, ec: runner.EvalContext, p: Plan, prefix: str, tag: dict[str, str]) -> None:
    for t in p.tasks:
        with run.span(f"{prefix}{t.name}"):
            m, recs, dt = runner.run_task(ec, t.task, t.options)
        run.metrics.update({f"{prefix}{t.name}.{k}": v for k, v in m.items()})
        run.metrics[f"{prefix}{t.name}.time_s"] = dt
        run.records.extend(dict(task=t.name, **tag, **r) for r in recs)


def against_baseline(run: Run, p: Plan, report: dict) -> list[S.Row]:
    """Each tolerated metric against the stored report (a plan without tolerances: the headline
    metrics with the default tolerances)."""
    tols = [(f"{t.name}.{x.metric}", x) for t in p.tasks for x in t.tolerances]
    if not tols:
        tols = [(f"{t.name}.{mm}", S.parse_tolerance(mm, spec, "defaults"))
                for t in p.tasks for mm, spec in S.DEFAULT_TOLERANCES.get(t.task, {}).items()]
    return S.compare(run.metrics, report["metrics"], tols)
