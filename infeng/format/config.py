"""Model configuration as a native manifest stores it: the supported decoder architectures and
their per-layer parts, and the RoPE math of every RoPE type one of them ships.

Only what the forward pass implements is accepted; a manifest naming another architecture, RoPE
type or RoPE parameter is refused with one line naming it (converters/hf_config.py parses
config.json, converters/gguf_read.py GGUF metadata, both into this).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from infeng.errors import InfengError

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3")
# RoPE types and the parameters each may carry (besides rope_type / rope_theta)
ROPE_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor", "original_max_position_embeddings"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
    "yarn": frozenset({"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim", "truncate"}),
    "longrope": frozenset({"short_factor", "long_factor", "factor", "original_max_position_embeddings",
                           "attention_factor"}),
    # not a transformers type: a GGUF's rope_freqs tensor (llama.cpp's Llama 3 scaling), each
    # frequency divided by its factor; refused in a config.json
    "freq_factors": frozenset({"factors"}),
}
GGUF_ONLY_ROPE = ("freq_factors",)
ROPE_TYPES = tuple(ROPE_KEYS)


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
    rope_scaling: dict[str, Any] | None = None   # normalised: {"rope_type": ..., its parameters}
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    arch: str = "llama"      # llama, mistral, qwen2, qwen3, phi3, smollm3 (the model file records it)
    qkv_bias: bool = False   # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False    # per-head RMSNorm of q and k before RoPE (Qwen3)
    sliding_window: int = 0  # attention sees the last `sliding_window` positions on swa_layers
    swa_layers: tuple[int, ...] = ()
    nope_layers: tuple[int, ...] = ()             # layers that skip RoPE (SmolLM3)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def layer_window(self, i: int) -> int:
        """Positions layer i attends to (0: all of them)."""
        return self.sliding_window if i in self.swa_layers else 0

    def layer_rope(self, i: int) -> bool:
        return i not in self.nope_layers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("eos_ids", "swa_layers", "nope_layers"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "ModelConfig":
        try:
            d = dict(d)
            for k in ("eos_ids", "swa_layers", "nope_layers"):
                v = d.get(k, ())
                d[k] = tuple(v) if isinstance(v, (list, tuple)) else v
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
        if self.rope_theta <= 1:
            raise InfengError(f"{where}: rope_theta must be greater than 1, got {self.rope_theta!r}")
        if self.arch not in ARCHS:
            raise InfengError(f"{where}: architecture {self.arch!r} is not supported (supported: {', '.join(ARCHS)})")
        if self.rope_scaling is not None:        # a native manifest's is checked here too: inv_freq() reads it
            check_rope(self.rope_scaling, self.head_dim, where)
        if not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool) or self.sliding_window < 0:
            raise InfengError(f"{where}: sliding_window must be a non-negative integer, got {self.sliding_window!r}")
        for k in ("swa_layers", "nope_layers"):
            v = getattr(self, k)
            if not isinstance(v, tuple) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                   and 0 <= i < self.n_layers for i in v):
                raise InfengError(f"{where}: {k} must list layer indices below {self.n_layers}, got {v!r}")
        if self.swa_layers and not self.sliding_window:
            raise InfengError(f"{where}: sliding-window layers {list(self.swa_layers)} but no sliding_window size")
        ids = ([] if self.bos_id is None else [self.bos_id]) + list(self.eos_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise InfengError(f"{where}: bos/eos token ids must be integers, got {ids}")

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim/2] (f32), with the configured scaling applied."""
        hd = self.head_dim
        base = (np.float32(self.rope_theta) ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
        inv = (1.0 / base).astype(np.float32)
        rs = self.rope_scaling
        kind = rs["rope_type"] if rs else "default"
        if kind == "linear":
            inv = (inv / np.float32(rs["factor"])).astype(np.float32)
        elif kind == "llama3":
            inv = _llama3_scale(inv, rs)
        elif kind == "yarn":
            inv = _yarn_inv_freq(base, float(self.rope_theta), rs, hd)
        elif kind == "longrope":      # the short factors (up to the original length: rope_past)
            inv = (1.0 / (np.asarray(rs["short_factor"], np.float32) * base)).astype(np.float32)
        elif kind == "freq_factors":
            inv = (inv / np.asarray(rs["factors"], np.float32)).astype(np.float32)
        # dynamic (NTK): the plain frequencies up to the original length (rope_past)
        return np.ascontiguousarray(inv, dtype=np.float32)

    def rope_past(self) -> int:
        """The original length past which the RoPE frequencies depend on how long the sequence
        is (LongRoPE, dynamic NTK; 0 for every other type). As transformers computes them, a
        forward call whose highest position is ``extent - 1`` uses ``inv_freq_at(extent)`` for
        all its tokens: a prompt its own length's, each decoded token ``position + 1``'s."""
        rs = self.rope_scaling
        kind = rs["rope_type"] if rs else "default"
        if kind == "longrope":
            return int(rs["original_max_position_embeddings"])
        if kind == "dynamic":
            return int(rs.get("original_max_position_embeddings") or self.max_seq_len)
        return 0

    def inv_freq_at(self, extent: int) -> np.ndarray:
        """The frequencies of a forward call over positions < ``extent`` (see rope_past):
        LongRoPE's long factors past the original length, dynamic NTK's base grown with the
        length (as transformers' _compute_longrope_parameters / _compute_dynamic_ntk_parameters)."""
        orig = self.rope_past()
        if not orig or extent <= orig:
            return self.inv_freq()
        rs, hd = self.rope_scaling, self.head_dim
        exps = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
        if rs["rope_type"] == "longrope":
            base = np.float32(self.rope_theta) ** exps
            inv = 1.0 / (np.asarray(rs["long_factor"], np.float32) * base)
        else:
            f = float(rs["factor"])
            theta = self.rope_theta * ((f * extent / orig) - (f - 1)) ** (hd / (hd - 2))
            inv = 1.0 / (np.float32(theta) ** exps)
        return np.ascontiguousarray(inv, dtype=np.float32)

    def attn_factor(self) -> float:
        """The factor YaRN / LongRoPE multiply cos and sin by; applied to RoPE layers as factor²
        on the attention scores (q·k carries it twice)."""
        rs = self.rope_scaling
        kind = rs["rope_type"] if rs else "default"
        if kind == "yarn":
            return _yarn_attention_factor(rs)
        if kind == "longrope":
            if rs.get("attention_factor") is not None:
                return float(rs["attention_factor"])
            f = float(rs["factor"])
            return 1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(rs["original_max_position_embeddings"]))
        return 1.0


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


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def _yarn_attention_factor(rs: dict[str, Any]) -> float:
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    f, m, m_all = float(rs["factor"]), rs.get("mscale"), rs.get("mscale_all_dim")
    if m and m_all:
        return _yarn_mscale(f, m) / _yarn_mscale(f, m_all)
    return _yarn_mscale(f)


def _yarn_inv_freq(base: np.ndarray, theta: float, rs: dict[str, Any], hd: int) -> np.ndarray:
    """YaRN: interpolated (slowed by factor) below a wavelength band, extrapolated (kept) above it,
    a linear ramp between; the band's edges from beta_fast / beta_slow rotations over the original
    context (as transformers' _compute_yarn_parameters)."""
    factor = float(rs["factor"])
    old = float(rs["original_max_position_embeddings"])
    fast, slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)

    def corr(rot):
        return (hd * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(theta))
    lo, hi = corr(fast), corr(slow)
    if rs.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, hd - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(hd // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1).astype(np.float32)
    extra = (1 - ramp).astype(np.float32)
    inv_e, inv_i = (1.0 / base).astype(np.float32), (1.0 / (np.float32(factor) * base)).astype(np.float32)
    return (inv_i * (1 - extra) + inv_e * extra).astype(np.float32)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_rope(rs: Any, head_dim: int, where: str) -> None:
    """A normalised rope_scaling dict: a known type, only its own keys, numbers where numbers go."""
    kind = rs.get("rope_type") if isinstance(rs, dict) else None
    if not isinstance(kind, str) or kind not in ROPE_KEYS or kind == "default":
        raise InfengError(f"{where}: rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    for k, v in rs.items():
        if k == "rope_type":
            continue
        if k not in ROPE_KEYS[kind]:
            raise InfengError(f"{where}: rope_scaling key {k!r} is not understood for rope_type {kind!r} "
                              f"(known: {', '.join(sorted(ROPE_KEYS[kind]))})")
        if k in ("short_factor", "long_factor", "factors"):
            if not isinstance(v, list) or len(v) != head_dim // 2 or not all(is_number(x) and x > 0 for x in v):
                raise InfengError(f"{where}: rope_scaling.{k} must be {head_dim // 2} positive numbers")
        elif k == "truncate":
            if not isinstance(v, bool):
                raise InfengError(f"{where}: rope_scaling.truncate must be true or false")
        elif v is not None and not (is_number(v) and v > 0):
            raise InfengError(f"{where}: rope_scaling.{k} must be a positive number, got {v!r}")
        elif k == "original_max_position_embeddings" and v is not None and v < 2:
            raise InfengError(f"{where}: rope_scaling.original_max_position_embeddings must be at least 2, got {v!r}")
    if rs.get("factor") is None and kind not in ("longrope", "freq_factors"):
        raise InfengError(f"{where}: rope_scaling type {kind!r} needs a positive factor")
    need = {"longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
            "yarn": ("original_max_position_embeddings",), "freq_factors": ("factors",)}.get(kind, ())
    if not all(rs.get(k) is not None for k in need):
        raise InfengError(f"{where}: rope_scaling type {kind!r} needs {', '.join(need)}")
