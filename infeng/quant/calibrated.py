"""Calibrated quantization (`infeng quantize --calibration`): statistics from `infeng calibrate`
turned into GPTQ-rounded or AWQ-scaled tensors for the ordinary quantizer to store."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infeng.errors import InfengError
from infeng.quant import awq, calibrate as C, gptq as G, policy as q
from infeng.telemetry import Run, progress

METHODS = ("auto", "gptq", "awq")


@dataclass
class Calibrated:
    """What `quantize --calibration` stores: the tensors the calibrated method transformed, their
    storage plan, the per-matrix importance (for quantizers that take it) and the lineage entry;
    with what the method found, for the summary: gptq's errors or awq's scale choices."""
    tensors: dict[str, tuple[str, np.ndarray]]
    items: list
    importance: dict
    lineage: str
    method: str
    calibration: C.Calibration
    errors: dict[str, tuple[float, float]] | None = None
    choices: list | None = None


def calibrated_tensors(path: Path, model, items, qtype: str, pol, src: Path, method: str, run: Run) -> Calibrated:
    """The model's tensors through the calibrated method (then stored by the ordinary quantizer).
    ``auto``: gptq when every block type in use has a gptq grid (q4_0, q5_0, q8_0), else awq
    (format-agnostic)."""
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
    errors, choices = None, None
    if method == "gptq":
        todo = G.targets(model, items)
        with progress("gptq") as bar, run.span("calibrate"):
            task = bar.add_task("gptq", total=len(todo))
            tensors, errors = G.apply(model, items, cal, progress=lambda name: bar.advance(task, 1))
        params = {"damp": G.DAMP, "rel_error": {n: [round(a, 6), round(b, 6)] for n, (a, b) in errors.items()}}
        run.metrics.update({"calibrated_matrices": len(errors),
                            "calib_rel_error_rtn": float(sum(a for a, _ in errors.values()) / len(errors)),
                            "calib_rel_error": float(sum(b for _, b in errors.values()) / len(errors))})
    else:
        n = model.config.n_layers * len(awq.ORDER)
        with progress("scale search") as bar, run.span("calibrate"):
            task = bar.add_task("search", total=n)
            tensors, choices, importance = awq.apply(model, items, cal, progress=lambda l, name: bar.advance(task, 1))
        params = awq.lineage_params(choices)
        done = [c for c in choices if c.alpha is not None]
        run.metrics.update({"calibrated_inputs": len(done), "skipped_inputs": len(choices) - len(done),
                            "calib_loss_rtn": sum(c.loss_rtn for c in done), "calib_loss": sum(c.loss for c in done)})
        run.meta["calibration_choices"] = [{"layer": c.layer, "input": c.input, "alpha": c.alpha, "loss_rtn": c.loss_rtn,
                                            "loss": c.loss, "note": c.note} for c in choices]
    items = q.plan(tensors, qtype, pol, source=str(src))
    return Calibrated(tensors, items, importance, C.lineage_entry(cal, method, params), method, cal, errors, choices)
