"""OpenAI request bodies → engine requests, engine results → OpenAI response bodies.

Every body field is either understood, accepted only at its no-op default (e.g.
``presence_penalty: 0``), or refused by name with a 400: nothing that would change the output is
silently ignored. Sampling defaults come from the model's generation config, as vLLM does.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from infeng.errors import InfengError
from infeng.runtime.sampler import MAX_LOGPROBS, SamplingParams
from infeng.runtime.tokenizer import Tokenizer


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_tokens: int = 4096        # the most a request may ask to generate
    max_n: int = 8                # choices per request
    max_prompts: int = 16         # prompts in one completions request


# fields taken at face value, and fields accepted only at their no-op value
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
          "stream_options", "user", "priority", "ignore_eos", "logprobs"}
NOOP = {"presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logit_bias": (None, {}),
        "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,),
        "repetition_penalty": (None, 1, 1.0), "min_tokens": (None, 0)}
COMMON |= {"response_format", "guided_regex", "guided_grammar", "guided_json"}   # see grammar.py
COMPLETION = COMMON | {"prompt", "echo", "best_of"}
CHAT = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}


@dataclass
class Call:
    kind: str                     # "completions" | "chat"
    model: str                    # as the request named it
    adapter: str | None           # None: the base model
    prompts: list[list[int]]      # token ids, one list per prompt
    params: SamplingParams        # validated; choice j of a prompt samples with seed + j
    n: int
    stream: bool
    include_usage: bool
    top_logprobs: int | None      # None: no log-probs
    echo: bool
    priority: int
    constraint: tuple | None = None   # (format, spec, field) of structured output, see grammar.py


def _int(body: dict, name: str, lo: int, hi: int | None = None, default=None):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        raise bad(f"{name} must be an integer in {lo}..{'' if hi is None else hi}, got {v!r}", name)
    return v


def _check_fields(body: dict, allowed: set[str]) -> None:
    for k, v in body.items():
        if k in allowed:
            continue
        if k in NOOP:
            if v not in NOOP[k]:
                raise bad(f"{k}={v!r} is not supported", k)
            continue
        raise bad(f"field {k!r} is not supported", k)


def parse(kind: str, body: Any, tok: Tokenizer, defaults: SamplingParams, ctx: int, limits: Limits,
          models: set[str], base_name: str) -> Call:
    """A completions or chat body → Call, or ApiError naming the field at fault."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _check_fields(body, COMPLETION if kind == "completions" else CHAT)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model must name the base model or a loaded adapter (see /v1/models)", "model")
    if model not in models:
        raise ApiError(404, f"the model {model!r} does not exist (see /v1/models)", "model", "model_not_found")
    n = _int(body, "n", 1, limits.max_n, 1)
    if kind == "completions" and body.get("best_of") not in (None, n):
        raise bad(f"best_of={body['best_of']!r} is not supported (only equal to n)", "best_of")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    so = body.get("stream_options")
    if so is not None and (not stream or not isinstance(so, dict) or set(so) - {"include_usage"}):
        raise bad("stream_options takes only {\"include_usage\": bool}, with stream true", "stream_options")
    include_usage = bool((so or {}).get("include_usage", False))
    priority = _int(body, "priority", -1000, 1000, 0)
    echo = False
    if kind == "completions":
        top = _int(body, "logprobs", 0, MAX_LOGPROBS, None)
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise bad("echo must be true or false", "echo")
        if echo and top is not None and stream:
            raise bad("echo with logprobs is supported without stream only", "echo")
        prompts = _completion_prompts(body.get("prompt"), tok, limits)
    else:
        lp = body.get("logprobs", False)
        if not isinstance(lp, bool) and lp is not None:
            raise bad("logprobs must be true or false", "logprobs")
        top = _int(body, "top_logprobs", 0, MAX_LOGPROBS, None)
        if top is not None and not lp:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        top = (top or 0) if lp else None
        msgs = body.get("messages")
        if isinstance(msgs, list) and len(msgs) > limits.max_messages:
            raise bad(f"messages: {len(msgs)} messages, more than the limit of {limits.max_messages}", "messages")
        try:
            prompts = [tok.chat_ids(msgs)]
        except InfengError as e:
            raise bad(str(e), "messages") from None
    longest = max(len(p) for p in prompts)
    if longest >= ctx:
        raise bad(f"the prompt has {longest} tokens; the context is {ctx} tokens (room for at least one "
                  f"more is needed)", "messages" if kind == "chat" else "prompt")
    name = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    mt = _int(body, name, 0, limits.max_tokens, None)
    if mt is not None and longest + mt > ctx:
        raise bad(f"the prompt has {longest} tokens and {name} is {mt}: {longest + mt} is more than the "
                  f"context of {ctx} tokens", name)
    if mt is None:   # OpenAI's defaults: 16 for completions, the rest of the context for chat
        mt = min(16 if kind == "completions" else limits.max_tokens, ctx - longest)
    over: dict[str, Any] = {"max_tokens": mt}
    for k in ("temperature", "top_p", "top_k", "seed", "ignore_eos"):
        if body.get(k) is not None:
            over[k] = body[k]
    if over.get("top_k") == -1:      # vLLM's spelling of "off"
        over["top_k"] = 0
    stop = body.get("stop")
    if stop is not None:
        over["stop"] = (stop,) if isinstance(stop, str) else stop
        if isinstance(over["stop"], (list, tuple)) and len(over["stop"]) > 16:
            raise bad("stop: at most 16 stop strings", "stop")
    if top is not None:
        over["logprobs"] = top
    try:
        params = replace(defaults, **over).validated()
    except InfengError as e:
        raise bad(str(e), str(e).split(" ", 1)[0]) from None
    con = constraint(kind, body)
    if con is not None and params.ignore_eos:
        raise bad("ignore_eos cannot be used with structured output (the grammar ends with EOS)", "ignore_eos")
    return Call(kind, model, None if model == base_name else model, prompts, params, n, stream, include_usage,
                top, echo, priority, con)


def constraint(kind: str, body: dict) -> tuple[str, Any, str] | None:
    """The request's constraint as (format, spec, field), None if it has none; 400 for a bad one."""
    rf = body.get("response_format")
    given = [k for k in ("guided_regex", "guided_grammar", "guided_json") if body.get(k) is not None]
    if rf not in (None, {"type": "text"}):
        given.append("response_format")
    if len(given) > 1:
        raise bad(f"give one of {', '.join(given)}, not several", given[1])
    if not given:
        return None
    k = given[0]
    if k == "guided_regex":
        if not isinstance(body[k], str):
            raise bad("guided_regex must be a string", k)
        return "regex", body[k], k
    if k == "guided_grammar":
        if not isinstance(body[k], str):
            raise bad("guided_grammar must be a Lark grammar (a string)", k)
        return "lark", body[k], k
    if k == "guided_json":
        return "json", _schema(body[k], k), k
    if not isinstance(rf, dict) or rf.get("type") not in ("json_object", "json_schema"):
        raise bad("response_format type must be text, json_object or json_schema", "response_format")
    if rf["type"] == "json_object":
        return "json", {"type": "object"}, "response_format"
    js = rf.get("json_schema")
    if not isinstance(js, dict) or "schema" not in js:
        raise bad("response_format json_schema needs {\"name\", \"schema\"}", "response_format")
    return "json", _schema(js["schema"], "response_format"), "response_format"


def _schema(s: Any, param: str) -> dict:
    if isinstance(s, str):
        try:
            s = json.loads(s)
        except json.JSONDecodeError:
            raise bad("the JSON schema is not valid JSON", param) from None
    if not isinstance(s, dict):
        raise bad("the JSON schema must be an object", param)
    return s


def _completion_prompts(p: Any, tok: Tokenizer, limits: Limits) -> list[list[int]]:
    """A string, a list of strings, a list of token ids or a list of such lists."""
    def ids(x) -> list[int]:
        if isinstance(x, str):
            return tok.encode(x)
        if isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            if not all(0 <= t < tok.vocab_size for t in x):
                raise bad(f"prompt: token ids must be in 0..{tok.vocab_size - 1}", "prompt")
            return list(x)
        raise bad("prompt must be a string, a list of strings, or token ids", "prompt")
    if p is None:
        raise bad("prompt is required", "prompt")
    if isinstance(p, list) and p and not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if len(p) > limits.max_prompts:
            raise bad(f"prompt: {len(p)} prompts, more than the limit of {limits.max_prompts}", "prompt")
        return [ids(x) for x in p]
    return [ids(p)]


# ---- responses -----------------------------------------------------------------------------------
FINISH = {"stop": "stop", "length": "length", "context": "length"}


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


class Pieces:
    """The text of single tokens, for log-prob listings (a SentencePiece '▁' is a space)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.text = lru_cache(maxsize=65536)(self._text)

    def _text(self, i: int) -> str:
        raw = self.tok.tk.id_to_token(i) or ""
        s = self.tok.tk.decode([i], skip_special_tokens=False)
        return " " + s if raw.startswith("\u2581") and not s.startswith(" ") else s


def completion_logprobs(pieces: Pieces, entries: list[tuple[int, tuple | None]], offset: int) -> dict[str, Any]:
    """The completions API's logprobs object for (token id, (logprob, top)) entries; an entry
    without log-probs (an echoed prompt's first token) has null ones."""
    tokens, lps, tops, offs = [], [], [], []
    for tid, lp in entries:
        t = pieces.text(tid)
        offs.append(offset)
        offset += len(t)
        tokens.append(t)
        lps.append(None if lp is None else lp[0])
        d: dict[str, float] | None = None if lp is None else {}
        for i, v in lp[1] if lp is not None else ():
            d.setdefault(pieces.text(i), v)
        tops.append(d)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def chat_logprobs(pieces: Pieces, entries: list[tuple[int, tuple]]) -> dict[str, Any]:
    def one(i, v):
        t = pieces.text(i)
        return {"token": t, "logprob": v, "bytes": list(t.encode())}
    return {"content": [dict(one(tid, lp), top_logprobs=[one(i, v) for i, v in top]) for tid, (lp, top) in entries]}


def envelope(kind: str, rid: str, model: str, created: int, stream: bool) -> dict[str, Any]:
    obj = {"completions": "text_completion", "chat": "chat.completion.chunk" if stream else "chat.completion"}[kind]
    return {"id": rid, "object": obj, "created": created, "model": model}


def now() -> int:
    return int(time.time())


def too_many(why: str, retry_after_s: int) -> ApiError:
    return ApiError(429, f"{why}; retry later", code="rate_limit_exceeded", headers={"Retry-After": str(retry_after_s)})
