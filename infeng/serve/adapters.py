"""Adapters loaded and unloaded while the server runs (vLLM's /v1/load_lora_adapter and
/v1/unload_lora_adapter): a load reads only a file inside ``--adapters-dir``; an unload stops new
requests for the adapter at once and waits for its running ones to finish.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infeng.errors import InfengError
from infeng.runtime.engine import Engine
from infeng.serve.protocol import ApiError, bad

if TYPE_CHECKING:
    from infeng.serve.app import Server


def _adapter_path(srv: Server, body: dict) -> Path:
    """The file a load request names, which must lie in the adapters directory (a request never
    reaches any other part of the filesystem)."""
    d = srv.cfg.adapters_dir
    if d is None:
        raise bad("the server was started without --adapters-dir, so adapters cannot be loaded", "lora_path")
    p = body.get("lora_path", f"{body.get('lora_name')}.infeng-lora")
    if not isinstance(p, str) or not p or Path(p).is_absolute() or "\x00" in p:
        raise bad("lora_path must be a file name inside the server's adapters directory", "lora_path")
    root = d.resolve()
    f = (root / p).resolve()
    if root not in f.parents:
        raise bad("lora_path must be a file name inside the server's adapters directory", "lora_path")
    if not f.is_file():
        raise ApiError(404, f"no adapter file {p!r} in the adapters directory", "lora_path", "adapter_not_found")
    return f


def _name(body: dict) -> str:
    name = body.get("lora_name")
    if not isinstance(name, str) or not name or len(name) > 128:
        raise bad("lora_name must be a non-empty string", "lora_name")
    return name


async def load_adapter(srv: Server, body: Any):
    if not isinstance(body, dict) or set(body) - {"lora_name", "lora_path"}:
        raise bad("the body takes lora_name and lora_path (a file in the adapters directory)")
    name = _name(body)
    if name == srv.cfg.base_name:
        raise bad(f"{name!r} is the base model's name", "lora_name")
    path = _adapter_path(srv, body)
    try:
        await srv.loop.call(lambda e: e.load_adapter(path, name))
    except InfengError as e:
        raise bad(str(e), "lora_path") from None
    srv.models.add(name)
    srv.unloading.discard(name)
    srv.metrics.loads += 1
    srv.metrics.adapter_loads.set(srv.metrics.loads)
    return {"object": "adapter", "id": name, "status": "loaded"}


async def unload_adapter(srv: Server, body: Any):
    if not isinstance(body, dict) or set(body) - {"lora_name", "lora_int_id"}:
        raise bad("the body takes lora_name")
    name = _name(body)
    if name not in srv.models or name == srv.cfg.base_name:
        raise ApiError(404, f"no adapter {name!r} is loaded", "lora_name", "model_not_found")
    srv.unloading.add(name)      # new requests get a 404 from here on; running ones finish

    def try_unload(e: Engine) -> bool:
        la = e.adapters.loaded.get(name)
        if la is None:
            return True
        if la.in_use:
            return False
        e.unload_adapter(name)
        return True
    while not await srv.loop.call(try_unload):
        await asyncio.sleep(0.05)
    srv.models.discard(name)
    srv.unloading.discard(name)
    return {"object": "adapter", "id": name, "status": "unloaded"}

