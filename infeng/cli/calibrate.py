"""`infeng calibrate`: run text through a model, write activation statistics for `quantize --calibration`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from infeng.bench.profile import dump_activations
from infeng.errors import InfengError
from infeng.evals.perplexity import read_documents
from infeng.model.activations import widths
from infeng.model.loader import load_model
from infeng.quant import calibrate as C
from infeng.runtime.tokenizer import Tokenizer
from infeng.telemetry import Run, progress, stderr_console


def calibrate(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="native .infeng file or Hugging Face folder (the model you will quantize)"),
    text: Path = typer.Option(..., "--text", help="calibration text (UTF-8); use other text than you evaluate on"),
    output: Path = typer.Option(..., "-o", "--output", help="statistics to write (.json); the activation sample goes beside it (.samples.npz)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="use at most N tokens of the text [default: all]"),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="window length in tokens [default: the model's, at most 512]"),
    samples: int = typer.Option(512, "--samples", help="first N tokens whose activations are kept for the scale search"),
    separator: str = typer.Option("<|endoftext|>", "--separator", help="document separator in the text (each document starts from BOS)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="compute threads [default: physical cores]"),
    telemetry: Optional[Path] = typer.Option(None, "--telemetry", help="write telemetry (.json or .csv)"),
):
    """Record per-channel activation statistics of every linear layer's input (for calibrated quantization)."""
    for name, v, lo in (("--max-tokens", max_tokens, 1), ("--ctx", ctx, 1), ("--threads", threads, 1),
                        ("--samples", samples, 1)):
        if v is not None and v < lo:
            raise InfengError(f"{name} must be >= {lo}, got {v}")
    if output.suffix.lower() != ".json":
        raise InfengError(f"-o {output}: suffix must be .json")
    if output.is_dir():
        raise InfengError(f"{output}: is a directory")
    if not output.parent.is_dir():
        raise InfengError(f"{output.parent}: no such directory (for {output.name})")
    if telemetry is not None and telemetry.suffix.lower() not in (".json", ".csv"):
        raise InfengError(f"--telemetry {telemetry}: suffix must be .json or .csv")
    run = Run("calibrate", meta={"model": str(model_path), "text": str(text), "output": str(output)})
    t0 = time.perf_counter()
    docs = read_documents(text, separator)
    with run.span("read"):
        model = load_model(model_path)
    c = model.config
    tok = Tokenizer(model.tokenizer, c.bos_id, c.eos_ids)
    docs_ids = [tok.encode(d) for d in docs]
    window = ctx if ctx is not None else C.default_ctx(c, sum(widths(c).values()))
    n_tok = min(sum(map(len, docs_ids)), max_tokens or 1 << 62)
    with progress("calibrating") as bar, run.span("forward"):
        task = bar.add_task("calibrate", total=n_tok)
        stats, smp, n_win = C.collect(model, docs_ids, window, lambda ids: dump_activations(model, ids, threads=threads),
                                      max_tokens, samples, progress=lambda n: bar.advance(task, n))
    doc = C.build(model, stats, n_win, {"path": str(text), "sha256": C.sha256_file(text),
                                        "documents": len(docs), "separator": separator}, window)
    with run.span("write"):
        npz = C.write(doc, smp, output)
    run.meta.update({"ctx": window, "samples_file": str(npz)})
    run.metrics.update({"tokens": n_tok, "windows": n_win, "layers": c.n_layers,
                        "sample_rows": int(smp["positions"].shape[0]),
                        "seconds": time.perf_counter() - t0})
    run.records = [{"layer": l, "input": name, "channels": e["channels"], "absmax": e["percentiles"]["max"],
                    "p99_9": e["clip"], "mean_abs": sum(e["mean_abs"]) / e["channels"],
                    "max_channel_ratio": max(e["absmax"]) / max(sorted(e["absmax"])[len(e["absmax"]) // 2], 1e-30)}
                   for l, layer in enumerate(doc["layers"] + [{C.OUTPUT_INPUT: doc["output"]}]) for name, e in layer.items()]
    _print(run, output, npz)
    if telemetry:
        run.write(telemetry)


def _print(run, output: Path, npz: Path) -> None:
    t = Table(title=f"activation statistics → {output}", header_style="bold")
    for col in ("input", "layers", "max |x|", "p99.9 |x|", "max channel / median channel"):
        t.add_column(col, justify="left" if col == "input" else "right")
    by: dict[str, list[dict]] = {}
    for r in run.records:
        by.setdefault(r["input"], []).append(r)
    for name, rs in by.items():
        t.add_row(name, str(len(rs)), f"{max(r['absmax'] for r in rs):.3g}", f"{max(r['p99_9'] for r in rs):.3g}",
                  f"{max(r['max_channel_ratio'] for r in rs):.1f}")
    con = stderr_console()
    con.print(t)
    m = run.metrics
    con.print(f"{m['tokens']:,} tokens in {m['windows']} windows of {run.meta['ctx']}, "
              f"{m['sample_rows']} sampled rows per input → {npz.name}, {m['seconds']:.1f} s")


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
