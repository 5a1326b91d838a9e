"""Hugging Face Llama checkpoint folder → native tensors (no copy unless a dtype changes).

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


def hf_name_map(cfg: ModelConfig) -> dict[str, str]:
    """native name → HF name."""
    m = {"tok_embeddings": "model.embed_tokens.weight", "norm": "model.norm.weight"}
    if not cfg.tie_embeddings:
        m["output"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        h = f"model.layers.{i}."
        m.update({
            f"layers.{i}.attn_norm": h + "input_layernorm.weight",
            f"layers.{i}.wq": h + "self_attn.q_proj.weight",
            f"layers.{i}.wk": h + "self_attn.k_proj.weight",
            f"layers.{i}.wv": h + "self_attn.v_proj.weight",
            f"layers.{i}.wo": h + "self_attn.o_proj.weight",
            f"layers.{i}.ffn_norm": h + "post_attention_layernorm.weight",
            f"layers.{i}.w_gate": h + "mlp.gate_proj.weight",
            f"layers.{i}.w_up": h + "mlp.up_proj.weight",
            f"layers.{i}.w_down": h + "mlp.down_proj.weight",
        })
    return m


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
    for native, hf in hf_name_map(cfg).items():
        if hf not in raw:
            raise InfengError(f"{folder}: checkpoint has no tensor {hf!r}")
        label, arr = raw[hf]
        if tuple(arr.shape) != shapes[native]:
            raise InfengError(f"{folder}: tensor {hf!r} has shape {list(arr.shape)}, config says {list(shapes[native])}")
        want = "f32" if is_norm(native) else (dtype or label)
        out[native] = (want, convert_dtype(arr, label, want))
    return cfg, out, tok, {k: v for k, v in gen.items() if not k.startswith("_")}


def _replace(cfg: ModelConfig, **kw) -> ModelConfig:
    return replace(cfg, **kw)
