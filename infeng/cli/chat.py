"""`infeng chat`: an interactive terminal chat in the model's chat template."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from infeng.cli import engine_options as opts
from infeng.errors import InfengError
from infeng.model.loader import load_model
from infeng.runtime.chat import ChatSession, run_chat
from infeng.runtime.engine import Engine
from infeng.runtime.sampler import SamplingParams

OPTION_NAMES = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_k": "--top-k",
                "top_p": "--top-p", "seed": "--seed"}


def chat(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="native .infeng file or Hugging Face folder"),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="system prompt [default: the template's own]"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="a LoRA/DoRA adapter file (.infeng-lora) to chat with"),
    max_tokens: Optional[int] = typer.Option(None, "-n", "--max-tokens", help="longest reply in tokens [default: 512]"),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="0 = greedy [default: the model's, else 0.8]"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="keep the k most likely tokens (0 = off)"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="nucleus sampling mass in (0, 1] (1 = off)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed (same seed and inputs, same replies)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="compute threads [default: physical cores]"),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="context length of the conversation [default: the model's, at most 4096]"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip checksum verification at load"),
    speculate: Optional[str] = opts.SPECULATE,
    draft: Optional[Path] = opts.DRAFT,
    kv_dtype: str = opts.KV_DTYPE,
    kv_policy: Optional[str] = opts.KV_POLICY,
    kv_rotate: str = opts.KV_ROTATE,
):
    """Chat with a model: type a message, read the streamed reply; /reset, /system TEXT, /quit."""
    if threads is not None and threads < 1:
        raise InfengError(f"--threads must be >= 1, got {threads}")
    if adapter is not None and not adapter.is_file():
        raise InfengError(f"{adapter}: no such file (--adapter)")
    opts.check_speculate(speculate, draft)
    opts.check_kv(kv_dtype, kv_rotate)
    model = load_model(model_path, verify=not no_verify)
    params = SamplingParams.with_model_defaults(
        model.generation, max_tokens=512 if max_tokens is None else max_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed).validated(names=OPTION_NAMES)
    engine = Engine(model, threads=threads, max_batch=1, max_seq_len=ctx,
                    **opts.engine_kwargs(speculate, draft, kv_dtype, kv_policy, kv_rotate, verify=not no_verify))
    name = engine.load_adapter(adapter).name if adapter is not None else None
    try:
        session = ChatSession(engine, params, system=system, adapter=name)
    except InfengError as e:
        raise InfengError(f"{model_path}: {e}") from None
    return run_chat(session)


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
