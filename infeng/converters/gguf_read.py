"""GGUF → a model's parts: ``read_llama`` turns a GGUF of any supported architecture
(gguf_arch.py; the name is from when only Llama was) into config, native tensors and tokenizer (via
gguf_tokenizer), on top of the strict container reader in gguf_file.py.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import numpy as np

from infeng import format as native
from infeng.converters import gguf_arch, gguf_types
from infeng.converters.gguf_file import MAGIC, GGUFFile, GGUFTensor
from infeng.converters.gguf_tokenizer import build as build_tokenizer
from infeng.converters.gguf_types import NATIVE_COPY
from infeng.errors import InfengError
from infeng.format.config import ModelConfig
from infeng.format.schema import STORE_DTYPES, convert_dtype, expected_shapes, is_norm


ARCHITECTURES = tuple(gguf_arch.FROM_GGUF)  # llama.cpp converts Llama, Mistral, TinyLlama, SmolLM2 as "llama"
K_QUANT_DTYPE = "bf16"


def native_name(gguf_name: str) -> str | None:
    if gguf_name in gguf_arch.GLOBAL:
        return gguf_arch.GLOBAL[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in gguf_arch.LAYER:
        return f"layers.{int(parts[1])}.{gguf_arch.LAYER[parts[2]]}"
    return None


def _fused_parts(gguf_name: str, arch: str) -> tuple[int, tuple[str, ...]] | None:
    """(layer, native names its rows hold) for a fused tensor of ``arch`` (Phi-3), else None."""
    parts = gguf_name.split(".", 2)
    fused = gguf_arch.FUSED.get(arch, {})
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in fused:
        return int(parts[1]), fused[parts[2]]
    return None


def unpermute_rope(arr: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of wq/wk from GGML's interleaved RoPE pairs back to Hugging Face's rotate-half order
    (the inverse of gguf_write._permute_rope; rows are whole blocks, so quantized rows move too)."""
    rows = arr.shape[0]
    return np.ascontiguousarray(arr.reshape(n_heads, rows // n_heads // 2, 2, *arr.shape[1:])
                                .swapaxes(1, 2).reshape(arr.shape))


def store_k_quant(t: GGUFTensor, raw: np.ndarray, dtype: str) -> tuple[str, np.ndarray]:
    """A GGML type the native format has no dtype for (gguf_types.DEQUANTIZE minus NATIVE_COPY):
    dequantized with numpy and stored as ``dtype`` (bf16 by default: its rounding, at most 2^-9
    relative, is far below a 4–6-bit quantization step). Every type in DEQUANTIZE is a copy today."""
    f = gguf_types.dequantize(t.type_name, raw, t.n_elements).reshape(t.shape)
    return dtype, convert_dtype(f, "f32", dtype)


def _config(g: GGUFFile, arch: str, where: str):
    """The model config from ``{arch}.*`` metadata (unknown keys refused by name) and the RoPE
    factor tensors; vocabulary size 0 when the file does not say (the tokenizer does)."""
    for key in g.metadata:
        short = key[len(arch) + 1:] if key.startswith(arch + ".") else None
        if short is None:
            continue
        if short in gguf_arch.HP_FIXED:
            if g.metadata[key] not in gguf_arch.HP_FIXED[short]:
                raise InfengError(f"{where}: {key}={g.metadata[key]!r} is not supported")
        elif short not in gguf_arch.HP_KEYS:
            raise InfengError(f"{where}: metadata key {key!r} is not understood for architecture {arch!r} (the "
                              "engine refuses keys it does not know rather than ignore something that may change the math)")

    def hp(key, kind="int", default=None):
        return g.get(f"{arch}.{key}", kind, default, required=default is None)
    dim, n_heads = hp("embedding_length"), hp("attention.head_count")
    head_dim = hp("attention.key_length", default=dim // n_heads if n_heads > 0 else 0)
    if hp("attention.value_length", default=head_dim) != head_dim:
        raise InfengError(f"{where}: attention.value_length differs from key_length (not supported)")
    if hp("rope.dimension_count", default=head_dim) != head_dim:
        raise InfengError(f"{where}: {arch}.rope.dimension_count {hp('rope.dimension_count')} != head size "
                          f"{head_dim}: partial rotary embedding is not supported")
    n_layers, max_pos = hp("block_count"), hp("context_length")
    if n_layers > 4096 or dim > 1 << 20:      # before per-layer lists are built from them
        raise InfengError(f"{where}: {n_layers} layers of width {dim} is not a plausible model")
    window = hp("attention.sliding_window", default=0)
    if window and arch != "phi3":
        raise InfengError(f"{where}: {arch}.attention.sliding_window={window} is not supported for {arch!r}")
    rope_scaling = _rope_scaling(g, arch, hp, head_dim, where)
    every = gguf_arch.NOPE_EVERY.get(arch)
    nope = tuple(i for i in range(n_layers) if (i + 1) % every == 0) if every and isinstance(n_layers, int) else ()
    return ModelConfig(
        dim=dim, hidden_dim=hp("feed_forward_length"), n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=hp("attention.head_count_kv", default=n_heads), head_dim=head_dim,
        vocab_size=hp("vocab_size", default=0), max_seq_len=max_pos,
        norm_eps=float(hp("attention.layer_norm_rms_epsilon", "float")),
        rope_theta=float(hp("rope.freq_base", "float", 10000.0)), tie_embeddings=False,
        rope_scaling=rope_scaling, arch=gguf_arch.FROM_GGUF[arch], qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
        sliding_window=window, swa_layers=tuple(range(n_layers)) if window and isinstance(n_layers, int) else (),
        nope_layers=nope)


def _rope_scaling(g: GGUFFile, arch: str, hp, head_dim: int, where: str):
    """llama.cpp's rope.scaling.* keys and factor tensors as a transformers-style rope_scaling."""
    kind = hp("rope.scaling.type", "str", "none")
    has = {n: n in g.tensors for n in gguf_arch.ROPE_TENSORS}
    if has["rope_freqs.weight"]:             # llama.cpp's Llama 3 scaling: a divisor per frequency
        if kind not in ("none", ""):
            raise InfengError(f"{where}: has rope_freqs.weight and {arch}.rope.scaling.type {kind!r}")
        t = g.tensors["rope_freqs.weight"]
        if t.type_name != "F32" or t.shape != (head_dim // 2,):
            raise InfengError(f"{where}: rope_freqs.weight must be F32 [{head_dim // 2}]")
        return {"rope_type": "freq_factors", "factors": g.raw(t.name).view("<f4").astype(float).tolist()}
    if has["rope_factors_short.weight"] or has["rope_factors_long.weight"]:
        if not (has["rope_factors_short.weight"] and has["rope_factors_long.weight"]):
            raise InfengError(f"{where}: has only one of rope_factors_short / rope_factors_long")
        factors = {}
        for which in ("short", "long"):
            t = g.tensors[f"rope_factors_{which}.weight"]
            if t.type_name != "F32" or t.shape != (head_dim // 2,):
                raise InfengError(f"{where}: rope_factors_{which}.weight must be F32 [{head_dim // 2}]")
            factors[which] = g.raw(t.name).view("<f4").astype(float).tolist()
        orig = hp("rope.scaling.original_context_length", default=hp("context_length"))
        if orig < 2:
            raise InfengError(f"{where}: {arch}.rope.scaling.original_context_length must be at least 2, got {orig}")
        rs = {"rope_type": "longrope", "short_factor": factors["short"], "long_factor": factors["long"],
              "original_max_position_embeddings": orig,
              "factor": hp("context_length") / orig}
        attn = hp("rope.scaling.attn_factor", "float", 0.0)
        if attn:
            rs["attention_factor"] = float(attn)
        return rs
    if kind in ("none", ""):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(hp("rope.scaling.factor", "float"))}
    if kind == "yarn":
        rs = {"rope_type": "yarn", "factor": float(hp("rope.scaling.factor", "float")),
              "original_max_position_embeddings": hp("rope.scaling.original_context_length")}
        for key, name in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow"),
                          ("rope.scaling.attn_factor", "attention_factor")):
            v = hp(key, "float", 0.0)
            if v:
                rs[name] = float(v)
        return rs
    raise InfengError(f"{where}: {arch}.rope.scaling.type {kind!r} is not supported (none, linear, yarn)")


def read_llama(path: str | os.PathLike, k_quant_dtype: str | None = None, recode: dict | None = None):
    """A GGUF's parts (tensors of gguf_types.NATIVE_COPY types — F32/F16/BF16,
    Q8_0/Q4_0/Q5_0/Q4_1/Q5_1, Q4_K/Q5_K/Q6_K — are views of the file, norms become f32; matrices
    of a type in ``recode`` (GGML name → (native dtype, fn(raw, N, K) → its bytes, exact?): the
    quant layer's gguf_recode.RECODE, handed down by the loader) are recoded into that type, other
    dequantizable types go through ``store_k_quant``): (config, {native name: (dtype, array)},
    tokenizer dict, summary dict; its "recoded" says which types became what, in how many tensors)."""
    recode = recode or {}

    k_dtype = k_quant_dtype or K_QUANT_DTYPE
    if k_dtype not in STORE_DTYPES:
        raise InfengError(f"--dtype {k_dtype!r}: must be one of {', '.join(STORE_DTYPES)}")
    g = GGUFFile(path)
    where = str(g.path)
    arch = g.get("general.architecture", "str", required=True)
    if arch not in ARCHITECTURES:
        raise InfengError(f"{where}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    cfg = _config(g, arch, where)
    tok, bos_id, eos_ids = build_tokenizer(g, where)
    n_vocab = len(g.metadata["tokenizer.ggml.tokens"])
    cfg = replace(cfg, bos_id=bos_id, eos_ids=eos_ids, vocab_size=cfg.vocab_size or n_vocab,
                  tie_embeddings="output.weight" not in g.tensors)
    if cfg.n_layers > 4096 or cfg.dim > 1 << 20:
        raise InfengError(f"{where}: {cfg.n_layers} layers of width {cfg.dim} is not a plausible model")
    cfg.validate(where, {k: f"{arch}.{v}" for k, v in (
        ("dim", "embedding_length"), ("hidden_dim", "feed_forward_length"), ("n_layers", "block_count"),
        ("n_heads", "attention.head_count"), ("n_kv_heads", "attention.head_count_kv"),
        ("head_dim", "attention.key_length"), ("max_seq_len", "context_length"), ("vocab_size", "vocab_size"))})
    if cfg.vocab_size != n_vocab:
        raise InfengError(f"{where}: {arch}.vocab_size {cfg.vocab_size} != {n_vocab} tokens in tokenizer.ggml.tokens")

    shapes = expected_shapes(cfg)
    by_native: dict[str, tuple[GGUFTensor, int, int]] = {}    # native → (tensor, first row, end row)
    for name, t in g.tensors.items():
        if name in gguf_arch.ROPE_TENSORS:
            continue                                           # read by _config
        fused = _fused_parts(name, arch)
        if fused is not None and fused[0] < cfg.n_layers:
            layer, parts = fused
            row = 0
            for part in parts:
                n = shapes[f"layers.{layer}.{part}"][0]
                by_native[f"layers.{layer}.{part}"] = (t, row, row + n)
                row += n
            if t.shape != (row, cfg.dim):
                raise InfengError(f"{where}: tensor {name!r} has shape {list(t.shape)} (numpy order), the "
                                  f"hyper-parameters say {[row, cfg.dim]}")
            continue
        nn = native_name(name)
        if nn is None or nn not in shapes:
            raise InfengError(f"{where}: tensor {name!r} is not part of a {arch} model this engine runs")
        by_native[nn] = (t, 0, 0)
    tensors, converted, recoded = {}, {}, {}
    for nn, shape in shapes.items():
        if nn not in by_native:
            raise InfengError(f"{where}: missing tensor {gguf_name(nn, arch)!r}")
        t, r0, r1 = by_native[nn]
        if not r1 and t.shape != shape:
            raise InfengError(f"{where}: tensor {t.name!r} has shape {list(t.shape)} (numpy order), the "
                              f"hyper-parameters say {list(shape)}")
        raw = g.raw(t.name)
        if r1:     # rows of a fused tensor: whole rows are whole blocks, a slice of the bytes
            row_bytes = t.nbytes // t.shape[0]
            raw, t = raw[r0 * row_bytes:r1 * row_bytes], GGUFTensor(t.name, t.type_id, (t.dims[0], r1 - r0),
                                                                     t.offset + r0 * row_bytes, (r1 - r0) * row_bytes)
        if t.type_name in NATIVE_COPY:
            dt = NATIVE_COPY[t.type_name]
            arr = raw.view(native.DTYPES[dt][0]).reshape(native.storage_shape(dt, shape))
            if is_norm(nn):
                if dt not in STORE_DTYPES:
                    raise InfengError(f"{where}: tensor {t.name!r} is {t.type_name}; norms must be F32/F16/BF16")
                dt, arr = "f32", convert_dtype(arr, dt, "f32")
        elif t.type_name in recode and len(shape) == 2 and not is_norm(nn):
            dt, fn, exact = recode[t.type_name]
            arr = fn(raw, *shape)
            r = recoded.setdefault(f"{t.type_name} → {dt}", {"tensors": 0, "exact": exact})
            r["tensors"] += 1
        elif t.type_name in gguf_types.DEQUANTIZE and len(shape) == 2:
            dt, arr = store_k_quant(t, raw, k_dtype)
            converted[t.type_name] = converted.get(t.type_name, 0) + 1
        else:
            raise InfengError(f"{where}: tensor {t.name!r} has type {t.type_name}, which cannot be converted "
                              f"({', '.join(dict.fromkeys(list(NATIVE_COPY) + list(recode) + list(gguf_types.DEQUANTIZE)))})")
        if arch in gguf_arch.PERMUTED and nn.endswith(".wq"):
            arr = unpermute_rope(arr, cfg.n_heads)
        elif arch in gguf_arch.PERMUTED and nn.endswith(".wk"):
            arr = unpermute_rope(arr, cfg.n_kv_heads)
        tensors[nn] = (dt, arr)
    name = g.get("general.name", "str", "")
    types: dict[str, int] = {}
    for t in g.tensors.values():
        types[t.type_name] = types.get(t.type_name, 0) + 1
    summary = {"gguf_version": g.version, "name": name, "types": types, "k_quant_dtype": k_dtype if converted else None,
               "dequantized": converted, "recoded": recoded}
    return cfg, tensors, tok, summary


def gguf_name(name: str, arch: str = "llama") -> str:
    """native tensor name → GGUF tensor name (the inverse of ``native_name``; a part of a fused
    tensor: the fused tensor's name)."""
    glob = {native: g for g, native in gguf_arch.GLOBAL.items()}
    if name in glob:
        return glob[name]
    _, i, w = name.split(".")
    for fused, parts in gguf_arch.FUSED.get(gguf_arch.TO_GGUF.get(arch, arch), {}).items():
        if w in parts:
            return f"blk.{i}.{fused}"
    return f"blk.{i}.{next(g for g, n in gguf_arch.LAYER.items() if n == w)}"


def is_gguf(path: str | os.PathLike) -> bool:
    """True when the file starts with the GGUF magic (what it holds is checked on reading)."""
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def describe(info: dict[str, Any]) -> str:
    """The converter's summary line tail: which GGUF types came in and what became of them."""
    types = ", ".join(f"{n}×{k}" for k, n in sorted(info["types"].items()))
    text = f" (GGUF v{info['gguf_version']}: {types}"
    for what, r in info.get("recoded", {}).items():
        text += f"; {r['tensors']} tensors {what} ({'exactly' if r['exact'] else 'rounded'})"
    if info["dequantized"]:
        which = "/".join(sorted(info["dequantized"]))
        text += (f"; {which} dequantized to {info['k_quant_dtype']}: the native format has no k-quant dtype yet, "
                 f"and {info['k_quant_dtype']} keeps the dequantized weights to within its rounding")
    return text + ")"
