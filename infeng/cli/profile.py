"""`infeng profile`: per-stage and per-op time of a real run, a Chrome trace, activation dumps and
a diff against the numpy reference."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from infeng.bench import profile as P
from infeng.errors import InfengError
from infeng.model.activations import diff_reference
from infeng.model.loader import load_model
from infeng.runtime.tokenizer import Tokenizer
from infeng.telemetry import Run, stderr_console


def profile(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="native .infeng file or Hugging Face folder"),
    prompt: str = typer.Option("Once upon a time", "--prompt", "-p", help="prompt text"),
    max_tokens: int = typer.Option(32, "-n", "--max-tokens", help="tokens to generate (greedy)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="compute threads [default: physical cores]"),
    trace: Optional[Path] = typer.Option(None, "--trace", help="write a Chrome trace JSON (Perfetto, chrome://tracing)"),
    telemetry: Optional[Path] = typer.Option(None, "--telemetry", help="write the figures (.json or .csv)"),
    dump: Optional[Path] = typer.Option(None, "--dump-activations", help="write every layer's op outputs for the prompt (.npy) here"),
    diff_ref: bool = typer.Option(False, "--diff-reference", help="compare the C pass with the numpy reference on the prompt"),
    tol: float = typer.Option(1e-3, "--tol", help="relative tolerance for --diff-reference"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip checksum verification at load"),
):
    """Where the time of a run goes (stages, ops per layer, CPU use), and where the C forward pass
    first departs from the numpy reference (exit 3 when it does)."""
    if max_tokens < 1:
        raise InfengError(f"--max-tokens must be >= 1, got {max_tokens}")
    if threads is not None and threads < 1:
        raise InfengError(f"--threads must be >= 1, got {threads}")
    if trace is not None and trace.suffix.lower() != ".json":
        raise InfengError(f"--trace {trace}: suffix must be .json")
    if telemetry is not None and telemetry.suffix.lower() not in (".json", ".csv"):
        raise InfengError(f"--telemetry {telemetry}: suffix must be .json or .csv")
    for out in (trace, telemetry):
        if out is not None and not out.parent.is_dir():
            raise InfengError(f"{out.parent}: no such directory (for {out.name})")
    if not tol > 0:
        raise InfengError(f"--tol must be > 0, got {tol}")

    console = stderr_console()
    model = load_model(model_path, verify=not no_verify)
    with console.status("profiling"):
        prof = P.profile_run(model, prompt, max_tokens, threads=threads, label=str(model_path))
    run = Run("profile", meta={"model": str(model_path), "isa": prof.isa, "threads": prof.threads,
                               "weight_dtype": model.weight_dtype, "prompt": prompt})
    run.metrics.update(prof.metrics())

    st = Table(title=f"infeng profile · {model_path.name} · {prof.threads} threads · {prof.isa}", header_style="bold")
    for col in ("stage", "wall ms", "CPU ms", "% of wall"):
        st.add_column(col, justify="left" if col == "stage" else "right")
    for name, (w, c) in prof.stages().items():
        st.add_row(name, f"{w * 1e3:.2f}", f"{c * 1e3:.2f}", f"{100 * w / prof.wall_s:.1f}")
    st.add_row("total", f"{prof.wall_s * 1e3:.2f}", f"{prof.cpu_s * 1e3:.2f}", "100.0")
    console.print(st)
    console.print(f"CPU utilisation: {run.metrics['cpu_utilisation']:.0%} of {prof.threads} threads over the run, "
                  f"{run.metrics['forward_cpu_utilisation']:.0%} inside the C forward pass; per thread (s): "
                  + ", ".join(f"{s:.2f}" for _, s in sorted(prof.thread_cpu_s.items())))
    ops = prof.op_seconds()
    fwd = sum(ops.values()) or 1.0
    ot = Table(title="C forward pass by op (all steps and layers)", header_style="bold")
    for col in ("op", "family", "ms", "% of forward"):
        ot.add_column(col, justify="left" if col in ("op", "family") else "right")
    for op, s in sorted(ops.items(), key=lambda kv: -kv[1]):
        ot.add_row(op, P.FAMILY[op], f"{s * 1e3:.2f}", f"{100 * s / fwd:.1f}")
    console.print(ot)
    if trace is not None:
        P.write_json_atomic(trace, P.chrome_trace(prof))
        console.print(f"trace: {trace} (open in https://ui.perfetto.dev or chrome://tracing)")

    if dump is not None or diff_ref:
        ids = Tokenizer(model.tokenizer, model.config.bos_id, model.config.eos_ids).encode(prompt)
        acts = P.dump_activations(model, ids, threads=threads)
        if dump is not None:
            files = acts.save(dump)
            console.print(f"activations: {len(files)} files in {dump}")
            run.meta["activations_dir"] = str(dump)
        if diff_ref:
            d = diff_reference(acts, model, tol)
            console.print(("[green]" if d.agree else "[red]") + d.message())
            run.metrics["diff_max_layer_rel_err"] = max((x["rel_err"] for x in d.layers), default=0.0)
            run.metrics["diff_logits_rel_err"] = d.logits_err
            run.meta["diff"] = {"agree": d.agree, "first_layer": d.first_layer, "first_op": d.first_op,
                                "message": d.message()}
            run.records.extend({"layer": x["layer"], "residual_rel_err": x["rel_err"]} for x in d.layers)
    if telemetry is not None:
        run.write(telemetry)
    if run.meta.get("diff") and not run.meta["diff"]["agree"]:
        raise typer.Exit(3)       # like `eval --baseline`: a disagreement is a failing check


def register(app: typer.Typer) -> None:
    app.command("profile")(profile)
