"""Model configuration: the Llama family, parsed from a Hugging Face config.json.

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

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
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


def from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Parse a Hugging Face config.json dict, refusing what the engine does not implement."""
    if not isinstance(hf, dict):
        raise InfengError(f"{where}: not a JSON object")
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):          # {"architectures": 4} was a TypeError (found by fuzzing)
        archs = [archs]
    arch = next((a for a in archs if isinstance(a, str) and a in ARCHITECTURES), None)
    if arch is None:
        got = ", ".join(map(str, archs)) or f"model_type {hf.get('model_type')!r}"
        raise InfengError(f"{where}: architecture {got} is not supported (supported: {', '.join(ARCHITECTURES)})")

    def need(key):
        if key not in hf:
            raise InfengError(f"{where}: missing required field {key!r}")
        return hf[key]

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise InfengError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise InfengError(f"{where}: {flag}=true is not supported")
    if hf.get("sliding_window") not in (None, 0) and hf.get("use_sliding_window", True):
        raise InfengError(f"{where}: sliding_window={hf['sliding_window']} is not supported")
    if hf.get("pretraining_tp", 1) not in (None, 1):
        raise InfengError(f"{where}: pretraining_tp={hf['pretraining_tp']} is not supported")
    rs = hf.get("rope_scaling")
    if rs is not None:
        kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else None
        if kind not in ROPE_TYPES:
            raise InfengError(f"{where}: rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if kind == "default":
            rs = None
        elif not isinstance(rs.get("factor"), (int, float)) or rs["factor"] <= 0:
            raise InfengError(f"{where}: rope_scaling.factor must be a positive number")
    dim = need("hidden_size")
    n_heads = need("num_attention_heads")
    head_dim = hf.get("head_dim") or (dim // n_heads if isinstance(dim, int) and isinstance(n_heads, int) and n_heads else 0)
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    cfg = ModelConfig(
        dim=dim, hidden_dim=need("intermediate_size"), n_layers=need("num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim,
        vocab_size=need("vocab_size"), max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=_number(hf.get("rms_norm_eps", 1e-6)), rope_theta=_number(hf.get("rope_theta", 10000.0)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_scaling=rs,
        bos_id=hf.get("bos_token_id"), eos_ids=eos_ids,
    )
    cfg.validate(where, HF_NAMES)
    return cfg


def _number(v: Any) -> Any:
    """float(v) for a JSON number; anything else as it is, for validate() to refuse by name."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


HF_NAMES = {"dim": "hidden_size", "hidden_dim": "intermediate_size", "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size",
            "max_seq_len": "max_position_embeddings", "head_dim": "head_dim"}
