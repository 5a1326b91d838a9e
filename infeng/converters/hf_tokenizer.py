"""A Hugging Face folder's tokenizer files → the tokenizer spec {"json", "add_bos", "chat_template"}.

- ``tokenizer.json`` is used verbatim (the `tokenizers` library runs it).
- BOS: ``add_bos_token`` in tokenizer_config.json when it is there; otherwise whatever the
  tokenizer.json post-processor does, as transformers' fast tokenizers do (Llama's template adds
  ``<s>``; GPT-2-style byte-level tokenizers — SmolLM, Qwen — add nothing).
- Chat template: ``chat_template`` in tokenizer_config.json (a string, or a list of named
  templates of which "default" is used), else ``chat_template.jinja`` (where transformers ≥ 4.43
  writes it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from infeng.errors import InfengError


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InfengError(f"{path}: not valid JSON ({e})") from None


def post_processor_adds_bos(tok: dict[str, Any]) -> bool:
    """Does the tokenizer.json post-processor put a special token before a single sequence?"""
    pp = tok.get("post_processor")
    steps = pp.get("processors", [pp]) if isinstance(pp, dict) else []
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            return bool(single) and isinstance(single[0], dict) and "SpecialToken" in single[0]
    return False


def chat_template(folder: Path, tc: dict[str, Any]) -> str | None:
    where = folder / "tokenizer_config.json"
    t = tc.get("chat_template")
    if isinstance(t, list):
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        if "default" not in named:
            raise InfengError(f"{where}: chat_template lists templates {sorted(map(str, named))} but no 'default'")
        t = named["default"]
    if t is None and (folder / "chat_template.jinja").is_file():
        try:
            t = (folder / "chat_template.jinja").read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InfengError(f"{folder / 'chat_template.jinja'}: cannot read ({e})") from None
    if t is not None and not isinstance(t, str):
        raise InfengError(f"{where}: chat_template must be a string, is {type(t).__name__}")
    return t


def load_tokenizer_files(folder: Path) -> dict[str, Any]:
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise InfengError(f"{folder}: no tokenizer.json (the engine tokenizes with the `tokenizers` library)")
    tok = _json(tj)
    if not isinstance(tok, dict):
        raise InfengError(f"{tj}: not a tokenizer (a JSON object is expected)")
    tcp = folder / "tokenizer_config.json"
    tc = _json(tcp) if tcp.is_file() else {}
    if not isinstance(tc, dict):
        raise InfengError(f"{tcp}: a JSON object is expected")
    add_bos = tc.get("add_bos_token")
    if add_bos is None:
        add_bos = post_processor_adds_bos(tok)
    elif not isinstance(add_bos, bool):
        raise InfengError(f"{tcp}: add_bos_token must be true or false, is {add_bos!r}")
    return {"json": tj.read_text(), "add_bos": add_bos, "chat_template": chat_template(folder, tc)}
