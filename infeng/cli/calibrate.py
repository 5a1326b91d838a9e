"""`infeng calibrate`: run text through a model, write activation statistics for `quantize --calibration`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from infeng.errors import InfengError


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
    from infeng.bench.profile import check_ops, widths
    from infeng import kernels
    from infeng.evals.perplexity import read_documents
    from infeng.model.loader import load_model
    from infeng.quant import calibrate as C
    from infeng.runtime.tokenizer import Tokenizer
    from infeng.telemetry import Run, progress, stderr_console

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
    check_ops(kernels.active())
    window = ctx if ctx is not None else C.default_ctx(c, sum(widths(c).values()))
    n_tok = min(sum(map(len, docs_ids)), max_tokens or 1 << 62)
    with progress("calibrating") as bar, run.span("forward"):
        task = bar.add_task("calibrate", total=n_tok)
        stats, smp, n_win = C.collect(model, docs_ids, window, max_tokens, samples, threads,
                                      progress=lambda n: bar.advance(task, n))
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
    from rich.table import Table
    from infeng.telemetry import stderr_console
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


METHODS = ("auto", "gptq", "awq")


def calibrated_tensors(path: Path, model, items, qtype: str, pol, src: Path, method: str, run):
    """For `infeng quantize --calibration`: the model's tensors transformed by the calibrated
    method (then stored by the ordinary quantizer), their storage plan, the per-matrix importance
    (for quantizers that take it), and the lineage entry. ``auto``: gptq when every block type in
    use has a gptq grid (q4_0, q5_0, q8_0), else awq (format-agnostic)."""
    from infeng.quant import awq, calibrate as C, gptq as G, policy as q
    from infeng.telemetry import progress

    if method not in METHODS:
        raise InfengError(f"--calibration-method: unknown method {method!r} (one of {', '.join(METHODS)})")
    cal = C.load(path)
    C.check_model(cal, model, str(src))
    block = {it.dtype for it in items if awq.is_block(it.dtype)}
    if not block:
        raise InfengError(f"--calibration: no matrix is stored in a block type with --type {qtype} "
                          f"and this policy; calibration only helps block-quantized matrices")
    if method == "auto":
        method = "gptq" if block <= set(G.GRIDS) else "awq"
    if method == "gptq" and not block <= set(G.GRIDS):
        raise InfengError(f"--calibration-method gptq: no gptq grid for {', '.join(sorted(block - set(G.GRIDS)))} "
                          f"(use awq)")
    run.meta.update({"calibration": str(path), "calibration_sha256": cal.sha256, "calibration_method": method})
    importance: dict = {}
    if method == "gptq":
        todo = G.targets(model, items)
        with progress("gptq") as bar, run.span("calibrate"):
            task = bar.add_task("gptq", total=len(todo))
            tensors, errors = G.apply(model, items, cal, progress=lambda name: bar.advance(task, 1))
        params = {"damp": G.DAMP, "rel_error": {n: [round(a, 6), round(b, 6)] for n, (a, b) in errors.items()}}
        _print_gptq(errors)
        run.metrics.update({"calibrated_matrices": len(errors),
                            "calib_rel_error_rtn": float(sum(a for a, _ in errors.values()) / len(errors)),
                            "calib_rel_error": float(sum(b for _, b in errors.values()) / len(errors))})
    else:
        n = model.config.n_layers * len(awq.ORDER)
        with progress("scale search") as bar, run.span("calibrate"):
            task = bar.add_task("search", total=n)
            tensors, choices, importance = awq.apply(model, items, cal, progress=lambda l, name: bar.advance(task, 1))
        params = awq.lineage_params(choices)
        _print_awq(choices, cal)
        done = [c for c in choices if c.alpha is not None]
        run.metrics.update({"calibrated_inputs": len(done), "skipped_inputs": len(choices) - len(done),
                            "calib_loss_rtn": sum(c.loss_rtn for c in done), "calib_loss": sum(c.loss for c in done)})
        run.meta["calibration_choices"] = [{"layer": c.layer, "input": c.input, "alpha": c.alpha, "loss_rtn": c.loss_rtn,
                                            "loss": c.loss, "note": c.note} for c in choices]
    items = q.plan(tensors, qtype, pol, source=str(src))
    return tensors, items, importance, C.lineage_entry(cal, method, params)


def _print_gptq(errors: dict[str, tuple[float, float]]) -> None:
    from rich.table import Table
    from infeng.telemetry import stderr_console
    t = Table(title="gptq: relative output error on the calibration sample", header_style="bold")
    for col in ("matrices", "round-to-nearest", "gptq", "ratio"):
        t.add_column(col, justify="left" if col == "matrices" else "right")
    by: dict[str, list[tuple[float, float]]] = {}
    for name, e in errors.items():
        by.setdefault(name.split(".")[-1], []).append(e)
    for m, es in by.items():
        a, b = sum(e[0] for e in es) / len(es), sum(e[1] for e in es) / len(es)
        t.add_row(m, f"{a:.3e}", f"{b:.3e}", f"{b / a:.3f}" if a else "-")
    stderr_console().print(t)


def _print_awq(choices, cal) -> None:
    from rich.table import Table
    from infeng.quant import awq
    from infeng.telemetry import stderr_console
    t = Table(title=f"activation-aware scales ({awq.METHOD}, {cal.path.name})", header_style="bold")
    for col in ("input", "α per layer", "output error vs round-to-nearest"):
        t.add_column(col, justify="left")
    for name in awq.ORDER:
        cs = [c for c in choices if c.input == name]
        if all(c.alpha is None for c in cs):
            t.add_row(name, "skipped", cs[0].note)
            continue
        a = " ".join("-" if c.alpha is None else f"{c.alpha:.2f}" for c in cs)
        l0, l1 = sum(c.loss_rtn for c in cs), sum(c.loss for c in cs)
        t.add_row(name, a, f"{l1 / l0:.3f}×" if l0 > 0 else "-")
    stderr_console().print(t)


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
