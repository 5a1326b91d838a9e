"""`infeng bench`: a scenario suite, or one kernel micro-benchmark, side by side with peers."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.progress import MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from infeng.bench.baseline import (DEFAULT_TOLERANCE_PCT, against_baseline, check_tolerance, load_bench_report,
                                   rows_markdown)
from infeng.bench.comparisons import ComparisonSuite
from infeng.bench.report import markdown, plot, table, to_run
from infeng.bench.suite import Scenario, Suite, load_suite, run_suite, steps_total
from infeng.evals.suite import diff_table
from infeng.errors import InfengError
from infeng.kernels import default_threads
from infeng.telemetry import progress, stderr_console

REGRESSION_EXIT = 3  # as `infeng eval --baseline`


def bench(
    suite_path: Optional[Path] = typer.Option(None, "--suite", help="scenario suite (YAML), e.g. bench/decode.yaml"),
    kernel: Optional[str] = typer.Option(None, "--kernel", help="one micro-benchmark: gemv | gemm | attention | bandwidth"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="weight dtype: for --kernel gemv/gemm (default bf16), and of a synthetic model"),
    shape: str = typer.Option("2048x5632", "--shape", help="weight ROWSxCOLS for --kernel gemv/gemm"),
    tokens: int = typer.Option(128, "--tokens", help="rows of x for --kernel gemm"),
    depth: int = typer.Option(1024, "--depth", help="cached positions for --kernel attention"),
    mb: float = typer.Option(256, "--mb", help="buffer MiB for --kernel bandwidth"),
    model: Optional[str] = typer.Option(None, "--model", help="model for the suite: a synthetic architecture or a path"),
    threads: Optional[int] = typer.Option(None, "--threads", help="threads [default: the suite's, else physical cores]"),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="repeats per scenario and runner (median reported)"),
    peer: Optional[List[str]] = typer.Option(None, "--peer", help="peer to run alongside: llama.cpp, llama.cpp:fa=0, llama.cpp:fa=1, torch (repeatable)"),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="GGUF file of the same model for the llama.cpp peer"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write results (telemetry schema) as JSON"),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="write results (telemetry schema) as CSV"),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="write a PNG of tok/s per scenario and runner"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="a stored --json report: exit 3 if a figure (ratio to a peer, or to the run's probe) falls more than --tolerance below it"),
    tolerance: float = typer.Option(DEFAULT_TOLERANCE_PCT, "--tolerance", help="percent a figure may fall below --baseline's"),
    md: bool = typer.Option(False, "--md", help="print the results (and the --baseline comparison) as markdown tables on stdout"),
):
    """Kernel micro-benchmarks and end-to-end scenarios; medians, ratios, % of the bandwidth roofline.

    A suite file with a top-level `kind` runs one of the comparisons instead (lora_overhead,
    peft_lora, llamacpp_lora, llamacpp_kld, engine, job_memory, job_resume, scale_out, sim, serve_load,
    serve_llamacpp, grammar_mask, grammar_step, llamacpp_agreement, spec, kv_cache, gguf_types)."""
    if (suite_path is None) == (kernel is None):
        raise InfengError("give --suite FILE.yaml or --kernel NAME (one of them)")
    for flag, out, sfx in (("--json", json_out, ".json"), ("--csv", csv_out, ".csv"), ("--plot", plot_out, ".png")):
        if out is not None:
            if out.suffix.lower() != sfx:
                raise InfengError(f"{flag} {out}: suffix must be {sfx}")
            if not out.parent.is_dir():
                raise InfengError(f"{out.parent}: no such directory (for {out.name})")
    if threads is not None and threads < 1:
        raise InfengError(f"--threads must be >= 1, got {threads}")
    if repeats is not None and repeats < 1:
        raise InfengError(f"--repeats must be >= 1, got {repeats}")
    check_tolerance(tolerance)
    base = load_bench_report(baseline) if baseline is not None else None

    if suite_path is not None:
        suite = load_suite(suite_path)
        if isinstance(suite, ComparisonSuite):
            given = [f for f, v in (("--kernel", kernel), ("--dtype", dtype), ("--peer", peer), ("--gguf", gguf),
                                    ("--plot", plot_out), ("--baseline", baseline), ("--md", md)) if v]
            if given:
                raise InfengError(f"{', '.join(given)}: not used by kind {suite.kind.name} ({suite_path})")
            suite.override(model, threads, repeats)
            return _comparison(suite, json_out, csv_out)
    else:
        kd = dtype or "bf16"
        kinds = {"gemv": {"dtype": kd, "shape": shape}, "gemm": {"dtype": kd, "shape": shape, "tokens": tokens},
                 "attention": {"depth": depth}, "bandwidth": {"mb": mb}}
        if kernel not in kinds:
            raise InfengError(f"--kernel {kernel!r}: one of {', '.join(kinds)}")
        suite = Suite(scenarios=[Scenario(kernel, kinds[kernel])], threads=0)
    if model is not None:
        suite.model = model
    if dtype is not None:
        suite.dtype = dtype
    if threads is not None:
        suite.threads = threads
    if not suite.threads:
        suite.threads = default_threads()
    if repeats is not None:
        suite.repeats = repeats
    if peer:
        suite.peers = list(dict.fromkeys(peer))
    if gguf is not None:
        suite.gguf = str(gguf)

    console = stderr_console()
    notes: list[str] = []
    with progress("benchmarking", MofNCompleteColumn(), TextColumnSafe(), TimeElapsedColumn()) as bar:
        task = bar.add_task("bench", total=steps_total(suite), what="")
        results, meta = run_suite(suite, notes=notes, on_step=lambda name: bar.update(task, advance=1, what=name))
    for n in notes:
        console.print(f"[yellow]note:[/] {escape(n)}")
    console.print(table(results, meta))
    run = to_run(results, meta)
    if md:
        typer.echo(markdown(results, meta))
    if plot_out is not None:
        msg = plot(results, plot_out)
        if msg:
            console.print(f"[yellow]note:[/] {escape(msg)}")
    for out in (json_out, csv_out):
        if out is not None:
            run.write(out)
    if base is not None:
        rows = against_baseline(run.metrics, base, tolerance)
        console.print(diff_table(rows, f"vs baseline {baseline} (tolerance {tolerance:g} %)"))
        if md:
            typer.echo("\n" + rows_markdown(rows))
        bad = [r for r in rows if r.regressed]
        if bad:
            console.print(f"[bold red]{len(bad)} figure(s) regressed beyond {tolerance:g} %[/]: "
                          + ", ".join(r.metric for r in bad))
            raise typer.Exit(REGRESSION_EXIT)


def _comparison(suite: ComparisonSuite, json_out: Optional[Path], csv_out: Optional[Path]) -> None:
    console = stderr_console()
    with console.status(f"running {suite.kind.name}"):
        records, notes = suite.run(log=lambda line: console.print(escape(line), highlight=False))
    for n in notes:
        console.print(f"[yellow]note:[/] {escape(n)}")
    if records:
        console.print(records_table(suite.kind.name, records))
    run = suite.to_run(records, notes)
    for out in (json_out, csv_out):
        if out is not None:
            run.write(out)
    # a kind that checks its own run (serve_load: one complete response per accepted request)
    # fails the command, after its figures are written, when the check did not hold
    failed = [r for r in records if r.get("all_complete") is False]
    if failed:
        raise InfengError(f"{suite.kind.name}: {len(failed)} record(s) where not every request got one complete, "
                          "error-free response (see the notes above)")


def records_table(title: str, records: list[dict]) -> Table:
    """One column per record (they are wide: one row per field), numbers to 4 significant digits."""
    t = Table(title=title, header_style="bold")
    t.add_column("field")
    for i in range(len(records)):
        t.add_column(str(i + 1), justify="right")
    for key in dict.fromkeys(k for r in records for k in r):
        t.add_row(key, *(_cell(r.get(key, "")) for r in records))
    return t


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else escape(str(v))


def TextColumnSafe():
    return TextColumn("{task.fields[what]}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
