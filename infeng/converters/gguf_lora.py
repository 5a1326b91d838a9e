"""A native LoRA adapter → a GGUF LoRA adapter llama.cpp loads beside the base's GGUF export
(``llama_adapter_lora_init``), for side-by-side multi-LoRA runs.

What llama.cpp expects (its convert_lora_to_gguf.py and llama-adapter.cpp, read to learn the
format): metadata ``general.type = "adapter"``, ``general.architecture`` of the base,
``adapter.type = "lora"`` and ``adapter.lora.alpha`` (f32; llama.cpp scales by alpha / rank, rank
taken from the tensors); per adapted matrix ``blk.N.<name>.weight.lora_a`` with GGML dims
[in, rank] (A as PEFT stores it, [rank][in] row-major) and ``.lora_b`` with dims [rank, out].
B's rows are output rows of the base matrix, so for wq / wk they get the same RoPE row
permutation gguf_write applies to the base (A is untouched). rsLoRA's alpha / √r scale is
written as the equivalent alpha = scale · rank. DoRA has no GGUF LoRA form and is refused.
Weights are written f32 (int8 / bf16 stored adapters are dequantized), so llama.cpp computes with
the values infeng computes with.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from infeng.converters.gguf_write import ALIGN, F32, GGML_TYPE, NAMES, STR, U32, _kv, _permute_rope, _str, write_file
from infeng.errors import InfengError


def write_gguf_lora(adapter, base, path: str | Path, name: str | None = None) -> Path:
    """Write ``adapter`` (infeng.model.adapter.Adapter, made for ``base``) as a GGUF LoRA adapter
    (temporary name, then rename)."""
    if adapter.use_dora:
        raise InfengError(f"GGUF LoRA export: adapter {adapter.name!r} is DoRA, which llama.cpp adapters cannot express")
    c = base.config
    kvs = [_kv("general.architecture", STR, "llama"), _kv("general.type", STR, "adapter"),
           _kv("general.name", STR, name or adapter.name), _kv("general.alignment", U32, ALIGN),
           _kv("adapter.type", STR, "lora"), _kv("adapter.lora.alpha", F32, float(adapter.scale * adapter.rank))]
    infos, datas, off = [], [], 0
    for t in sorted(adapter.targets, key=lambda s: (int(s.split(".")[1]), s)):
        _, layer, proj = t.split(".")
        a = np.ascontiguousarray(adapter.f32(f"{t}.lora_a"), np.float32)         # [r, in]
        b = np.ascontiguousarray(adapter.f32(f"{t}.lora_b"), np.float32)         # [out, r]
        if proj == "wq":
            b = _permute_rope(b, c.n_heads)
        elif proj == "wk":
            b = _permute_rope(b, c.n_kv_heads)
        for suffix, arr in (("lora_a", a), ("lora_b", b)):
            dims = list(reversed(arr.shape))                 # GGML ne[0] is the row length
            infos.append(_str(f"blk.{layer}.{NAMES[proj]}.weight.{suffix}") + struct.pack("<I", len(dims))
                         + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", GGML_TYPE["f32"], off))
            datas.append(arr)
            off += -(-arr.nbytes // ALIGN) * ALIGN
    return write_file(path, kvs, infos, datas)
