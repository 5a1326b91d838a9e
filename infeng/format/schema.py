"""What a model file holds: the tensor names and shapes a config implies, and how the float
storage types (f32, bf16, f16) convert. Converters, quantizers and the loader all check against it."""
from __future__ import annotations

import numpy as np

from infeng.errors import InfengError
from infeng.format.config import ModelConfig

MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
STORE_DTYPES = ("f32", "bf16", "f16")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    s = {"tok_embeddings": (cfg.vocab_size, cfg.dim), "norm": (cfg.dim,)}
    if not cfg.tie_embeddings:
        s["output"] = (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        s.update({
            f"layers.{i}.attn_norm": (cfg.dim,), f"layers.{i}.ffn_norm": (cfg.dim,),
            f"layers.{i}.wq": (cfg.q_dim, cfg.dim), f"layers.{i}.wk": (cfg.kv_dim, cfg.dim),
            f"layers.{i}.wv": (cfg.kv_dim, cfg.dim), f"layers.{i}.wo": (cfg.dim, cfg.q_dim),
            f"layers.{i}.w_gate": (cfg.hidden_dim, cfg.dim), f"layers.{i}.w_up": (cfg.hidden_dim, cfg.dim),
            f"layers.{i}.w_down": (cfg.dim, cfg.hidden_dim),
        })
    return s


def is_norm(name: str) -> bool:
    return name == "norm" or name.endswith("_norm")


def convert_dtype(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Storage array of dtype label src → label dst (round to nearest even)."""
    if src == dst:
        return arr
    f = to_f32(arr, src)
    if dst == "f32":
        return np.ascontiguousarray(f)
    if dst == "f16":
        return f.astype(np.float16)
    if dst == "bf16":
        u = f.view(np.uint32).astype(np.uint64)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), r)
    raise InfengError(f"unknown dtype {dst!r}")


def to_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f32":
        return arr
    if dtype == "bf16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if dtype == "f16":
        return arr.astype(np.float32)
    raise InfengError(f"cannot read dtype {dtype!r} as f32")
