"""`infeng quantize`: native (or HF) f32/bf16/f16 model → q8_0 / q4_0 / q5_0 / q4_k / fp8 native model."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from infeng import format as native
from infeng.errors import InfengError
from infeng.model.loader import Model, load_model
from infeng.quant import awq, policy as q
from infeng.quant.calibrated import calibrated_tensors
from infeng.telemetry import Run, progress, stderr_console


def quantize(
    src: Path = typer.Argument(..., help="model to quantize (.infeng file or Hugging Face folder), f32/bf16/f16"),
    output: Path = typer.Option(..., "-o", "--output", help="native file to write (.infeng)"),
    qtype: str = typer.Option(..., "--type", help="type of the matrices: q8_0, q4_0, q5_0, q4_1, q5_1, q4_k, fp8 (or bf16, f16, f32)"),
    policy: Optional[Path] = typer.Option(None, "--policy", help="YAML: per-tensor-pattern types and the fallback type"),
    telemetry: Optional[Path] = typer.Option(None, "--telemetry", help="write telemetry (.json or .csv)"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="statistics from `infeng calibrate` of this model: calibrated rounding (GPTQ) or scaling (AWQ)"),
    calibration_method: str = typer.Option("auto", "--calibration-method", help="auto | gptq | awq [auto: gptq where the type has a grid (q4_0, q5_0, q8_0), else awq]"),
):
    """Quantize a model's weight matrices (GGUF-compatible q8_0 / q4_0 / q5_0 / q4_k blocks, or fp8 E4M3)."""
    run = Run("quantize", meta={"source": str(src), "output": str(output), "type": qtype,
                                "policy": str(policy) if policy else None})
    t0 = time.perf_counter()
    q.check_type(qtype, "--type")
    if calibration_method != "auto" and calibration is None:
        raise InfengError("--calibration-method needs --calibration (statistics from `infeng calibrate`)")
    pol = q.load_policy(policy) if policy else q.Policy()
    if output.exists() and output.is_dir():
        raise InfengError(f"{output}: is a directory")
    if not output.parent.is_dir():
        raise InfengError(f"{output.parent}: no such directory")
    if output.resolve() == src.resolve():
        raise InfengError(f"{output}: is the source model; write to another file")
    with run.span("read"):
        model = load_model(src)
    items = q.plan(model.tensors, qtype, pol, source=str(src))
    total = sum(math.prod(it.shape) for it in items)
    if calibration:
        cal = calibrated_tensors(calibration, model, items, qtype, pol, src, calibration_method, run)
        src_tensors, items, importance, entry = cal.tensors, cal.items, cal.importance, cal.lineage
        if cal.errors is not None:
            _print_gptq(cal.errors)
        else:
            _print_awq(cal.choices, cal.calibration)
    else:
        src_tensors, importance, entry = model.tensors, {}, None
    with progress("quantizing") as bar, run.span("quantize"):
        task = bar.add_task("quantize", total=total)
        if calibration:
            tensors = awq.quantize_tensors(src_tensors, items, importance, progress=lambda name, n: bar.advance(task, n))
        else:
            tensors = q.quantize_tensors(model.tensors, items, progress=lambda name, n: bar.advance(task, n))
    out = model.derived(tensors) if entry is None else Model(
        model.config, tensors, model.tokenizer, model.generation, source=model.source, lineage=model.lineage + (entry,))
    nt = out.native_tensors()
    with progress("writing") as bar, run.span("write"):
        task = bar.add_task("write", total=sum(t.data.nbytes for t in nt))
        native.write(output, out.manifest(), nt, progress=lambda name, n: bar.advance(task, n))
    rows, totals = q.summary(items)
    size = output.stat().st_size
    run.records = [{"tensor": it.name, "shape": list(it.shape), "source_dtype": it.src, "dtype": it.dtype,
                    "rule": it.rule, "fallback": it.fallback} for it in items]
    run.metrics.update({"tensors": len(items), "fallbacks": sum(it.fallback for it in items),
                        "params": total, "bits_per_weight": totals["bits_per_weight"],
                        "bits_per_weight_matrices": totals["bits_per_weight_matrices"],
                        "file_mb": size / 2**20, "source_mb": _size_mb(src), "seconds": time.perf_counter() - t0})
    _print(rows, items, run, src, output, pol)
    if telemetry:
        run.write(telemetry)


def _size_mb(p: Path) -> float:
    if p.is_file():
        return p.stat().st_size / 2**20
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) / 2**20


def _print(rows, items, run: Run, src: Path, output: Path, pol: q.Policy) -> None:
    t = Table(title=f"quantized {src} → {output}", header_style="bold")
    for c in ("type", "tensors", "params", "bits/weight", "fallbacks"):
        t.add_column(c, justify="left" if c == "type" else "right")
    for r in sorted(rows, key=lambda r: -r["params"]):
        t.add_row(r["type"], str(r["tensors"]), f"{r['params']:,}", f"{q.BITS[r['type']]:.2f}",
                  str(r["fallbacks"]) if r["fallbacks"] else "")
    m = run.metrics
    t.add_row("[bold]total", str(m["tensors"]), f"{m['params']:,}", f"{m['bits_per_weight']:.2f}",
              str(m["fallbacks"]) if m["fallbacks"] else "")
    con = stderr_console()
    con.print(t)
    groups: dict[tuple, list[str]] = {}
    for it in items:
        if it.fallback:
            groups.setdefault((it.want, it.dtype, it.shape[-1]), []).append(it.name)
    for (want, got, k), names in groups.items():
        shown = ", ".join(names[:6]) + (", …" if len(names) > 6 else "")
        con.print(f"fallback to {got} ({want} needs rows that are a multiple of {native.BLOCKS[want][0]}, "
                  f"these have {k}): {shown}")
    con.print(f"file {m['file_mb']:.2f} MiB (source {m['source_mb']:.2f} MiB), "
              f"{m['bits_per_weight_matrices']:.2f} bits/weight over the matrices, {m['seconds']:.1f} s")


def _print_gptq(errors: dict[str, tuple[float, float]]) -> None:
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
    app.command("quantize")(quantize)
