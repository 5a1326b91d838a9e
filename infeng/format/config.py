"""Model configuration as a native manifest stores it (the Llama family).

Only what the forward pass implements is accepted; any other architecture or a field whose value
would change the math (biases, another activation, an unknown RoPE scaling) is refused with one
line naming it, rather than silently computing something else.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from infeng.errors import InfengError

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    dim: int                 # hidden size
    hidden_dim: int          # FFN width
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float
    rope_theta: float
    tie_embeddings: bool
    rope_scaling: dict[str, Any] | None = None
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    arch: str = "llama"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_ids"] = list(self.eos_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "ModelConfig":
        try:
            d = dict(d)
            d["eos_ids"] = tuple(d.get("eos_ids", ()))
            cfg = cls(**d)
        except TypeError as e:
            raise InfengError(f"{where}: bad model config ({e})") from None
        cfg.validate(where)
        return cfg

    def validate(self, where: str, names: dict[str, str] | None = None) -> None:
        """``names`` maps field names to the source's (e.g. dim → hidden_size) for messages."""
        names = names or {}
        for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "max_seq_len"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InfengError(f"{where}: {names.get(k, k)} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise InfengError(f"{where}: num_attention_heads {self.n_heads} is not a multiple of "
                              f"num_key_value_heads {self.n_kv_heads}")
        if self.head_dim % 2 or self.head_dim > 256:
            raise InfengError(f"{where}: head_dim {self.head_dim} must be even and at most 256")
        for k in ("norm_eps", "rope_theta"):     # a string here was a TypeError (found by fuzzing)
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf:
                raise InfengError(f"{where}: rms_norm_eps and rope_theta must be positive numbers, got {k}={v!r}")
        rs = self.rope_scaling     # a native manifest's is checked here too: inv_freq() reads it
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else None
            if kind not in ROPE_TYPES or kind == "default":
                raise InfengError(f"{where}: rope_scaling type {kind!r} is not supported")
            used = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if "factor" not in rs or not all(isinstance(rs[k], (int, float)) and not isinstance(rs[k], bool)
                                             and rs[k] > 0 for k in used if k in rs):
                raise InfengError(f"{where}: rope_scaling needs a positive factor (and positive numbers in {', '.join(used[1:])})")
        ids = ([] if self.bos_id is None else [self.bos_id]) + list(self.eos_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise InfengError(f"{where}: bos/eos token ids must be integers, got {ids}")

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim/2] (f32), with the configured scaling applied."""
        hd = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
        inv = inv.astype(np.float32)
        rs = self.rope_scaling
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind == "linear":
                inv = (inv / np.float32(rs["factor"])).astype(np.float32)
            elif kind == "llama3":
                inv = _llama3_scale(inv, rs)
        return np.ascontiguousarray(inv, dtype=np.float32)


def _llama3_scale(inv: np.ndarray, rs: dict[str, Any]) -> np.ndarray:
    """Llama 3.1's frequency-dependent scaling: long wavelengths slowed by `factor`, short kept,
    a smooth blend between (as transformers' _compute_llama3_parameters)."""
    factor = float(rs["factor"])
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    wl = 2 * math.pi / inv
    out = np.where(wl > low_wl, inv / factor, inv)
    smooth = (old_ctx / wl - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    mid = ~(wl < high_wl) & ~(wl > low_wl)
    return np.where(mid, smoothed, out).astype(np.float32)
