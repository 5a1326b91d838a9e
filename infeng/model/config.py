"""Model configuration of the supported decoder architectures, parsed from a Hugging Face config.json.

Only what the forward pass implements is accepted. Every architecture has an explicit list of the
config keys it may carry (config_keys.py); a key outside it, or a known key whose value would
change the math in a way not implemented (biases, another activation, an unknown RoPE type), is
refused with one line naming it — so a transformers release that moves a field fails loudly
instead of computing something else. Both RoPE layouts are read: 4.x's top-level ``rope_theta`` +
``rope_scaling`` and 5.x's ``rope_parameters``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from infeng.errors import InfengError
from infeng.model.config_keys import (ARCH_KEYS, ARCHITECTURES, DEFAULT_THETA, DEFAULT_TIE, FIXED, GGUF_ONLY_ROPE,
                                      INFO_KEYS, ROPE_KEYS)

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
        if self.arch not in ARCH_KEYS:
            raise InfengError(f"{where}: architecture {self.arch!r} is not supported (supported: {', '.join(ARCH_KEYS)})")
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
        elif kind == "longrope":      # the short factors: the context is capped at the original length
            inv = (1.0 / (np.asarray(rs["short_factor"], np.float32) * base)).astype(np.float32)
        elif kind == "freq_factors":
            inv = (inv / np.asarray(rs["factors"], np.float32)).astype(np.float32)
        # dynamic (NTK): the plain frequencies up to max_position_embeddings (transformers rescales
        # only past it, where the context stops)
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


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_rope(rs: Any, head_dim: int, where: str) -> None:
    """A normalised rope_scaling dict: a known type, only its own keys, numbers where numbers go."""
    kind = rs.get("rope_type") if isinstance(rs, dict) else None
    if kind not in ROPE_KEYS or kind == "default":
        raise InfengError(f"{where}: rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    for k, v in rs.items():
        if k == "rope_type":
            continue
        if k not in ROPE_KEYS[kind]:
            raise InfengError(f"{where}: rope_scaling key {k!r} is not understood for rope_type {kind!r} "
                              f"(known: {', '.join(sorted(ROPE_KEYS[kind]))})")
        if k in ("short_factor", "long_factor", "factors"):
            if not isinstance(v, list) or len(v) != head_dim // 2 or not all(_is_num(x) and x > 0 for x in v):
                raise InfengError(f"{where}: rope_scaling.{k} must be {head_dim // 2} positive numbers")
        elif k == "truncate":
            if not isinstance(v, bool):
                raise InfengError(f"{where}: rope_scaling.truncate must be true or false")
        elif v is not None and not (_is_num(v) and v > 0):
            raise InfengError(f"{where}: rope_scaling.{k} must be a positive number, got {v!r}")
    if rs.get("factor") is None and kind not in ("longrope", "freq_factors"):
        raise InfengError(f"{where}: rope_scaling type {kind!r} needs a positive factor")
    need = {"longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
            "yarn": ("original_max_position_embeddings",), "freq_factors": ("factors",)}.get(kind, ())
    if not all(rs.get(k) is not None for k in need):
        raise InfengError(f"{where}: rope_scaling type {kind!r} needs {', '.join(need)}")


def from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Parse a Hugging Face config.json dict, refusing what the engine does not implement."""
    if not isinstance(hf, dict):
        raise InfengError(f"{where}: not a JSON object")
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):          # {"architectures": 4} was a TypeError (found by fuzzing)
        archs = [archs]
    name = next((a for a in archs if isinstance(a, str) and a in ARCHITECTURES), None)
    if name is None:
        got = ", ".join(map(str, archs)) or f"model_type {hf.get('model_type')!r}"
        raise InfengError(f"{where}: architecture {got} is not supported (supported: {', '.join(ARCHITECTURES)})")
    arch = ARCHITECTURES[name]
    allowed = ARCH_KEYS[arch]
    for key in hf:
        if key not in allowed and key not in INFO_KEYS:
            raise InfengError(f"{where}: key {key!r} is not understood for {name} (the engine refuses config "
                              "keys it does not know rather than ignore something that may change the math)")
    for key, ok in FIXED.items():
        if key in hf and hf[key] not in ok:
            raise InfengError(f"{where}: {key}={_show(hf[key])} is not supported (supported: "
                              f"{', '.join(_show(v) for v in ok if v is not None)})")

    def need(key):
        if key not in hf:
            raise InfengError(f"{where}: missing required field {key!r}")
        return hf[key]

    dim = need("hidden_size")
    n_heads = need("num_attention_heads")
    n_layers = need("num_hidden_layers")
    head_dim = hf.get("head_dim") or (dim // n_heads if isinstance(dim, int) and isinstance(n_heads, int) and n_heads else 0)
    max_pos = hf.get("max_position_embeddings", 2048)
    theta, rs = _rope(hf, arch, where)
    if rs is not None:
        kind = rs["rope_type"]
        if kind in GGUF_ONLY_ROPE:
            raise InfengError(f"{where}: rope_scaling type {kind!r} is not supported (supported: "
                              f"{', '.join(t for t in ROPE_TYPES if t not in GGUF_ONLY_ROPE)})")
        if arch == "phi3" and kind in ("su", "yarn"):       # transformers' Phi-3 reads both as longrope
            rs["rope_type"] = kind = "longrope"
        if kind in ("llama3", "yarn", "longrope"):          # as transformers' standardize_rope_params
            if "original_max_position_embeddings" in hf:
                rs["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
            rs.setdefault("original_max_position_embeddings", max_pos)
        if kind in ("yarn", "longrope") and rs.get("factor") is None and _is_num(max_pos) \
                and _is_num(rs["original_max_position_embeddings"]) and rs["original_max_position_embeddings"] > 0:
            rs["factor"] = max_pos / rs["original_max_position_embeddings"]
        check_rope(rs, head_dim if isinstance(head_dim, int) else 0, where)
        if kind == "longrope" and isinstance(max_pos, int):
            # past the original length transformers switches to long_factor on the fly: not implemented,
            # so the context stops there
            max_pos = min(max_pos, int(rs["original_max_position_embeddings"]))
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    nope = _nope_layers(hf, arch, n_layers, where)
    window, swa = _sliding_window(hf, arch, n_layers, nope, where)
    cfg = ModelConfig(
        dim=dim, hidden_dim=need("intermediate_size"), n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim,
        vocab_size=need("vocab_size"), max_seq_len=max_pos,
        norm_eps=_number(hf.get("rms_norm_eps", 1e-6)), rope_theta=_number(theta),
        tie_embeddings=bool(hf.get("tie_word_embeddings", DEFAULT_TIE[arch])),
        rope_scaling=rs, bos_id=hf.get("bos_token_id"), eos_ids=eos_ids, arch=arch,
        qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", sliding_window=window, swa_layers=swa,
        nope_layers=nope,
    )
    cfg.validate(where, HF_NAMES)
    return cfg


def _show(v: Any) -> str:
    return {True: "true", False: "false"}.get(v, repr(v)) if isinstance(v, bool) else repr(v)


def _rope(hf: dict[str, Any], arch: str, where: str) -> tuple[Any, dict[str, Any] | None]:
    """(theta, normalised rope_scaling or None) from either layout; both present must agree."""
    params = hf.get("rope_parameters")
    if params is not None:                    # transformers 5.x
        if not isinstance(params, dict):
            raise InfengError(f"{where}: rope_parameters must be an object")
        params = dict(params)
        kind = params.pop("rope_type", params.pop("type", "default"))
        theta = params.pop("rope_theta", None)
        if theta is None:
            raise InfengError(f"{where}: rope_parameters has no rope_theta")
        _no_partial_rotary(params, "rope_parameters", where)
        for k, v in (("rope_theta", theta), ("rope_scaling", None)):
            if hf.get(k) is not None and (k == "rope_scaling" or hf[k] != v):
                raise InfengError(f"{where}: both rope_parameters and a top-level {k} are set; which one "
                                  "transformers would use is ambiguous")
        rs = None if kind == "default" else {"rope_type": kind, **params}
        if kind == "default" and params:
            raise InfengError(f"{where}: rope_parameters key {sorted(params)[0]!r} is not understood for rope_type 'default'")
        return theta, rs
    theta = hf.get("rope_theta", DEFAULT_THETA[arch])
    rs = hf.get("rope_scaling")
    if rs is None:
        return theta, None
    if not isinstance(rs, dict):
        raise InfengError(f"{where}: rope_scaling must be an object or null")
    rs = dict(rs)
    _no_partial_rotary(rs, "rope_scaling", where)
    kind = rs.pop("rope_type", None)
    old = rs.pop("type", None)                # the pre-4.45 spelling; equal when both present
    if kind is not None and old is not None and kind != old:
        raise InfengError(f"{where}: rope_scaling has type {old!r} and rope_type {kind!r}")
    kind = kind or old
    if kind == "default":
        if rs:
            raise InfengError(f"{where}: rope_scaling key {sorted(rs)[0]!r} is not understood for rope_type 'default'")
        return theta, None
    return theta, {"rope_type": kind, **rs}


def _no_partial_rotary(params: dict[str, Any], name: str, where: str) -> None:
    """transformers 5.x files partial_rotary_factor with the RoPE parameters: only 1.0 runs here."""
    prf = params.pop("partial_rotary_factor", None)
    if prf not in (1, 1.0, None):
        raise InfengError(f"{where}: {name}.partial_rotary_factor={prf!r} is not supported (1.0)")


def _sliding_window(hf: dict[str, Any], arch: str, n_layers: Any, nope: tuple[int, ...],
                    where: str) -> tuple[int, tuple[int, ...]]:
    """(window, windowed layers) as transformers derives them: Mistral / Phi-3 window every layer;
    Qwen2/3 and SmolLM3 only with use_sliding_window — from layer max_window_layers on (Qwen), on
    the NoPE layers (SmolLM3) — unless layer_types lists them."""
    w = hf.get("sliding_window")
    if w is not None and not (isinstance(w, int) and not isinstance(w, bool) and w >= 0):
        raise InfengError(f"{where}: sliding_window must be a non-negative integer or null, got {w!r}")
    if arch in ("qwen2", "qwen3", "smollm3") and not hf.get("use_sliding_window", False):
        w = None
    n = n_layers if isinstance(n_layers, int) and not isinstance(n_layers, bool) and n_layers > 0 else 0
    types = hf.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n or not all(t in ("full_attention", "sliding_attention") for t in types):
            raise InfengError(f"{where}: layer_types must list {n} of 'full_attention' / 'sliding_attention'")
        swa = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        if swa and not w:
            raise InfengError(f"{where}: layer_types has sliding_attention layers but no sliding window is in force "
                              f"(sliding_window={hf.get('sliding_window')!r}, use_sliding_window="
                              f"{hf.get('use_sliding_window')!r})")
        return (w or 0) if swa else 0, swa
    if not w:
        return 0, ()
    if arch in ("mistral", "phi3"):
        return w, tuple(range(n))
    if arch == "smollm3":
        return w, nope
    first = hf.get("max_window_layers", 28)
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise InfengError(f"{where}: max_window_layers must be a non-negative integer, got {first!r}")
    swa = tuple(range(min(first, n), n))
    return (w, swa) if swa else (0, ())


def _nope_layers(hf: dict[str, Any], arch: str, n_layers: Any, where: str) -> tuple[int, ...]:
    """SmolLM3: no_rope_layers[i] == 0 marks a layer without RoPE (default every fourth)."""
    if arch != "smollm3" or not isinstance(n_layers, int) or n_layers <= 0:
        return ()
    flags = hf.get("no_rope_layers")
    if flags is None:
        every = hf.get("no_rope_layer_interval", 4)
        if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
            raise InfengError(f"{where}: no_rope_layer_interval must be a positive integer, got {every!r}")
        flags = [int((i + 1) % every != 0) for i in range(n_layers)]
    if not isinstance(flags, list) or len(flags) != n_layers or not all(f in (0, 1) for f in flags):
        raise InfengError(f"{where}: no_rope_layers must list {n_layers} flags of 0 or 1")
    return tuple(i for i, f in enumerate(flags) if not f)


def _number(v: Any) -> Any:
    """float(v) for a JSON number; anything else as it is, for validate() to refuse by name."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


HF_NAMES = {"dim": "hidden_size", "hidden_dim": "intermediate_size", "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size",
            "max_seq_len": "max_position_embeddings", "head_dim": "head_dim"}
