"""What every HTTP request passes through before a route: a request id (taken from the client's
X-Request-Id when it is sane, else made; always returned as a header), the API key check
(constant-time; every path but /health), the body size limit, and one JSON access-log line.

A plain ASGI middleware, not Starlette's BaseHTTPMiddleware: that one buffers streamed responses
and hides a client's disconnect from the route.
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import time
from typing import Any

try:    # the serve extra; infeng.serve.require() names it when missing
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse
except ImportError:
    pass

from infeng.serve.protocol import ApiError, bad

access = logging.getLogger("infeng.serve.access")
SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
OPEN_PATHS = {"/health"}
GENERATE = {"/v1/completions", "/v1/chat/completions"}
BEFORE_LOAD = {"/health", "/ready", "/metrics"}       # what answers while the model loads
COUNTED = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
           "/tokenize", "/detokenize", "/tokenizer_info"}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def key_ok(header: bytes | None, keys: tuple[bytes, ...]) -> bool:
    """Bearer token against every key, each compared in constant time, all of them compared."""
    if header is None or not header.startswith(b"Bearer "):
        return False
    given = header[7:].strip()
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k)
    return ok


async def read_json(req: HttpRequest, limit: int) -> Any:
    """The body as JSON, read up to ``limit`` bytes (413 past it, whatever Content-Length said)."""
    buf = bytearray()
    async for part in req.stream():
        buf += part
        if len(buf) > limit:
            raise ApiError(413, f"the request body is larger than the limit of {limit} bytes")
    try:
        return json.loads(buf)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({getattr(e, 'msg', e)})") from None


class Gate:
    def __init__(self, app, srv):
        self.app, self.srv = app, srv
        self.keys = tuple(k.encode() for k in srv.cfg.api_keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if SANE_ID.fullmatch(given) else self.srv.request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = [0]

        async def send_with_id(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                msg = dict(msg, headers=list(msg.get("headers", [])) + [(b"x-request-id", rid.encode())])
            await send(msg)
        try:
            err = self._refuse(scope, headers)
            if err is not None:
                await error_response(err)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            if access.isEnabledFor(logging.INFO):      # no line to build when nobody reads it
                line = {"ts": round(time.time(), 3), "request_id": rid, "method": scope["method"], "path": scope["path"],
                        "status": status[0] or 499, "ms": round((time.perf_counter() - t0) * 1e3, 2),
                        "client": (scope.get("client") or ("", 0))[0], **state.get("log", {})}
                access.info(json.dumps(line))
            if scope["path"] in COUNTED and status[0]:     # known paths only: labels stay bounded
                model = state.get("log", {}).get("model", "")
                self.srv.metrics.requests.labels(scope["path"], model, str(status[0])).inc()

    def _refuse(self, scope, headers) -> ApiError | None:
        if self.keys and scope["path"] not in OPEN_PATHS and not key_ok(headers.get(b"authorization"), self.keys):
            return ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")
        cl = headers.get(b"content-length")
        limit = self.srv.cfg.limits.max_body_bytes
        if cl is not None and (not cl.isdigit() or int(cl) > limit):
            return ApiError(413, f"the request body is larger than the limit of {limit} bytes")
        if not self.srv.loaded and scope["path"] not in BEFORE_LOAD:
            return ApiError(503, "the model is still loading; retry when /ready answers 200",
                            headers={"Retry-After": "1"})
        if scope["path"] in GENERATE and scope["method"] == "POST":
            return self.srv.refuse_at_once()
        return None
