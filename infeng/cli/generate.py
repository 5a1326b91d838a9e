"""`infeng generate`: one prompt streamed to stdout, or a JSONL batch job."""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from infeng.errors import InfengError
from infeng.jobs import BatchJob, Interrupted, run_batch_job
from infeng.model.loader import load_model
from infeng.runtime.batch import metrics
from infeng.runtime.engine import Engine, Request
from infeng.runtime.kvspec import kv_options
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.speculate import parse_speculate
from infeng.runtime.tokenizer import Tokenizer
from infeng.runtime.types import FinishEvent
from infeng.telemetry import Run


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
    batch: Optional[str] = typer.Option(None, "--batch", help="JSONL file of requests (or a glob pattern of several)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSONL results file (a directory for several inputs)"),
    restart: bool = typer.Option(False, "--restart", help="ignore the journal of an interrupted run and start over"),
    window: Optional[int] = typer.Option(None, "--window", help="requests read and queued at once [default: 8 x --max-batch, at least 64]"),
    ray: Optional[str] = typer.Option(None, "--ray", help="run on a Ray cluster: its ADDRESS, or 'auto' (extra infeng[ray])"),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="engine actors on Ray [default: the cluster's CPUs / --ray-cpus]"),
    ray_cpus: Optional[int] = typer.Option(None, "--ray-cpus", help="CPUs (= engine threads) each Ray worker owns [default: 1]"),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="lines handed to a Ray worker at a time [default: 256]"),
    ray_ship: bool = typer.Option(False, "--ray-ship", help="send the model and adapters to the Ray workers (no shared path)"),
    max_batch: int = typer.Option(8, "--max-batch", help="sequences run together in one forward pass"),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="context length per sequence [default: the model's, at most 4096]"),
    telemetry: Optional[Path] = typer.Option(None, "--telemetry", help="write telemetry (.json or .csv)"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip checksum verification at load"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="a LoRA/DoRA adapter file (.infeng-lora) for the prompt / every request"),
    adapters_dir: Optional[Path] = typer.Option(None, "--adapters-dir", help="load every *.infeng-lora here; batch lines name one with \"adapter\""),
    speculate: Optional[str] = typer.Option(None, "--speculate", help="speculative decoding: lookup (prompt lookup), auto (adaptive; the --draft model if given) or a draft length N"),
    draft: Optional[Path] = typer.Option(None, "--draft", help="a draft model with the same tokenizer (e.g. a lower-bit copy) for --speculate auto|N"),
    kv_dtype: str = typer.Option("f32", "--kv-dtype", help="KV cache type: f32, bf16, f16, int8, fp8, int4, or k=TYPE,v=TYPE"),
    kv_policy: Optional[str] = typer.Option(None, "--kv-policy", help="per-layer KV types, e.g. 'layers 0,1,-1: bf16'"),
    kv_rotate: str = typer.Option("auto", "--kv-rotate", help="Hadamard rotation of keys: auto (int8/fp8/int4 keys, power-of-two head_dim), on, off"),
):
    """Generate text from a prompt, or run a batch of requests."""

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
    if telemetry is not None and not telemetry.parent.is_dir():
        raise InfengError(f"{telemetry.parent}: no such directory (for {telemetry.name})")
    if batch is None and (restart or window is not None or ray is not None):
        raise InfengError("--restart, --window and --ray go with --batch")
    if ray is None and (ray_workers is not None or ray_cpus is not None or shard_size is not None or ray_ship):
        raise InfengError("--ray-workers, --ray-cpus, --shard-size and --ray-ship go with --ray")
    if adapters_dir is not None and not adapters_dir.is_dir():
        raise InfengError(f"{adapters_dir}: no such directory")
    if draft is not None and speculate is None:
        raise InfengError("--draft goes with --speculate auto|N")
    if speculate is not None and ray is not None:
        raise InfengError("--speculate does not run on Ray workers (--ray): drop one of them")
    t_load = time.perf_counter()
    model = load_model(model_path, verify=not no_verify)
    spec = parse_speculate(speculate, load_model(draft, verify=not no_verify) if draft else None) if speculate else None
    given = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                 ignore_eos=ignore_eos)
    defaults = SamplingParams.with_model_defaults(model.generation, **given).validated(names=OPTION_NAMES)
    if batch is not None:
        # the job picks the seed of unseeded lines: a resumed job keeps the interrupted one's
        job = BatchJob(model_path, batch, output, defaults if seed is not None else replace(defaults, seed=None),
                       threads=threads, max_batch=max_batch, ctx=ctx, verify=not no_verify, adapter=adapter,
                       adapters_dir=adapters_dir, restart=restart, window=window, ray=ray,
                       ray_workers=ray_workers, ray_cpus=ray_cpus or 1, shard_size=shard_size or 256, ray_ship=ray_ship,
                       model=model, speculate=spec, kv=kv_options(kv_dtype, kv_policy, kv_rotate))
        try:
            meta, figures = run_batch_job(job)
        except Interrupted as e:
            print(f"infeng: {e}", file=sys.stderr)
            raise typer.Exit(130) from None
        run = Run("generate", meta=meta, metrics=figures)
        run.print_summary()
        if telemetry:
            run.write(telemetry)
        return
    tok = Tokenizer(model.tokenizer, model.config.bos_id, model.config.eos_ids)
    engine = Engine(model, threads=threads, max_batch=1, max_seq_len=ctx, tokenizer=tok, speculate=spec,
                    **kv_options(kv_dtype, kv_policy, kv_rotate))
    default_adapter = None
    for f in sorted(adapters_dir.glob("*.infeng-lora")) if adapters_dir is not None else []:
        engine.load_adapter(f, f.name[:-len(".infeng-lora")])
    if adapter is not None:
        default_adapter = engine.load_adapter(adapter).name
    load_s = time.perf_counter() - t_load
    run = Run("generate", meta={"model": str(model_path), "isa": engine.isa, "threads": engine.threads,
                                "weight_dtype": model.weight_dtype, "max_batch": engine.max_batch,
                                "kv_dtype": engine.kv.spec.describe()})
    t0 = time.perf_counter()
    results = _single(engine, Request(id="prompt", prompt=prompt, params=defaults, adapter=default_adapter),
                      prompt, echo)
    if results and results[0].finish_reason:
        run.records.append({"id": "prompt", "finish_reason": results[0].finish_reason,
                            "completion_tokens": len(results[0].token_ids), "seed": results[0].seed})
    run.metrics.update(metrics(engine, results, time.perf_counter() - t0))
    run.metrics["load_s"] = load_s
    run.print_summary()
    if telemetry:
        run.write(telemetry)


OPTION_NAMES = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_k": "--top-k",
                "top_p": "--top-p", "seed": "--seed"}


def _single(engine, req, prompt: str, echo: bool):
    """Stream the prompt (as given) and the completion to stdout as tokens arrive."""
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
