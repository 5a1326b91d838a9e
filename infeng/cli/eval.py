"""`infeng eval`: perplexity, KL-divergence, HumanEval, GSM8K; suites and a regression diff."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from infeng.errors import InfengError
from infeng.evals import evaluate as E, suite as S
from infeng.runtime.kvspec import kv_options
from infeng.telemetry import stderr_console

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
    kv_dtype: str = typer.Option("f32", "--kv-dtype", help="KV cache type of MODEL: f32, bf16, f16, int8, fp8, int4, or k=TYPE,v=TYPE (a --kld baseline model keeps f32)"),
    kv_policy: Optional[str] = typer.Option(None, "--kv-policy", help="per-layer KV types, e.g. 'layers 0,1,-1: bf16'"),
    kv_rotate: str = typer.Option("auto", "--kv-rotate", help="Hadamard rotation of keys and values: auto, on, keys, off"),
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
    p = E.plan(task, suite, cli_opts, seed)
    base_report = S.load_report(baseline) if baseline is not None else None
    if compare and p.save_only:
        raise InfengError("--compare needs tasks to run (--save-logits alone saves one model's logits)")
    console = _wide_console() or stderr_console()
    run, labels = E.evaluate(model_path, p, cli_opts, compare, threads, progress_bars, adapter, suite,
                             on_saved=lambda m: console.print(f"saved baseline logits of {model_path} to "
                                                              f"{save_logits} (PPL {m['ppl']:.4f})"),
                             kv=kv_options(kv_dtype, kv_policy, kv_rotate))
    run.print_summary(f"infeng eval {model_path}")
    if compare:
        console.print(side_by_side(run.metrics, p.tasks, labels))
    if json_out is not None:
        run.write(json_out)
    if base_report is not None:
        rows = E.against_baseline(run, p, base_report)
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
    return None if sys.stderr.isatty() else Console(file=sys.stderr, width=160)


def side_by_side(metrics: dict, plan, labels: list[str]):
    """The headline metrics of every task, one column per model (the first is the main one)."""
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
