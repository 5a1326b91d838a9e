"""`infeng serve`: an OpenAI-compatible HTTP server over the engine."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from infeng.cli import engine_options as opts
from infeng.errors import InfengError
from infeng.model.loader import load_model
from infeng.runtime.engine import Engine
from infeng.serve import require
from infeng.serve.app import ServeConfig
from infeng.serve.protocol import Limits
from infeng.serve.server import serve as run


def serve(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="native .infeng file or Hugging Face folder"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (other hosts reach it only if you widen this)"),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free port, printed at start)"),
    adapters_dir: Optional[Path] = typer.Option(None, "--adapters-dir", help="serve every *.infeng-lora here under its file name; load_lora_adapter reads only from here"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="required Bearer key (also INFENG_API_KEY)"),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="file of accepted keys, one a line"),
    name: Optional[str] = typer.Option(None, "--served-model-name", help="the base model's name in requests [default: the file's stem]"),
    threads: Optional[int] = typer.Option(None, "--threads", help="compute threads [default: physical cores]"),
    max_batch: int = typer.Option(8, "--max-batch", help="sequences run together in one forward pass"),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="context length per sequence [default: the model's, at most 4096]"),
    kv_budget_mb: Optional[float] = typer.Option(None, "--kv-budget-mb", help="KV cache memory bound"),
    max_queue: int = typer.Option(64, "--max-queue", help="requests waiting beyond the running batch; more get 429"),
    max_queued_tokens: Optional[int] = typer.Option(None, "--max-queued-tokens", help="prompt tokens waiting; more get 429"),
    max_tokens: int = typer.Option(4096, "--max-tokens-limit", help="the most max_tokens a request may ask for"),
    max_n: int = typer.Option(8, "--max-n", help="the most choices (n) per request"),
    max_messages: int = typer.Option(256, "--max-messages", help="the most chat messages per request"),
    max_body_kb: int = typer.Option(1024, "--max-body-kb", help="request body size limit"),
    timeout: Optional[float] = typer.Option(None, "--request-timeout", help="seconds a request may take (then 408)"),
    grace: float = typer.Option(30.0, "--grace", help="seconds SIGTERM waits for requests in flight"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip checksum verification at load"),
    speculate: Optional[str] = opts.SPECULATE,
    draft: Optional[Path] = opts.DRAFT,
    kv_dtype: str = opts.KV_DTYPE,
    kv_policy: Optional[str] = opts.KV_POLICY,
    kv_rotate: str = opts.KV_ROTATE,
    log_level: str = typer.Option("info", "--log-level", help="debug|info|warning|error"),
):
    """Serve the model (and its adapters) over an OpenAI-compatible HTTP API."""
    require()
    for opt, v, lo in (("--port", port, 0), ("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0),
                       ("--max-tokens-limit", max_tokens, 1), ("--max-n", max_n, 1), ("--max-messages", max_messages, 1),
                       ("--max-body-kb", max_body_kb, 1)):
        if v < lo:
            raise InfengError(f"{opt} must be >= {lo}, got {v}")
    if port > 65535:
        raise InfengError(f"--port must be <= 65535, got {port}")
    if threads is not None and threads < 1:
        raise InfengError(f"--threads must be >= 1, got {threads}")
    if timeout is not None and not timeout > 0:
        raise InfengError(f"--request-timeout must be > 0, got {timeout}")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise InfengError(f"--log-level must be debug, info, warning or error, got {log_level!r}")
    if adapters_dir is not None and not adapters_dir.is_dir():
        raise InfengError(f"{adapters_dir}: no such directory (--adapters-dir)")
    opts.check_speculate(speculate, draft)
    opts.check_kv(kv_dtype, kv_rotate)
    keys = read_keys(api_key, api_key_file)
    if not model_path.exists():
        raise InfengError(f"{model_path}: no such file or directory")
    base = name or (model_path.name[:-len(".infeng")] if model_path.name.endswith(".infeng") else model_path.name)

    def load() -> Engine:       # on a thread while the server answers /ready with 503
        model = load_model(model_path, verify=not no_verify)
        engine = Engine(model, threads=threads, max_batch=max_batch, max_seq_len=ctx, kv_budget_mb=kv_budget_mb,
                        max_queue=max_queue + max_batch + 1,
                        **opts.engine_kwargs(speculate, draft, kv_dtype, kv_policy, kv_rotate, verify=not no_verify))
        for f in sorted(adapters_dir.glob("*.infeng-lora")) if adapters_dir is not None else []:
            engine.load_adapter(f, f.name[:-len(".infeng-lora")])
        if base in engine.adapters.loaded:
            raise InfengError(f"an adapter is named {base!r} like the base model: rename one (--served-model-name)")
        return engine
    limits = Limits(max_body_bytes=max_body_kb * 1024, max_messages=max_messages, max_tokens=max_tokens, max_n=max_n)
    cfg = ServeConfig(base, adapters_dir, keys, limits, max_queue, max_queued_tokens, request_timeout_s=timeout)
    run(load, cfg, host, port, grace, log_level.lower())


def read_keys(key: str | None, key_file: Path | None) -> tuple[str, ...]:
    """Keys from --api-key, --api-key-file (one a line, # comments) and INFENG_API_KEY."""
    keys = [k for k in (key, os.environ.get("INFENG_API_KEY")) if k]
    if key_file is not None:
        try:
            lines = key_file.read_text().splitlines()
        except OSError as e:
            raise InfengError(f"{key_file}: cannot read ({e.strerror})") from None
        keys += [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
        if not keys:
            raise InfengError(f"{key_file}: no keys in it")
    for k in keys:
        if len(k) < 8 or any(c.isspace() for c in k) or not k.isascii():
            raise InfengError("an API key must be at least 8 ASCII characters without spaces")
    return tuple(keys)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
