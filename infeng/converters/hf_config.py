"""Hugging Face config.json → ModelConfig, refusing what the engine does not implement."""
from __future__ import annotations

from typing import Any

from infeng.errors import InfengError
from infeng.format.config import ModelConfig, ROPE_TYPES

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}


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
