"""`infeng generate`: one prompt streamed to stdout, or a JSONL batch job."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from infeng.errors import InfengError
from infeng.telemetry import Run, progress, write_text_atomic


def generate(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="native .infeng file or Hugging Face folder"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="prompt text ('' starts from BOS alone)"),
    max_tokens: Optional[int] = typer.Option(None, "-n", "--max-tokens", help="tokens to generate [default: 256]"),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="0 = greedy [default: the model's, else 0.8]"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="keep the k most likely tokens (0 = off)"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="nucleus sampling mass in (0, 1] (1 = off)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed (same seed, same output)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="compute threads [default: physical cores]"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="keep generating past end-of-sequence (benchmarks)"),
    echo: bool = typer.Option(True, "--echo/--no-echo", help="print the prompt before the completion"),
    batch: Optional[Path] = typer.Option(None, "--batch", help="JSONL file of requests"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSONL results file (with --batch)"),
    max_batch: int = typer.Option(8, "--max-batch", help="sequences run together in one forward pass"),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="context length per sequence [default: the model's, at most 4096]"),
    telemetry: Optional[Path] = typer.Option(None, "--telemetry", help="write telemetry (.json or .csv)"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip checksum verification at load"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="a LoRA/DoRA adapter file (.infeng-lora) for the prompt / every request"),
    adapters_dir: Optional[Path] = typer.Option(None, "--adapters-dir", help="load every *.infeng-lora here; batch lines name one with \"adapter\""),
):
    """Generate text from a prompt, or run a batch of requests."""
    from infeng.model.loader import load_model
    from infeng.runtime.batch import metrics, read_requests, run_batch
    from infeng.runtime.engine import Engine, Request
    from infeng.runtime.sampler import SamplingParams
    from infeng.runtime.tokenizer import Tokenizer

    if batch is None and prompt is None:
        raise InfengError("give --prompt TEXT or --batch FILE.jsonl")
    if batch is not None and prompt is not None:
        raise InfengError("--prompt and --batch cannot be used together")
    if batch is not None and output is None:
        raise InfengError("--batch needs --output FILE.jsonl for the results")
    if threads is not None and threads < 1:
        raise InfengError(f"--threads must be >= 1, got {threads}")
    if max_batch < 1:
        raise InfengError(f"--max-batch must be >= 1, got {max_batch}")
    if telemetry is not None and telemetry.suffix.lower() not in (".json", ".csv"):
        raise InfengError(f"--telemetry {telemetry}: suffix must be .json or .csv")
    for out in (output, telemetry):
        if out is not None and not out.parent.is_dir():
            raise InfengError(f"{out.parent}: no such directory (for {out.name})")

    if adapters_dir is not None and not adapters_dir.is_dir():
        raise InfengError(f"{adapters_dir}: no such directory")
    t_load = time.perf_counter()
    model = load_model(model_path, verify=not no_verify)
    defaults = SamplingParams.with_model_defaults(
        model.generation, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, ignore_eos=ignore_eos).validated(names=OPTION_NAMES)
    tok = Tokenizer(model.tokenizer, model.config.bos_id, model.config.eos_ids)
    items = read_requests(batch, defaults, tok) if batch is not None else None
    n_req = len(items) if items is not None else 1
    # a batch needs each completion's text once, at the end; only a streamed prompt needs it per token
    engine = Engine(model, threads=threads, max_batch=min(max_batch, max(n_req, 1)), max_seq_len=ctx,
                    tokenizer=tok, detokenize=batch is None)
    default_adapter = None
    for f in sorted(adapters_dir.glob("*.infeng-lora")) if adapters_dir is not None else []:
        engine.load_adapter(f, f.name[:-len(".infeng-lora")])
    if adapter is not None:
        default_adapter = engine.load_adapter(adapter).name
        for it in items or []:
            if it.request is not None and it.request.adapter is None:
                it.request.adapter = default_adapter
    load_s = time.perf_counter() - t_load
    run = Run("generate", meta={"model": str(model_path), "isa": engine.isa, "threads": engine.threads,
                                "weight_dtype": model.weight_dtype, "max_batch": engine.max_batch})
    t0 = time.perf_counter()
    if batch is None:
        results = _single(engine, Request(id="prompt", prompt=prompt, params=defaults, adapter=default_adapter),
                          prompt, echo)
        if results and results[0].finish_reason:
            run.records.append({"id": "prompt", "finish_reason": results[0].finish_reason,
                                "completion_tokens": len(results[0].token_ids), "seed": results[0].seed})
    else:
        import json
        from rich.progress import MofNCompleteColumn, TimeElapsedColumn
        with progress("generating", MofNCompleteColumn(), TimeElapsedColumn()) as bar:
            task = bar.add_task("batch", total=len(items))
            records, results = run_batch(engine, items, model_path.name, on_done=lambda: bar.advance(task))
        write_text_atomic(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        run.records.extend({"line": it.lineno, "id": it.key, "failed": bool(r.get("error"))}
                           for it, r in zip(items, records))
        run.metrics["failed_requests"] = sum(1 for r in records if r.get("error"))
    run.metrics.update(metrics(engine, results, time.perf_counter() - t0))
    run.metrics["load_s"] = load_s
    run.print_summary()
    if telemetry:
        run.write(telemetry)


OPTION_NAMES = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_k": "--top-k",
                "top_p": "--top-p", "seed": "--seed"}


def _single(engine, req, prompt: str, echo: bool):
    """Stream the prompt (as given) and the completion to stdout as tokens arrive."""
    from infeng.errors import InfengError
    from infeng.runtime.engine import FinishEvent
    out = sys.stdout
    if echo:
        out.write(prompt)
        out.flush()
    results = []
    for ev in engine.stream([req]):
        if isinstance(ev, FinishEvent):
            if ev.result.finish_reason == "rejected":
                raise InfengError(ev.result.error)
            results.append(ev.result)
        elif ev.text:
            out.write(ev.text)
            out.flush()
    out.write("\n")
    out.flush()
    return results


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
