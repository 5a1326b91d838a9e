"""`infeng convert`: Hugging Face Llama folder → native .infeng file."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from infeng import format as native
from infeng.errors import InfengError
from infeng.model.loader import load_model
from infeng.telemetry import Run, progress


def convert(
    src: Optional[Path] = typer.Argument(None, help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json)"),
    output: Path = typer.Option(..., "-o", "--output", help="native file to write (.infeng, or .infeng-lora with --adapter)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="store matrices as f32, bf16 or f16 (default: as in the checkpoint); adapters: f32, bf16 (default) or int8"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="a PEFT LoRA/DoRA folder to convert (needs --base)"),
    base: Optional[Path] = typer.Option(None, "--base", help="the base model the adapter was trained on"),
    telemetry: Optional[Path] = typer.Option(None, "--telemetry", help="write telemetry (.json or .csv)"),
):
    """Convert a Hugging Face checkpoint (or a PEFT adapter) to the engine-native format."""
    from rich.progress import DownloadColumn
    run = Run("convert", meta={"source": str(adapter or src), "output": str(output), "dtype": dtype})
    t0 = time.perf_counter()
    if output.exists() and output.is_dir():
        raise InfengError(f"{output}: is a directory")
    if not output.parent.is_dir():
        raise InfengError(f"{output.parent}: no such directory")
    if adapter is not None:
        if src is not None or base is None:
            raise InfengError("--adapter takes no model folder argument and needs --base MODEL")
        from infeng.model.adapter import convert_peft, load_adapter
        with run.span("convert"):
            base_model = load_model(base)
            a = load_adapter(convert_peft(adapter, output, base_model, dtype or "bf16"), base_model)
        run.meta.update(base=str(base), kind="adapter")
        run.metrics.update({"rank": a.rank, "targets": len(a.targets), "use_dora": int(a.use_dora),
                            "bytes": output.stat().st_size, "seconds": time.perf_counter() - t0})
        run.print_summary(f"converted adapter {adapter} → {output}")
        if telemetry:
            run.write(telemetry)
        return
    if src is None:
        raise InfengError("give a model folder to convert (or --adapter DIR --base MODEL)")
    if not src.is_dir():
        raise InfengError(f"{src}: not a model folder" if src.exists() else f"{src}: no such directory")
    with run.span("read"):
        model = load_model(src, dtype=dtype)
    tensors = model.native_tensors()
    total = sum(t.data.nbytes for t in tensors)
    with progress("converting", DownloadColumn()) as bar, run.span("write"):
        task = bar.add_task("write", total=total)
        native.write(output, model.manifest(), tensors, progress=lambda name, n: bar.advance(task, n))
    run.metrics.update({"tensors": len(tensors), "bytes": output.stat().st_size,
                        "params": sum(int(t.data.size) for t in tensors),
                        "seconds": time.perf_counter() - t0})
    run.meta["weight_dtype"] = model.weight_dtype
    run.print_summary(f"converted {src} → {output}")
    if telemetry:
        run.write(telemetry)


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
