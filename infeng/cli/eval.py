"""`infeng eval`: perplexity, KL-divergence, HumanEval, GSM8K; suites and a regression diff."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from infeng.errors import InfengError
from infeng.evals import runner, suite as S
from infeng.evals.perplexity import adapter_identity, model_identity
from infeng.model.adapter import load_adapter
from infeng.model.loader import load_model
from infeng.telemetry import Run, peak_rss_mb, stderr_console

REGRESSION_EXIT = 3


def eval_cmd(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="native .infeng file or Hugging Face folder"),
    task: List[str] = typer.Option([], "--task", help="perplexity | kld | humaneval | gsm8k (repeatable)"),
    suite: Optional[Path] = typer.Option(None, "--suite", help="suite YAML: tasks, options, per-metric tolerances"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="stored eval report: exit 3 if a metric regresses beyond tolerance"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report (.json or .csv)"),
    text: Optional[Path] = typer.Option(None, "--text", help="text file for perplexity / KLD"),
    separator: Optional[str] = typer.Option(None, "--separator", help="document separator [default: <|endoftext|>]"),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="context length (window) [default: the model's, at most 4096]"),
    stride: Optional[int] = typer.Option(None, "--stride", help="sliding-window step past the context [default: ctx/2]"),
    kld: Optional[Path] = typer.Option(None, "--kld", help="baseline for KL-divergence: a model, or logits saved with --save-logits"),
    save_logits: Optional[Path] = typer.Option(None, "--save-logits", help="save the baseline's top-k log-probs (.npz) for reuse"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="baseline log-probs kept per position [default: 128]"),
    file: Optional[Path] = typer.Option(None, "--file", help="HumanEval .jsonl(.gz) / GSM8K .jsonl [default: INFENG_TEST_DATA/evals]"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first N problems"),
    subset: Optional[Path] = typer.Option(None, "--subset", help="file of HumanEval task ids, one per line"),
    shots: Optional[int] = typer.Option(None, "--shots", help="GSM8K exemplars in the prompt [default: 8]"),
    samples: Optional[int] = typer.Option(None, "--samples", help="HumanEval completions per problem (pass@k) [default: 1]"),
    k: Optional[List[int]] = typer.Option(None, "--k", help="pass@k to report (repeatable) [default: 1]"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="sampling temperature [default: 0 = greedy]"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="tokens generated per problem"),
    canonical: bool = typer.Option(False, "--canonical", help="HumanEval: grade the reference solutions instead of generating (checks the sandbox: expect pass@1 = 1)"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="HumanEval seconds per problem (wall and CPU)"),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="sequences generated together"),
    seed: int = typer.Option(0, "--seed", help="random seed (same seed, same numbers)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="compute threads [default: physical cores]"),
    progress_bars: bool = typer.Option(True, "--progress/--no-progress", help="progress bars on stderr"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="LoRA/DoRA adapter (.infeng-lora) applied to MODEL in every task"),
    compare: List[str] = typer.Option([], "--compare", help="MODEL or MODEL::ADAPTER (e.g. a quantized variant) run through the same tasks, reported side by side (repeatable)"),
):
    """Evaluate a model: perplexity, KL-divergence, HumanEval, GSM8K, or a suite with a regression check."""

    if threads is not None and threads < 1:
        raise InfengError(f"--threads must be >= 1, got {threads}")
    if seed < 0:
        raise InfengError(f"--seed must be >= 0, got {seed}")
    if json_out is not None:
        if json_out.suffix.lower() not in (".json", ".csv"):
            raise InfengError(f"--json {json_out}: suffix must be .json or .csv")
        if not json_out.parent.is_dir():
            raise InfengError(f"{json_out.parent}: no such directory (for {json_out.name})")
    cli_opts = {"text": text, "separator": separator, "ctx": ctx, "stride": stride, "base": kld,
                "save_logits": save_logits, "top_k": top_k, "file": file, "limit": limit, "subset": subset,
                "shots": shots, "samples": samples, "k": list(k) if k else None, "temperature": temperature,
                "max_tokens": max_tokens, "timeout": timeout, "max_batch": max_batch,
                "canonical": True if canonical else None}
    cli_opts = {n: (str(v) if isinstance(v, Path) else v) for n, v in cli_opts.items() if v is not None}

    # what to run: (name, task, options, tolerances)
    plan: list[S.SuiteTask] = []
    suite_obj = None
    save_only = False
    if suite is not None:
        if task:
            raise InfengError("--suite and --task cannot be used together")
        suite_obj = S.load_suite(suite)
        for t in suite_obj.tasks:
            opts = dict(t.options)
            # command-line options override the suite's, for the tasks that take them
            opts.update({n: v for n, v in cli_opts.items() if n in runner.TASK_OPTIONS[t.task]})
            plan.append(S.SuiteTask(t.name, t.task, opts, t.tolerances))
        if suite_obj.seed is not None and seed == 0:
            seed = suite_obj.seed
        stray = [o for o in cli_opts if not any(o in runner.TASK_OPTIONS[t.task] for t in plan)]
        if stray:
            raise InfengError(f"option(s) {', '.join('--' + o.replace('_', '-') for o in stray)} apply to no task of "
                              f"the suite {suite}")
    else:
        names = list(task)
        if not names:
            if kld is not None:
                names = ["kld"]
            elif save_logits is not None:
                save_only = True
            elif text is not None:
                names = ["perplexity"]
            else:
                raise InfengError("nothing to evaluate: give --task, --suite, --text or --kld")
        for n in names:
            if n not in runner.TASK_OPTIONS:
                raise InfengError(f"unknown task {n!r} (known: {', '.join(sorted(runner.TASK_OPTIONS))})")
        if len(set(names)) != len(names):
            raise InfengError("a task is named twice in --task")
        for n in names:
            opts = {o: v for o, v in cli_opts.items() if o in runner.TASK_OPTIONS[n]}
            plan.append(S.SuiteTask(n, n, opts, []))
        used = {o for t in plan for o in runner.TASK_OPTIONS[t.task]} | ({"text", "separator", "ctx", "stride", "top_k", "save_logits"} if save_only else set())
        stray = [o for o in cli_opts if o not in used]
        if stray:
            raise InfengError(f"option(s) {', '.join('--' + o.replace('_', '-') for o in stray)} do not apply to "
                              f"{', '.join(t.task for t in plan) or 'saving logits'}")
    for t in plan:
        runner.check_options(t.task, t.options, f"task {t.name}")
    base_report = S.load_report(baseline) if baseline is not None else None

    if compare and save_only:
        raise InfengError("--compare needs tasks to run (--save-logits alone saves one model's logits)")
    t_load = time.perf_counter()
    model = load_model(model_path)
    # every model (and adapter) loads before any work starts
    variants = []
    for spec in compare:
        vp, _, va = spec.partition("::")
        vm = load_model(Path(vp))
        va_id = None
        if va:
            va_id = adapter_identity(Path(va), load_adapter(Path(va), vm))
        variants.append((Path(vp), vm, Path(va) if va else None, va_id))
    adapter_id = None
    if adapter is not None:
        adapter_id = adapter_identity(adapter, load_adapter(adapter, model))   # checked against MODEL now
    ec = runner.EvalContext(model_path, model, threads, seed, progress_bars, adapter=adapter)
    run = Run("eval", meta={"model": model_identity(model_path, model), "seed": seed,
                            "suite": suite_obj.name if suite_obj else None,
                            "suite_file": str(suite) if suite else None,
                            "adapter": adapter_id, "quantization": model.weight_dtype})
    run.metrics["load_s"] = time.perf_counter() - t_load
    console = _wide_console() or stderr_console()
    t_all = time.perf_counter()
    if save_only:
        m = runner.save_own_logits(ec, cli_opts)
        run.metrics.update({f"baseline.{k_}": v for k_, v in m.items()})
        console.print(f"saved baseline logits of {model_path} to {save_logits} (PPL {m['ppl']:.4f})")
    for t in plan:
        with run.span(t.name):
            m, recs, dt = runner.run_task(ec, t.task, t.options)
        run.metrics.update({f"{t.name}.{k_}": v for k_, v in m.items()})
        run.metrics[f"{t.name}.time_s"] = dt
        run.records.extend(dict(task=t.name, **r) for r in recs)
    labels = _labels([(model_path, adapter)] + [(p, a) for p, _, a, _ in variants])
    if variants:
        run.meta["variants"] = []
        for label, (vp, vm, va, va_id) in zip(labels[1:], variants):
            ecv = runner.EvalContext(vp, vm, threads, seed, progress_bars, cache=ec.cache, adapter=va)
            for t in plan:
                with run.span(f"{label}/{t.name}"):
                    m, recs, dt = runner.run_task(ecv, t.task, t.options)
                run.metrics.update({f"{label}/{t.name}.{k_}": v for k_, v in m.items()})
                run.metrics[f"{label}/{t.name}.time_s"] = dt
                run.records.extend(dict(task=t.name, variant=label, **r) for r in recs)
            run.meta["variants"].append({"label": label, "model": model_identity(vp, vm), "adapter": va_id, **ecv.meta})
    run.metrics["total_s"] = time.perf_counter() - t_all
    run.metrics["peak_rss_mb"] = peak_rss_mb()
    run.meta.update(ec.meta)
    run.meta["tasks"] = [{"name": t.name, "task": t.task, "options": t.options,
                          "tolerance": {x.metric: {"abs": x.abs, "rel": x.rel, "better": x.better} for x in t.tolerances}}
                         for t in plan]
    run.print_summary(f"infeng eval {model_path}")
    if variants:
        console.print(side_by_side(run.metrics, plan, labels))
    if json_out is not None:
        run.write(json_out)
    if base_report is not None:
        tols = [(f"{t.name}.{x.metric}", x) for t in plan for x in t.tolerances]
        if not tols:   # no suite: the headline metrics with default tolerances
            tols = [(f"{t.name}.{mm}", S.parse_tolerance(mm, spec, "defaults"))
                    for t in plan for mm, spec in S.DEFAULT_TOLERANCES.get(t.task, {}).items()]
        rows = S.compare(run.metrics, base_report["metrics"], tols)
        console.print(S.diff_table(rows, f"vs baseline {baseline}"))
        bad = [r for r in rows if r.regressed]
        if bad:
            console.print(f"[bold red]{len(bad)} metric(s) regressed beyond tolerance[/]: "
                          + ", ".join(r.metric for r in bad))
            raise typer.Exit(REGRESSION_EXIT)
    return 0


HEADLINE = {"perplexity": ("ppl", "ppl_se", "time_s"),
            "kld": ("ppl", "base_ppl", "kld_mean", "kld_median", "kld_p99", "top1_agreement", "time_s"),
            "humaneval": ("pass@1", "time_s"), "gsm8k": ("accuracy", "time_s")}


def _wide_console():
    """Tables are wide: when stderr is not a terminal (logs of nightly jobs), don't wrap at 80."""
    import sys
    from rich.console import Console
    return None if sys.stderr.isatty() else Console(file=sys.stderr, width=160)


def _labels(models: list[tuple[Path, Path | None]]) -> list[str]:
    """Short, unique column names: the file or folder name (+ the adapter's)."""
    out: list[str] = []
    for p, a in models:
        base = (Path(p).name or str(p)) + (f"+{Path(a).name}" if a else "")
        lab, n = base, 2
        while lab in out:
            lab, n = f"{base}#{n}", n + 1
        out.append(lab)
    return out


def side_by_side(metrics: dict, plan, labels: list[str]):
    """The headline metrics of every task, one column per model (the first is the main one)."""
    from rich.table import Table
    t = Table(title="side by side", header_style="bold")
    t.add_column("metric")
    for lab in labels:
        t.add_column(lab, justify="right")
    for task in plan:
        for mm in HEADLINE.get(task.task, ()):
            keys = [f"{task.name}.{mm}"] + [f"{lab}/{task.name}.{mm}" for lab in labels[1:]]
            vals = [metrics.get(k_) for k_ in keys]
            t.add_row(f"{task.name}.{mm}", *("—" if v is None else f"{v:.6g}" for v in vals))
    return t


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
