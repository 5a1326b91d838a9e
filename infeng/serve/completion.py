"""One completion or chat call through the engine: the call's choices submitted as engine requests,
their events turned into a JSON body or a server-sent event stream; a client that goes away has
its sequences cancelled at once (their KV blocks are freed at the next step)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, AsyncIterator

try:    # the serve extra; infeng.serve.require() names it when missing
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError:
    pass

from infeng.runtime.engine import FinishEvent, Request
from infeng.serve.gate import read_json
from infeng.serve.protocol import (FINISH, ApiError, Call, bad, chat_logprobs, completion_logprobs, envelope, now,
                                   parse, too_many, usage)

if TYPE_CHECKING:
    from infeng.serve.app import Server

log = logging.getLogger("infeng.serve")


@dataclass
class Choice:
    index: int
    req: Request
    n_prompt: int
    entries: list = field(default_factory=list)   # (token id, logprobs) when log-probs are asked
    text: list = field(default_factory=list)
    tokens: int = 0
    t_last: float | None = None
    finish: str | None = None
    cached: int = 0


async def _choices(srv: Server, call: Call, rid: str) -> list[Choice]:
    proc = None
    if call.constraint is not None:     # one matcher per choice, copies of one compile
        proc = await srv.grammars.processor(*call.constraint)
    out = []
    for pi, ids in enumerate(call.prompts):
        for j in range(call.n):
            i = pi * call.n + j
            params = call.params if j == 0 else replace(call.params, seed=(call.params.seed + j) % 2**32)
            if proc is not None:
                params = replace(params, logits_processor=proc if i == 0 else proc.copy())
            r = Request(id=f"{rid}#{i}", prompt_ids=ids, params=params, priority=call.priority,
                        deadline_s=srv.cfg.request_timeout_s, adapter=call.adapter)
            out.append(Choice(i, r, len(ids)))
    return out


async def generate_call(srv: Server, kind: str, http: HttpRequest):
    t0 = time.perf_counter()
    if srv.draining:
        raise ApiError(503, "the server is shutting down")
    if srv.loop is None or not srv.loop.alive:
        raise ApiError(503, "the engine has stopped")
    body = await read_json(http, srv.cfg.limits.max_body_bytes)
    call = parse(kind, body, srv.tok, srv.defaults, srv.engine.max_seq_len, srv.cfg.limits,
                 srv.models - srv.unloading, srv.cfg.base_name)
    log = http.scope.setdefault("state", {}).setdefault("log", {})
    log["model"] = call.model
    rid = http.scope["state"]["request_id"]
    n_seqs, n_tokens = call.n * len(call.prompts), call.n * sum(map(len, call.prompts))
    why = srv.admission.admit(n_seqs, n_tokens)
    if why is not None:
        srv.metrics.rejected.labels("queue").inc()
        raise too_many(why, srv.cfg.retry_after_s)
    try:    # engine ids are the server's own: a client-sent request id may repeat
        choices = await _choices(srv, call, srv.request_id())
    except BaseException:
        srv.admission.requests -= n_seqs
        srv.admission.tokens -= n_tokens
        raise
    q: asyncio.Queue = asyncio.Queue()
    for c in choices:
        srv.loop.submit(c.req, q)
    run = _Run(srv, call, choices, q, t0, kind, rid)
    if call.stream:
        return StreamingResponse(run.sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await run.whole(http)


class _Run:
    """One HTTP request's choices in flight: events in, response out; cleans up however it ends."""

    def __init__(self, srv: Server, call: Call, choices: list[Choice], q: asyncio.Queue, t0: float, kind: str, rid: str):
        self.srv, self.call, self.choices, self.q, self.t0, self.kind = srv, call, choices, q, t0, kind
        self.by_id = {c.req.id: c for c in choices}
        self.open = set(self.by_id)
        self.unstarted = set(self.by_id)     # counted in the admission's queued tokens
        self.rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + rid
        self.created = now()
        self.error: ApiError | None = None

    async def next_event(self):
        ev = await self.q.get()
        if ev is None:
            raise ApiError(503, "the engine has stopped")
        c = self.by_id[ev.id]
        m = self.srv.metrics
        t = time.perf_counter()
        if c.req.id in self.unstarted:
            self.unstarted.discard(c.req.id)
            self.srv.admission.tokens -= c.n_prompt
        if isinstance(ev, FinishEvent):
            self._finished(c, ev.result)
            return c, ev
        if c.t_last is None:
            m.ttft.labels(self.call.model).observe(t - self.t0)
        else:
            m.itl.labels(self.call.model).observe(t - c.t_last)
        c.t_last = t
        c.tokens += 1
        c.text.append(ev.text)
        if ev.logprobs is not None:
            c.entries.append((ev.token_id, ev.logprobs))
        return c, ev

    def _finished(self, c: Choice, r) -> None:
        self.open.discard(c.req.id)
        self.srv.admission.requests -= 1
        c.cached = r.cached_tokens
        m = self.srv.metrics
        if r.finish_reason == "rejected":
            msg = r.error or "rejected"
            self.error = self.error or (ApiError(404, msg, "model", "model_not_found") if "is not loaded" in msg
                                        else bad(msg))
            return
        if r.finish_reason == "deadline":
            self.error = self.error or ApiError(408, f"the request took longer than the server's timeout of "
                                                     f"{self.srv.cfg.request_timeout_s} s", code="timeout")
        c.finish = FINISH.get(r.finish_reason, r.finish_reason)
        m.prompt_tokens.labels(self.call.model).inc(len(r.prompt_ids))
        m.generation_tokens.labels(self.call.model).inc(len(r.token_ids))
        m.e2e.labels(self.call.model).observe(time.perf_counter() - self.t0)

    def cancel_open(self) -> None:
        """The client is gone: end whatever still runs (the engine frees its KV next step)."""
        loop = self.srv.loop
        for rid in self.open:
            loop.cancel(rid)
            loop.forget(rid)
            self.srv.admission.requests -= 1
            self.srv.metrics.cancelled.inc()
        for rid in self.unstarted:
            self.srv.admission.tokens -= self.by_id[rid].n_prompt
        self.open.clear()
        self.unstarted.clear()

    def usage(self) -> dict[str, Any]:
        p = sum(len(ids) for ids in self.call.prompts)
        return usage(p, sum(c.tokens for c in self.choices), sum(c.cached for c in self.choices[::self.call.n]))

    def _logprobs(self, c: Choice, entries) -> dict | None:
        if self.call.top_logprobs is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(self.srv.pieces, entries)
        return completion_logprobs(self.srv.pieces, entries, 0)

    async def whole(self, http: HttpRequest) -> JSONResponse:
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            while self.open:
                nxt = asyncio.ensure_future(self.next_event())
                done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    return JSONResponse({}, status_code=499)    # nobody is listening any more
                nxt.result()
        finally:
            gone.cancel()
            self.cancel_open()
        if self.error is not None:
            raise self.error
        out = []
        scored = {}
        if self.call.echo and self.call.top_logprobs is not None:   # the prompts' own log-probs
            for i, ids in enumerate(self.call.prompts):
                scored[i] = await self.srv.loop.call(
                    lambda e, ids=ids: self.srv.prompt_scorer(e, ids, self.call.top_logprobs, self.call.adapter))
        for c in self.choices:
            text = "".join(c.text)
            if self.call.echo:
                text = self.srv.tok.decode(self.call.prompts[c.index // self.call.n]) + text
            lp = self._logprobs(c, scored.get(c.index // self.call.n, []) + c.entries)
            if self.kind == "chat":
                out.append({"index": c.index, "message": {"role": "assistant", "content": text},
                            "logprobs": lp, "finish_reason": c.finish})
            else:
                out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish})
        body = envelope(self.kind, self.rid, self.call.model, self.created, False)
        body.update(choices=out, usage=self.usage())
        _log_usage(http, body["usage"])
        return JSONResponse(body)

    async def sse(self) -> AsyncIterator[str]:
        head = envelope(self.kind, self.rid, self.call.model, self.created, True)
        u = {"usage": None} if self.call.include_usage else {}

        def chunk(choice: dict) -> str:
            return "data: " + json.dumps({**head, "choices": [choice], **u}, ensure_ascii=False) + "\n\n"
        try:
            for c in self.choices:
                if self.kind == "chat":
                    yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None})
                elif self.call.echo:
                    yield chunk({"index": c.index, "text": self.srv.tok.decode(self.call.prompts[c.index // self.call.n]),
                                 "logprobs": None, "finish_reason": None})
            while self.open:
                c, ev = await self.next_event()
                if isinstance(ev, FinishEvent):
                    if self.error is not None:
                        yield "data: " + json.dumps(self.error.body()) + "\n\n"
                        break
                    yield chunk(self._delta(c, "", None, c.finish))
                elif ev.text or ev.logprobs is not None:
                    lp = self._logprobs(c, [(ev.token_id, ev.logprobs)]) if ev.logprobs is not None else None
                    yield chunk(self._delta(c, ev.text, lp, None))
            if self.call.include_usage and self.error is None:
                yield "data: " + json.dumps({**head, "choices": [], "usage": self.usage()}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.cancel_open()

    def _delta(self, c: Choice, text: str, lp, finish) -> dict:
        if self.kind == "chat":
            return {"index": c.index, "delta": {"content": text} if finish is None else {},
                    "logprobs": lp, "finish_reason": finish}
        return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client closes the connection."""
    while True:
        msg = await http.receive()
        if msg["type"] == "http.disconnect":
            return


def _log_usage(http: HttpRequest, u: dict) -> None:
    log = http.scope.setdefault("state", {}).setdefault("log", {})
    log["prompt_tokens"], log["completion_tokens"] = u["prompt_tokens"], u["completion_tokens"]
