"""`infeng serve` against llama.cpp's server (llama-cpp-python's ``[server]`` extra) on one seeded
trace: the same model (the native base exported to GGUF), the same adapters (exported as GGUF
LoRA), the same prompts, output lengths and concurrency; the two servers run one after the other.

    infeng bench --suite bench/serve/llamacpp.yaml [--model M]           (kind: serve_llamacpp)

What llama-cpp-python's server does with adapters: it serves one model per alias, and an adapter
is a model setting (``lora_path``), so each adapter is an alias of the same base GGUF with its
own LoRA. It holds one model at a time and runs one request at a time (a lock around the model):
a request for another alias closes the loaded model and loads the other (base + adapter), and
requests for different adapters never share a forward pass. Its ``interrupt_requests`` is turned
off here (else a waiting request cuts the running stream short). It has no ``ignore_eos``: an
EOS logit bias of -1e4 keeps the output lengths exact. Prompts are text for both servers (its
completions take no token ids): the seeded token ids decoded once.
"""
from __future__ import annotations

import json
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from infeng.bench import serve_load
from infeng.bench.peers import _import
from infeng.bench.synthetic import gguf_cache_dir
from infeng.converters.gguf_lora import write_gguf_lora
from infeng.converters.gguf_write import export_cached
from infeng.model.adapter import load_adapter
from infeng.model.loader import load_model
from infeng.runtime.tokenizer import Tokenizer

DEFAULTS = {**{k: v for k, v in serve_load.DEFAULTS.items() if not k.startswith("over")}, "concurrency": [32],
            "requests": 48}
EOS_BIAS = -1e4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ggufs(model_path: Path, adir: Path | None, names: list[str]) -> tuple[Path, dict[str, Path]]:
    """The base and each adapter as GGUF (written once, beside the cache / the adapter files)."""
    model = load_model(model_path, verify=False)
    base = export_cached(model, gguf_cache_dir(), model_path)
    out = {}
    for n in names:
        src = (adir / f"{n}.infeng-lora").resolve()
        g = gguf_cache_dir() / f"{src.stem}.lora.gguf"
        if not g.exists() or g.stat().st_mtime < src.stat().st_mtime:
            write_gguf_lora(load_adapter(src, model), model, g)
        out[n] = g
    return base, out


def llamacpp_server(base: Path, adapters: dict[str, Path], base_name: str, cfg: dict, workdir: Path) -> serve_load.ServerProcess:
    """llama_cpp.server with one alias for the base and one per adapter, bound to 127.0.0.1."""
    common = {"model": str(base), "n_threads": cfg["threads"], "n_threads_batch": cfg["threads"], "n_ctx": cfg["ctx"],
              "n_batch": cfg["ctx"], "verbose": False}
    models = [dict(common, model_alias=base_name)]
    models += [dict(common, model_alias=n, lora_path=str(p)) for n, p in adapters.items()]
    port = free_port()
    conf = workdir / "llamacpp-server.json"
    conf.write_text(json.dumps({"host": "127.0.0.1", "port": port, "interrupt_requests": False, "models": models}))
    return serve_load.ServerProcess([sys.executable, "-m", "llama_cpp.server", "--config_file", str(conf)],
                                    "llama.cpp's server (llama_cpp.server)", port=port)


def run(cfg: dict, log=print) -> tuple[list[dict[str, Any]], list[str]]:
    """Per concurrency level: one record per server and one of ratios (infeng ÷ llama.cpp)."""
    _import("llama_cpp", "llama.cpp's server needs llama-cpp-python[server] (pip install -e '.[peers-server]')")
    for mod in ("sse_starlette", "starlette_context", "pydantic_settings"):
        _import(mod, "llama.cpp's server needs llama-cpp-python[server] (pip install -e '.[peers-server]')")
    model, adir, names = serve_load.prepare(cfg)
    m = load_model(model, verify=False)
    tok = Tokenizer(m.tokenizer, m.config.bos_id, m.config.eos_ids)
    reqs = serve_load.trace(cfg, names or [model.stem], min(m.config.vocab_size, tok.vocab_size))
    for r in reqs:       # text for both servers; BOS is added by each, as for any text prompt
        r["prompt"] = tok.decode(r["prompt"])
    base, lora = ggufs(model, adir, names)
    eos = sorted(m.config.eos_ids)
    peer_extra = {"logit_bias": {str(e): EOS_BIAS for e in eos}}
    log(f"model {model.name} ({base.name} for llama.cpp), {len(names)} adapters, Zipf α={cfg['zipf_alpha']}, "
        f"{len(reqs)} requests per level")
    recs = []
    with serve_load.infeng_server(model, adir, cfg) as srv:
        ours = [serve_load.run_level(srv.port, reqs, c, time_limit_s=cfg["time_limit_s"]) for c in cfg["concurrency"]]
    with tempfile.TemporaryDirectory() as td:
        with llamacpp_server(base, lora, model.stem, cfg, Path(td)) as srv:
            theirs = [serve_load.run_level(srv.port, reqs, c, peer_extra, cfg["time_limit_s"]) for c in cfg["concurrency"]]
    for a, b in zip(ours, theirs):
        recs += [{"server": "infeng", **a}, {"server": "llama.cpp", **b}]
        ratio = {"server": "infeng/llama.cpp", "concurrency": a["concurrency"],
                 "tok_s": a["tok_s"] / b["tok_s"] if b["tok_s"] else float("nan"),
                 "ttft_ms_p99": a["ttft_ms_p99"] / b["ttft_ms_p99"] if b["ttft_ms_p99"] else float("nan"),
                 "ttft_ms_p50": a["ttft_ms_p50"] / b["ttft_ms_p50"] if b["ttft_ms_p50"] else float("nan")}
        recs.append(ratio)
        log(f"concurrency {a['concurrency']}: aggregate {a['tok_s']:.1f} vs {b['tok_s']:.1f} tok/s "
            f"({ratio['tok_s']:.2f}x), TTFT p99 {a['ttft_ms_p99']:.0f} vs {b['ttft_ms_p99']:.0f} ms "
            f"({ratio['ttft_ms_p99']:.2f}x); requests answered {a['accepted']} vs {b['accepted']} of {len(reqs)}, "
            f"cut at the time limit {a['cut']} vs {b['cut']}")
    notes = [f"infeng, {n}" for n in serve_load.incomplete_notes(ours)]
    notes += [f"llama.cpp, {n}" for n in serve_load.incomplete_notes(theirs)]
    return recs, notes

