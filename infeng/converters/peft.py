"""PEFT LoRA / DoRA adapter folder → native adapter tensors, checked against the base model.

Reads adapter_config.json (r, lora_alpha, use_rslora, use_dora, target_modules, ...) and
adapter_model.safetensors (``base_model.model.model.layers.{i}.{self_attn|mlp}.{q_proj|...}.
lora_A.weight`` [r, in], ``lora_B.weight`` [out, r], DoRA ``lora_magnitude_vector`` [out]).
Anything that would change the math and is not implemented (biases, fan_in_fan_out, per-module
rank/alpha patterns, embedding or lm_head targets) is refused with one line naming it.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from infeng.converters.hf import read_json
from infeng.converters.safetensors_io import SafetensorsFile
from infeng.errors import InfengError
from infeng.format.config import ModelConfig
from infeng.format.schema import to_f32

# PEFT module name → (native projection name, HF parent)
TARGETS = {"q_proj": ("wq", "self_attn"), "k_proj": ("wk", "self_attn"), "v_proj": ("wv", "self_attn"),
           "o_proj": ("wo", "self_attn"), "gate_proj": ("w_gate", "mlp"), "up_proj": ("w_up", "mlp"),
           "down_proj": ("w_down", "mlp")}
KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                 r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")


def projection_shape(cfg: ModelConfig, proj: str) -> tuple[int, int]:
    """(out, in) of a native projection."""
    return {"wq": (cfg.q_dim, cfg.dim), "wk": (cfg.kv_dim, cfg.dim), "wv": (cfg.kv_dim, cfg.dim),
            "wo": (cfg.dim, cfg.q_dim), "w_gate": (cfg.hidden_dim, cfg.dim),
            "w_up": (cfg.hidden_dim, cfg.dim), "w_down": (cfg.dim, cfg.hidden_dim)}[proj]


def read_peft(folder: str | Path, cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter meta, {native name: f32 array}) for a PEFT folder, shapes checked against ``cfg``.
    Native names: ``layers.{i}.{proj}.lora_a`` [r, in], ``.lora_b`` [out, r], ``.dora_m`` [out]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InfengError(f"{folder}: no such adapter directory")
    cpath = folder / "adapter_config.json"
    c = read_json(cpath)
    if not isinstance(c, dict):
        raise InfengError(f"{cpath}: not a JSON object")
    where = str(cpath)
    if c.get("peft_type", "LORA") != "LORA":
        raise InfengError(f"{where}: peft_type {c.get('peft_type')!r} is not supported (only LORA, with or without DoRA)")
    for key, ok in (("bias", ("none", None)), ("fan_in_fan_out", (False, None)), ("lora_bias", (False, None)),
                    ("modules_to_save", (None, [])), ("layer_replication", (None,)),
                    ("rank_pattern", ({}, None)), ("alpha_pattern", ({}, None))):
        if c.get(key) not in ok:
            raise InfengError(f"{where}: {key}={c.get(key)!r} is not supported")
    r, alpha = c.get("r"), c.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise InfengError(f"{where}: r must be a positive integer and lora_alpha a number")
    rslora, dora = bool(c.get("use_rslora")), bool(c.get("use_dora"))
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    st = SafetensorsFile(folder / "adapter_model.safetensors").tensors
    out: dict[str, np.ndarray] = {}
    for key, (dtype, arr) in st.items():
        m = KEY.match(key)
        if not m:
            raise InfengError(f"{folder}: tensor {key!r} is not a LoRA weight of a Llama projection this engine applies")
        layer, parent, module, kind = int(m[1]), m[2], m[3], m[4]
        if module not in TARGETS or TARGETS[module][1] != parent:
            raise InfengError(f"{folder}: tensor {key!r}: target module {module!r} is not supported")
        if layer >= cfg.n_layers:
            raise InfengError(f"{folder}: tensor {key!r}: layer {layer} but the base model has {cfg.n_layers}")
        proj = TARGETS[module][0]
        n_out, n_in = projection_shape(cfg, proj)
        name, want = {"lora_A.weight": ("lora_a", (r, n_in)), "lora_B.weight": ("lora_b", (n_out, r))}.get(
            kind, ("dora_m", (n_out,)))
        if tuple(arr.shape) != want:
            raise InfengError(f"{folder}: tensor {key!r} has shape {list(arr.shape)}, the base model needs {list(want)}")
        out[f"layers.{layer}.{proj}.{name}"] = np.ascontiguousarray(to_f32(arr, dtype), dtype=np.float32)
    targets = sorted({n.rsplit(".", 1)[0] for n in out})
    for t in targets:
        for part in ("lora_a", "lora_b") + (("dora_m",) if dora else ()):
            if f"{t}.{part}" not in out:
                raise InfengError(f"{folder}: {t} has no {part} tensor")
        if not dora and f"{t}.dora_m" in out:
            raise InfengError(f"{folder}: {t} has a DoRA magnitude but use_dora is false")
    if not targets:
        raise InfengError(f"{folder}: adapter has no LoRA tensors")
    meta = {"rank": r, "alpha": alpha, "scale": scale, "use_rslora": rslora, "use_dora": dora,
            "targets": targets, "peft_version": c.get("peft_version")}
    return meta, out
