"""JSONL batch jobs: one request per line in, one result per line out, in input order.

Two line formats, told apart per line:

* infeng's own: ``{"id", "prompt", "max_tokens", "temperature", "top_k", "top_p", "seed",
  "ignore_eos", "stop", "priority"}`` → ``{"id", "text", "token_ids", "finish_reason", "seed",
  "usage"}`` or ``{"id", "error"}``;
* the OpenAI Batch API's (also read by vLLM's run_batch): ``{"custom_id", "method": "POST",
  "url": "/v1/completions" | "/v1/chat/completions", "body": {...}}`` → ``{"id", "custom_id",
  "response": {"status_code", "request_id", "body"}, "error"}`` with a ``text_completion`` or
  ``chat.completion`` body, so files made for hosted batch jobs run here unchanged. Chat requests
  go through the model's chat template. A body whose "model" names a loaded adapter uses it (as
  vLLM serves LoRA adapters under their own model names).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from infeng.errors import InfengError
from infeng.runtime.engine import Engine, Request, Result
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.tokenizer import Tokenizer
from infeng.telemetry import peak_rss_mb, percentile

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "ignore_eos", "stop")
REQUEST_FIELDS = {"id", "prompt", "priority", "adapter", *SAMPLING_FIELDS}
OPENAI_URLS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
# body fields accepted; those that would change the output unless left at their default are refused
OPENAI_BODY = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "top_k", "seed", "stop", "n", "user", "ignore_eos", "stream",
               "presence_penalty", "frequency_penalty", "logprobs", "echo", "best_of"}
OPENAI_DEFAULTS = {"n": 1, "stream": False, "presence_penalty": 0, "frequency_penalty": 0,
                   "logprobs": None, "echo": False, "best_of": 1}


@dataclass
class BatchItem:
    lineno: int
    kind: str                   # "infeng" | "completions" | "chat"
    key: str                    # id or custom_id
    request: Request | None = None
    error: str | None = None
    model: str | None = None    # the body's "model", echoed back


def parse_line(line: str, lineno: int, where: str, defaults: SamplingParams, tok: Tokenizer) -> BatchItem:
    """One JSONL line → BatchItem; a bad line becomes an item with its error (naming file:line)."""
    loc = f"{where}:{lineno}"
    item = BatchItem(lineno, "infeng", f"line-{lineno}")
    try:
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise InfengError(f"{loc}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(d, dict):
            raise InfengError(f"{loc}: a request must be a JSON object")
        if "custom_id" in d or "body" in d:
            _parse_openai(d, item, loc, defaults, tok)
        else:
            _parse_infeng(d, item, loc, defaults)
    except InfengError as e:
        item.error = str(e)
    return item


def _key(v: Any, loc: str, what: str) -> str:
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise InfengError(f"{loc}: {what} must be a string or integer")
    return str(v)


def _params(defaults: SamplingParams, over: dict[str, Any], loc: str) -> SamplingParams:
    if isinstance(over.get("stop"), str):
        over["stop"] = (over["stop"],)
    if over.get("stop") is None:
        over.pop("stop", None)
    return replace(defaults, **over).validated(loc)


def _parse_infeng(d, item: BatchItem, loc: str, defaults: SamplingParams) -> None:
    if "id" in d:
        item.key = _key(d["id"], loc, "id")
    unknown = sorted(set(d) - REQUEST_FIELDS)
    if unknown:
        raise InfengError(f"{loc}: unknown field(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(sorted(REQUEST_FIELDS))})")
    prompt = d.get("prompt", "")
    if not isinstance(prompt, str):
        raise InfengError(f"{loc}: prompt must be a string")
    prio = d.get("priority", 0)
    if not isinstance(prio, int) or isinstance(prio, bool):
        raise InfengError(f"{loc}: priority must be an integer")
    adapter = d.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise InfengError(f"{loc}: adapter must be the name of a loaded adapter")
    params = _params(defaults, {k: d[k] for k in SAMPLING_FIELDS if k in d}, loc)
    item.request = Request(id=item.key, prompt=prompt, params=params, priority=prio, adapter=adapter)


def _parse_openai(d, item: BatchItem, loc: str, defaults: SamplingParams, tok: Tokenizer) -> None:
    item.key = _key(d.get("custom_id"), loc, "custom_id")
    item.kind = OPENAI_URLS.get(d.get("url"), "completions")
    if d.get("url") not in OPENAI_URLS:
        raise InfengError(f"{loc}: url {d.get('url')!r} is not supported (use {' or '.join(OPENAI_URLS)})")
    if d.get("method", "POST") != "POST":
        raise InfengError(f"{loc}: method must be POST")
    body = d.get("body")
    if not isinstance(body, dict):
        raise InfengError(f"{loc}: body must be a JSON object")
    item.model = body.get("model") if isinstance(body.get("model"), str) else None
    unknown = sorted(set(body) - OPENAI_BODY)
    if unknown:
        raise InfengError(f"{loc}: body field(s) {', '.join(map(repr, unknown))} are not supported")
    for k, default in OPENAI_DEFAULTS.items():
        if body.get(k, default) not in (default, None) or (k == "n" and body.get(k, 1) != 1):
            raise InfengError(f"{loc}: {k}={body[k]!r} is not supported (only {default!r})")
    over = {k: body[k] for k in ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos") if k in body}
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is not None:
        over["max_tokens"] = mt
    params = _params(defaults, over, loc)
    if item.kind == "chat":
        ids = tok.chat_ids(body.get("messages"), loc)
        stop = tuple(sorted(set(params.stop_token_ids) | set(tok.chat_stop_ids)))   # the template's end of turn
        item.request = Request(id=item.key, prompt_ids=ids, params=replace(params, stop_token_ids=stop))
    else:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InfengError(f"{loc}: prompt must be a string (one prompt per request)")
        item.request = Request(id=item.key, prompt=prompt, params=params)


def read_requests(path: Path, defaults: SamplingParams, tok: Tokenizer) -> list[BatchItem]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InfengError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InfengError(f"{path}: cannot read ({e})") from None
    return [parse_line(line, n, str(path), defaults, tok)
            for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def usage(r: Result) -> dict[str, int]:
    return {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(r.token_ids),
            "total_tokens": len(r.prompt_ids) + len(r.token_ids)}


def record(item: BatchItem, r: Result | None, error: str | None, model_name: str) -> dict[str, Any]:
    """The output line for one input line, in the line's own format."""
    if item.kind == "infeng":
        if r is None:
            return {"id": item.key, "error": error}
        return {"id": item.key, "text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                "seed": r.seed, "usage": usage(r)}
    rid = f"batch_req_{item.lineno}"
    if r is None:
        return {"id": rid, "custom_id": item.key, "response": None,
                "error": {"code": "invalid_request", "message": error}}
    finish = "stop" if r.finish_reason == "stop" else "length"
    if item.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": finish}
        body = {"id": f"chatcmpl-{item.lineno}", "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": r.text, "logprobs": None, "finish_reason": finish}
        body = {"id": f"cmpl-{item.lineno}", "object": "text_completion"}
    body.update(created=int(time.time()), model=item.model or model_name, choices=[choice], usage=usage(r))
    return {"id": rid, "custom_id": item.key,
            "response": {"status_code": 200, "request_id": f"req-{item.lineno}", "body": body}, "error": None}


def run_batch(engine: Engine, items: list[BatchItem], model_name: str,
              on_done: Callable[[], None] | None = None) -> tuple[list[dict[str, Any]], list[Result]]:
    """Run the good requests together; return output records in input order and the Results."""
    out: list[dict[str, Any] | None] = [None] * len(items)
    index = {}
    reqs = []
    for i, it in enumerate(items):
        if it.request is None:
            out[i] = record(it, None, it.error, model_name)
            if on_done:
                on_done()
        else:
            if it.kind != "infeng" and it.model in engine.adapters.loaded and it.request.adapter is None:
                it.request.adapter = it.model
            index[id(it.request)] = i
            reqs.append(it.request)
    results = []
    for res in engine.generate(reqs):
        if isinstance(res, tuple):
            req, err = res
            i = index[id(req)]
            out[i] = record(items[i], None, str(err), model_name)
        else:
            i = index[id(res.request)]
            out[i] = record(items[i], res, None, model_name)
            results.append(res)
        if on_done:
            on_done()
    return out, results


def metrics(engine: Engine, results: list[Result], wall_s: float) -> dict[str, float]:
    """Throughput, latency, scheduler and KV figures of a run, in the telemetry schema's units."""
    st, kv = engine.stats, engine.kv
    ttft = [r.ttft_s * 1e3 for r in results if r.ttft_s is not None]
    tpot = [r.tpot_s * 1e3 for r in results if r.tpot_s is not None]
    queue = [r.queue_s * 1e3 for r in results if r.queue_s is not None]
    itl = [(b - a) * 1e3 for r in results for a, b in zip(r.token_times, r.token_times[1:])]
    gen = sum(len(r.token_ids) for r in results)
    nan = float("nan")
    spec = engine.spec.stats.figures() if engine.spec else {}
    return {
        "requests": len(results),
        "prompt_tokens": sum(len(r.prompt_ids) for r in results),
        "generated_tokens": gen,
        "wall_s": wall_s,
        "prefill_tok_s": st.prefill_tokens / st.prefill_s if st.prefill_s else nan,
        "decode_tok_s": st.decode_tokens / st.decode_s if st.decode_s else nan,
        "aggregate_tok_s": gen / wall_s if wall_s else nan,
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "tpot_ms_p50": percentile(tpot, 50), "tpot_ms_p99": percentile(tpot, 99),
        "queue_ms_p50": percentile(queue, 50), "queue_ms_p99": percentile(queue, 99),
        "token_latency_ms_p50": percentile(itl, 50), "token_latency_ms_p90": percentile(itl, 90),
        "token_latency_ms_p99": percentile(itl, 99),
        "python_overhead_us_per_token": (st.step_s - st.c_s) / st.sampled * 1e6 if st.sampled else nan,
        "steps": st.steps,
        "batch_tokens_mean": st.batch_tokens / st.steps if st.steps else nan,
        "batch_seqs_mean": st.running / st.steps if st.steps else nan,
        "queue_depth_mean": st.queued / st.steps if st.steps else nan,
        "queue_depth_max": st.max_queued,
        "preemptions": st.preemptions,
        "rejected": st.rejected,
        "prefix_hit_rate": kv.hits / kv.lookups if kv.lookups else 0.0,
        "kv_blocks_max": st.max_kv_blocks,
        "kv_used_mb_max": st.max_kv_blocks * kv.block_bytes / 2**20,
        "kv_contiguous_mb": engine.max_batch * engine.max_seq_len * kv.block_bytes / kv.block_size / 2**20,
        "kv_pool_mb": kv.bytes / 2**20,
        "kv_bytes_per_token": kv.bytes_per_token,
        "kv_positions_fit": kv.n_blocks * kv.block_size,    # the context the pool holds, all sequences
        "kv_rotated_layers": sum(kv.spec.rotate),           # queries and keys
        "kv_rotated_value_layers": sum(kv.spec.rotate_v),
        "peak_rss_mb": peak_rss_mb(),
        **spec,
    }
