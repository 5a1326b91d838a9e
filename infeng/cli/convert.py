"""`infeng convert`: Hugging Face Llama folder or GGUF file → native .infeng file; native → GGUF."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from infeng import format as native
from infeng.converters import gguf_read, gguf_write
from infeng.errors import InfengError
from infeng.model.adapter import convert_peft, load_adapter
from infeng.model.loader import load_gguf, load_model
from infeng.telemetry import Run, progress


def convert(
    src: Optional[Path] = typer.Argument(None, help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json), "
                                         "a .gguf file, or (with --to gguf) a native .infeng file"),
    output: Path = typer.Option(..., "-o", "--output", help="native file to write (.infeng, or .infeng-lora with --adapter)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="store matrices as f32, bf16 or f16 (default: as in the checkpoint; "
                                        "GGUF Q4_K/Q6_K tensors: the type they are dequantized to, default bf16); adapters: f32, bf16 (default) or int8"),
    to: str = typer.Option("infeng", "--to", help="output format: infeng (native) or gguf (from a native file)"),
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
    if to not in ("infeng", "gguf"):
        raise InfengError(f"--to {to!r}: must be infeng or gguf")
    if to == "gguf":
        return _to_gguf(src, output, dtype, run, telemetry, t0)
    summary = ""
    if src.is_file() and (src.suffix.lower() == ".gguf" or gguf_read.is_gguf(src)):
        with run.span("read"):
            model, info = load_gguf(src, k_quant_dtype=dtype)
        summary = gguf_read.describe(info)
        run.meta.update(gguf={k: v for k, v in info.items()})
    elif not src.is_dir():
        raise InfengError(f"{src}: not a model folder or GGUF file" if src.exists()
                          else f"{src}: no such {'file' if src.suffix.lower() == '.gguf' else 'directory'}")
    else:
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
    run.print_summary(f"converted {src} → {output}{summary}")
    if telemetry:
        run.write(telemetry)


def _to_gguf(src: Path, output: Path, dtype: Optional[str], run: Run, telemetry: Optional[Path], t0: float) -> None:
    """Native file → GGUF (tensors keep their type: f32, f16, bf16, q8_0, q4_0, q5_0, q4_1, q5_1)."""
    if dtype is not None:
        raise InfengError("--dtype does not apply to --to gguf (tensors keep their type; use `infeng quantize` first)")
    if not native.is_native(src):
        raise InfengError(f"{src}: --to gguf needs a native .infeng model file" if src.exists() else f"{src}: no such file")
    with run.span("read"):
        model = load_model(src)
    with run.span("write"):
        gguf_write.write_gguf(model, output, name=src.name.removesuffix(".infeng"))
    run.metrics.update({"tensors": len(model.tensors), "bytes": output.stat().st_size, "seconds": time.perf_counter() - t0})
    run.meta["weight_dtype"] = model.weight_dtype
    run.print_summary(f"converted {src} → {output} (GGUF v{gguf_write.GGUF_VERSION}, {model.weight_dtype})")
    if telemetry:
        run.write(telemetry)


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
