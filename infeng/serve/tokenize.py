"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info.

A client that scores token ids (lm-evaluation-harness's ``local-completions`` model, which
detects these endpoints and then needs no tokenizer package of its own) tokenizes with the
server's own tokenizer, so its context/continuation split is the one the engine scores.
"""
from __future__ import annotations

from typing import Any

from infeng.errors import InfengError
from infeng.runtime.tokenizer import Tokenizer
from infeng.serve.protocol import ApiError, Limits, bad


def _check_model(body: dict, models: set[str]) -> None:
    m = body.get("model")
    if m is not None and m not in models:
        raise ApiError(404, f"the model {m!r} does not exist (see /v1/models)", "model", "model_not_found")


def tokenize(body: Any, tok: Tokenizer, ctx: int, limits: Limits, models: set[str]) -> dict[str, Any]:
    """{"prompt": str} or {"messages": [...]} (chat template applied), ``add_special_tokens``
    (default true: BOS as the model adds it) → {"count", "max_model_len", "tokens"}."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    extra = sorted(set(body) - {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"})
    if extra:
        raise bad(f"field {extra[0]!r} is not supported", extra[0])
    _check_model(body, models)
    special = body.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise bad("add_special_tokens must be true or false", "add_special_tokens")
    if ("prompt" in body) == ("messages" in body):
        raise bad("give one of prompt or messages", "prompt")
    if "prompt" in body:
        p = body["prompt"]
        if not isinstance(p, str):
            raise bad("prompt must be a string", "prompt")
        ids = tok.encode(p) if special else tok.encode_plain(p)
    else:
        msgs = body["messages"]
        gen = body.get("add_generation_prompt", True)
        if not isinstance(gen, bool):
            raise bad("add_generation_prompt must be true or false", "add_generation_prompt")
        if isinstance(msgs, list) and len(msgs) > limits.max_messages:
            raise bad(f"messages: {len(msgs)} messages, more than the limit of {limits.max_messages}", "messages")
        try:
            ids = tok.encode_plain(tok.render_chat(msgs, add_generation_prompt=gen))
        except InfengError as e:
            raise bad(str(e), "messages") from None
    return {"count": len(ids), "max_model_len": ctx, "tokens": ids, "token_strs": None}


def detokenize(body: Any, tok: Tokenizer, models: set[str]) -> dict[str, Any]:
    """{"tokens": [ids]} → {"prompt": text} (special tokens kept: the text round-trips)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    extra = sorted(set(body) - {"model", "tokens"})
    if extra:
        raise bad(f"field {extra[0]!r} is not supported", extra[0])
    _check_model(body, models)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad("tokens must be a list of token ids", "tokens")
    if not all(0 <= t < tok.vocab_size for t in ids):
        raise bad(f"tokens: token ids must be in 0..{tok.vocab_size - 1}", "tokens")
    return {"prompt": tok.decode(ids, keep_special=True)}


def tokenizer_info(tok: Tokenizer, ctx: int) -> dict[str, Any]:
    return {"tokenizer_class": "infeng", "bos_token": tok.special.get("bos"), "eos_token": tok.special.get("eos"),
            "pad_token": None, "add_bos_token": tok.add_bos, "chat_template": tok.chat_template,
            "model_max_length": ctx, "vocab_size": tok.vocab_size}
