"""Hugging Face checkpoint folder (Llama, Mistral, Qwen2/3, Phi-3, SmolLM3) → native tensors (no
copy unless a dtype changes).

Reads config.json (refusing what the engine does not implement), model.safetensors or the shards
named by model.safetensors.index.json, tokenizer.json (+ tokenizer_config.json,
generation_config.json). Tensor names are mapped to the engine's names and every shape is
checked against the config.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from infeng.converters.hf_config import from_hf
from infeng.converters.hf_tokenizer import load_tokenizer_files
from infeng.converters.safetensors_io import SafetensorsFile
from infeng.errors import InfengError
from infeng.format.config import ModelConfig
from infeng.format.schema import STORE_DTYPES, convert_dtype, expected_shapes, is_norm


def read_json(path: Path, required: bool = True) -> Any:
    if not path.is_file():
        if required:
            raise InfengError(f"{path}: no such file")
        return None
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InfengError(f"{path}: not valid JSON ({e})") from None


# per-layer native name → HF name under model.layers.{i}. (the Llama layout every architecture shares)
_LAYER = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
          "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
          "ffn_norm": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
          "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
          "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
          "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}


def hf_sources(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """native name → (HF tensor name, first row, end row); Phi-3's fused qkv_proj / gate_up_proj
    are split by rows into wq/wk/wv and w_gate/w_up (views, no copy). end = 0: the whole tensor."""
    shapes = expected_shapes(cfg)
    m = {"tok_embeddings": ("model.embed_tokens.weight", 0, 0), "norm": ("model.norm.weight", 0, 0)}
    if not cfg.tie_embeddings:
        m["output"] = ("lm_head.weight", 0, 0)
    q, kv, hid = cfg.q_dim, cfg.kv_dim, cfg.hidden_dim
    fused = {"wq": ("self_attn.qkv_proj.weight", 0, q), "wk": ("self_attn.qkv_proj.weight", q, q + kv),
             "wv": ("self_attn.qkv_proj.weight", q + kv, q + 2 * kv),
             "w_gate": ("mlp.gate_up_proj.weight", 0, hid), "w_up": ("mlp.gate_up_proj.weight", hid, 2 * hid)}
    for i in range(cfg.n_layers):
        h = f"model.layers.{i}."
        for short, name in _LAYER.items():
            native = f"layers.{i}.{short}"
            if native not in shapes:
                continue
            if cfg.arch == "phi3" and short in fused:
                src, a, b = fused[short]
                m[native] = (h + src, a, b)
            else:
                m[native] = (h + name, 0, 0)
    return m


def fused_rows(cfg: ModelConfig, hf_name: str) -> int | None:
    """Rows of a fused HF tensor (Phi-3), or None."""
    if hf_name.endswith("qkv_proj.weight"):
        return cfg.q_dim + 2 * cfg.kv_dim
    if hf_name.endswith("gate_up_proj.weight"):
        return 2 * cfg.hidden_dim
    return None


def _open_shards(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return SafetensorsFile(single).tensors
    if index.is_file():
        idx = read_json(index)
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict):
            raise InfengError(f"{index}: no weight_map")
        out: dict[str, tuple[str, np.ndarray]] = {}
        for shard in sorted(set(wm.values())):
            if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
                raise InfengError(f"{index}: bad shard file name {shard!r}")
            out.update(SafetensorsFile(folder / shard).tensors)
        return out
    raise InfengError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_folder(folder: str | Path, dtype: str | None = None):
    """Read an HF Llama folder: (config, {native name: (dtype label, array)}, tokenizer dict, generation dict).

    ``dtype`` stores matrices as f32/bf16/f16 (None keeps the checkpoint's); norms are always f32.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InfengError(f"{folder}: no such directory")
    if dtype is not None and dtype not in STORE_DTYPES:
        raise InfengError(f"--dtype {dtype!r}: must be one of {', '.join(STORE_DTYPES)}")
    cfg_path = folder / "config.json"
    cfg = from_hf(read_json(cfg_path), str(cfg_path))
    gen = read_json(folder / "generation_config.json", required=False) or {}
    tok = load_tokenizer_files(folder)
    if cfg.bos_id is None and gen.get("bos_token_id") is not None:
        cfg = _replace(cfg, bos_id=gen["bos_token_id"])
    eos = gen.get("eos_token_id")
    if eos is not None:
        cfg = _replace(cfg, eos_ids=tuple(eos) if isinstance(eos, list) else (eos,))
    raw = _open_shards(folder)
    shapes = expected_shapes(cfg)
    out: dict[str, tuple[str, np.ndarray]] = {}
    sources = hf_sources(cfg)
    used = {hf for hf, _, _ in sources.values()}
    for name in raw:
        # transformers ignores a stored inv_freq buffer, and lm_head when the embeddings are tied
        if name not in used and not name.endswith("rotary_emb.inv_freq") and not (cfg.tie_embeddings and name == "lm_head.weight"):
            raise InfengError(f"{folder}: tensor {name!r} is not part of a {cfg.arch} model this engine runs")
    for native, (hf, a, b) in sources.items():
        if hf not in raw:
            raise InfengError(f"{folder}: checkpoint has no tensor {hf!r}")
        label, arr = raw[hf]
        if b:
            want_shape = (fused_rows(cfg, hf), shapes[native][1])
            if tuple(arr.shape) != want_shape:
                raise InfengError(f"{folder}: tensor {hf!r} has shape {list(arr.shape)}, config says {list(want_shape)}")
            arr = arr[a:b]
        if tuple(arr.shape) != shapes[native]:
            raise InfengError(f"{folder}: tensor {hf!r} has shape {list(arr.shape)}, config says {list(shapes[native])}")
        want = "f32" if is_norm(native) else (dtype or label)
        out[native] = (want, convert_dtype(arr, label, want))
    return cfg, out, tok, {k: v for k, v in gen.items() if not k.startswith("_")}


def _replace(cfg: ModelConfig, **kw) -> ModelConfig:
    return replace(cfg, **kw)
