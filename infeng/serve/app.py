"""The FastAPI application: OpenAI routes over one EngineLoop.

Handlers parse and check a body (protocol.py), admit it or answer 429, submit one engine request
per choice and turn the engine's events into a JSON body or a server-sent event stream. A client
that goes away has its sequences cancelled at once (their KV blocks are freed at the next step).
"""
from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

try:    # the serve extra; infeng.serve.require() names it when missing
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:
    pass

from infeng.errors import InfengError
from infeng.runtime.engine import Engine
from infeng.runtime.sampler import SamplingParams
from infeng.serve.adapters import load_adapter, unload_adapter
from infeng.serve.grammar import Grammars
from infeng.serve.gate import Gate, error_response, read_json
from infeng.serve.completion import generate_call
from infeng.serve.loop import EngineLoop, on_own_thread
from infeng.serve.metrics import Metrics, settings
from infeng.serve.scoring import PromptScorer
from infeng.serve.tokenize import detokenize, tokenize, tokenizer_info
from infeng.serve.protocol import ApiError, Limits, Pieces, now, too_many

log = logging.getLogger("infeng.serve")


@dataclass
class ServeConfig:
    base_name: str
    adapters_dir: Path | None = None
    api_keys: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    max_queue: int = 64                 # requests admitted beyond the running batch
    max_queued_tokens: int | None = None
    retry_after_s: int = 1
    request_timeout_s: float | None = None


class Admission:
    """Bounded queue in front of the engine: requests (choices) outstanding and prompt tokens not
    yet prefilled. Past either bound a request is refused (429) at once instead of waiting."""

    def __init__(self, max_requests: int, max_tokens: int | None):
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self.requests = self.tokens = 0

    def admit(self, n: int, tokens: int) -> str | None:
        if self.requests + n > self.max_requests:
            return f"the server is at its limit of {self.max_requests} outstanding requests"
        if self.max_tokens is not None and self.tokens + tokens > self.max_tokens:
            return f"the server's queue is at its limit of {self.max_tokens} prompt tokens"
        self.requests += n
        self.tokens += tokens
        return None


class Server:
    """State shared by the handlers (all on the asyncio thread). The engine is attached once it
    has loaded; until then only /health, /ready (503) and /metrics answer (gate.py)."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.loop: EngineLoop | None = None
        self.load_error: BaseException | None = None
        self.unloading: set[str] = set()
        self.draining = False
        self.created = now()
        self._n = 0

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    def attach(self, engine: Engine) -> None:
        """The loaded engine: its tokenizer, models, admission bounds; its thread starts."""
        cfg = self.cfg
        self.defaults = SamplingParams.with_model_defaults(engine.model.generation)
        self.tok = engine.tokenizer
        self.metrics.loads = len(engine.adapters.loaded)      # those loaded at start count too
        self.metrics.adapter_loads.set(self.metrics.loads)
        self.metrics.describe(engine)
        self.settings = settings(engine)
        self.models = {cfg.base_name} | set(engine.adapters.loaded)
        self.admission = Admission(engine.max_batch + cfg.max_queue, cfg.max_queued_tokens)
        self.pieces = Pieces(self.tok)
        self.prompt_scorer = PromptScorer()
        self.grammars = Grammars(engine.model.tokenizer["json"], engine.cfg.vocab_size, self.tok.eos_ids)
        self.loop = EngineLoop(engine, asyncio.get_running_loop(), self.metrics.engine_step)
        self.loop.start()
        self.engine = engine

    def refuse_at_once(self) -> ApiError | None:
        """503 while draining, 429 when not one more sequence fits: decided before the body is
        read or parsed, so under overload a refusal costs no parsing, tokenizing or routing."""
        if self.draining:
            return ApiError(503, "the server is shutting down")
        a = self.admission
        if a.requests >= a.max_requests:
            self.metrics.rejected.labels("queue").inc()
            return too_many(f"the server is at its limit of {a.max_requests} outstanding requests", self.cfg.retry_after_s)
        return None

    def request_id(self) -> str:
        self._n += 1
        return f"{self._n}-{uuid.uuid4().hex[:12]}"


def create_app(srv: Server, load: Callable[[], Engine], on_load_error: Callable[[], None]) -> FastAPI:
    """The app; ``load()`` builds the engine on a thread of its own while the server already
    answers /health and /ready, and ``on_load_error`` stops the server when it fails."""
    async def lifespan(app):
        async def loading():
            try:
                srv.attach(await on_own_thread(load))
                print(f"infeng serve: ready (model {srv.cfg.base_name!r}, {len(srv.engine.adapters.loaded)} adapter(s))",
                      file=sys.stderr, flush=True)
            except Exception as e:       # InfengError: the one line the CLI prints; others: a bug, logged
                srv.load_error = e
                if not isinstance(e, InfengError):
                    log.exception("loading the model failed")
                on_load_error()
        task = asyncio.create_task(loading())
        yield
        task.cancel()
        if srv.loop is not None:
            srv.loop.stop()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_req, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, e: StarletteHTTPException):      # unknown path, wrong method
        return error_response(ApiError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _bug(_req, e: Exception):
        log.exception("request failed")
        return error_response(ApiError(500, f"internal error ({type(e).__name__})"))

    @app.get("/health")
    async def health():     # alive: loading counts, a dead engine thread does not
        if not srv.loaded:
            return JSONResponse({"status": "loading"})
        ok = srv.loop.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/ready")
    async def ready():
        if not srv.loaded:
            return JSONResponse({"status": "loading"}, status_code=503)
        if srv.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        ok = srv.loop is not None and srv.loop.alive
        return JSONResponse({"status": "ready" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(srv.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        data = [{"id": srv.cfg.base_name, "object": "model", "created": srv.created, "owned_by": "infeng",
                 "root": srv.cfg.base_name, "parent": None, "max_model_len": srv.engine.max_seq_len, **srv.settings}]
        data += [{"id": a, "object": "model", "created": srv.created, "owned_by": "infeng", "root": a,
                  "parent": srv.cfg.base_name} for a in sorted(srv.models - {srv.cfg.base_name})]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(req: HttpRequest):
        return await generate_call(srv, "completions", req)

    @app.post("/v1/chat/completions")
    async def chat(req: HttpRequest):
        return await generate_call(srv, "chat", req)

    @app.post("/tokenize")
    async def tokenize_route(req: HttpRequest):
        body = await read_json(req, srv.cfg.limits.max_body_bytes)
        return tokenize(body, srv.tok, srv.engine.max_seq_len, srv.cfg.limits, srv.models)

    @app.post("/detokenize")
    async def detokenize_route(req: HttpRequest):
        return detokenize(await read_json(req, srv.cfg.limits.max_body_bytes), srv.tok, srv.models)

    @app.get("/tokenizer_info")
    async def tokenizer_info_route():
        return tokenizer_info(srv.tok, srv.engine.max_seq_len)

    @app.post("/v1/load_lora_adapter")
    async def load_lora(req: HttpRequest):
        return await load_adapter(srv, await read_json(req, srv.cfg.limits.max_body_bytes))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(req: HttpRequest):
        return await unload_adapter(srv, await read_json(req, srv.cfg.limits.max_body_bytes))

    return Gate(app, srv)
