"""The C library's constants, read from the compiled library (the enums in kernels_c/*.h), so
Python never retypes a code.

    DTYPE["q8_0x16"]   # enum ifg_dtype, by the lower-case name after IFG_
    LORA_I8, LORA_RG, LORA_VB
    KV_TYPE["int8"]    # enum ifg_kv_type; KVQ_SHAPE: kvq.h's block and head_dim rules
    OPS                # enum ifg_op names in order ("embed", "attn_norm", ...)

Every ISA variant is built from the same headers; the scalar one (always built) is read.
"""
from __future__ import annotations

from infeng.errors import InfengError
from infeng.kernels import _module

_ffi = _module("scalar").ffi


def _enum(ctype: str, prefix: str) -> dict[str, int]:
    """name (lower case, ``prefix`` removed) → value of a C enum, in value order."""
    items = sorted(_ffi.typeof(ctype).relements.items(), key=lambda kv: kv[1])
    return {name[len(prefix):].lower(): value for name, value in items}


# the stored dtypes, then the kernel-only form of bf16 matrices (x rounded to bf16: matmul.h)
DTYPE: dict[str, int] = {**_enum("enum ifg_dtype", "IFG_"), **_enum("enum ifg_matmul_dtype", "IFG_")}
DTYPE_NAME: dict[int, str] = {v: k for k, v in DTYPE.items()}
_LORA_LAYOUT = _enum("enum ifg_lora_layout", "IFG_LORA_")
LORA_I8: int = _enum("enum ifg_lora_dtype", "IFG_LORA_")["i8"]
LORA_RG: int = _LORA_LAYOUT["rg"]      # ranks padded to a multiple of this
LORA_VB: int = _LORA_LAYOUT["vb"]      # Bᵀ stored in runs of this many outputs
# enum ifg_kv_type under the names the options use (f32, bf16, f16, int8, fp8, int4); kvq.h's shape rules
KV_TYPE: dict[str, int] = {{"i8": "int8", "i4": "int4", "i8c": "int8c", "i4c": "int4c"}.get(k, k): v for k, v in _enum("enum ifg_kv_type", "IFG_KV_").items()}
KVQ_SHAPE: dict[str, int] = _enum("enum ifg_kvq_shape", "IFG_KVQ_")
KV_ROT: dict[str, int] = _enum("enum ifg_kv_rotate", "IFG_KV_ROT_")   # {"k": 1, "v": 2}: ifg_kv_cache.rotate bits
OPS: tuple[str, ...] = tuple(k for k in _enum("enum ifg_op", "IFG_OP_") if k != "count")
# enum ifg_peak_op: the instructions the throughput probe issues (peak.h)
PEAK_OP: dict[str, int] = {k: v for k, v in _enum("enum ifg_peak_op", "IFG_PEAK_").items() if k != "n_ops"}


def dtype_code(name: str) -> int:
    """The C code of a weight dtype, or a clear error naming the known ones."""
    try:
        return DTYPE[name]
    except KeyError:
        raise InfengError(f"dtype {name!r} has no C kernel code (known: {', '.join(DTYPE)})") from None
