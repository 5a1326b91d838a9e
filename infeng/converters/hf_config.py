"""Hugging Face config.json → ModelConfig, refusing what the engine does not implement.

Every architecture has an explicit list of the config keys it may carry (hf_keys.py); a key
outside it, or a known key whose value would change the math in a way not implemented (biases,
another activation, an unknown RoPE type), is refused with one line naming it — so a transformers
release that moves a field fails loudly instead of computing something else. Both RoPE layouts are
read: 4.x's top-level ``rope_theta`` + ``rope_scaling`` and 5.x's ``rope_parameters``.
"""
from __future__ import annotations

from typing import Any

from infeng.converters.hf_keys import ARCH_KEYS, ARCHITECTURES, DEFAULT_THETA, DEFAULT_TIE, FIXED, INFO_KEYS
from infeng.errors import InfengError
from infeng.format.config import GGUF_ONLY_ROPE, ROPE_TYPES, ModelConfig, is_number, check_rope


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
    if isinstance(n_layers, int) and n_layers > 1 << 16:      # per-layer lists below would be absurd
        raise InfengError(f"{where}: num_hidden_layers {n_layers} is not a plausible model")
    head_dim = hf.get("head_dim") or (dim // n_heads if isinstance(dim, int) and isinstance(n_heads, int) and n_heads else 0)
    max_pos = hf.get("max_position_embeddings", 2048)
    theta, rs = _rope(hf, arch, where)
    if rs is not None:
        kind = rs["rope_type"]
        if not isinstance(kind, str):
            raise InfengError(f"{where}: rope_type must be a string, got {kind!r}")
        if kind in GGUF_ONLY_ROPE:
            raise InfengError(f"{where}: rope_scaling type {kind!r} is not supported (supported: "
                              f"{', '.join(t for t in ROPE_TYPES if t not in GGUF_ONLY_ROPE)})")
        if arch == "phi3" and kind in ("su", "yarn"):       # transformers' Phi-3 reads both as longrope
            rs["rope_type"] = kind = "longrope"
        if kind in ("llama3", "yarn", "longrope"):          # as transformers' standardize_rope_params
            if "original_max_position_embeddings" in hf:
                rs["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
            if rs.get("original_max_position_embeddings") is None:
                rs["original_max_position_embeddings"] = max_pos
        if kind in ("yarn", "longrope") and rs.get("factor") is None and is_number(max_pos) \
                and is_number(rs["original_max_position_embeddings"]) and rs["original_max_position_embeddings"] > 0:
            rs["factor"] = max_pos / rs["original_max_position_embeddings"]
        if kind == "dynamic" and isinstance(max_pos, int) and is_number(rs.get("factor")) and rs["factor"] >= 1:
            # transformers grows the RoPE base once a sequence passes max_position_embeddings, without
            # an end; the context runs to factor times that (ModelConfig.rope_past / inv_freq_at)
            rs["original_max_position_embeddings"] = max_pos
            max_pos = int(max_pos * rs["factor"])
        check_rope(rs, head_dim if isinstance(head_dim, int) else 0, where)
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
