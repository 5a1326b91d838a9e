"""A strict GGUF reader (versions 2 and 3): every count, length, shape and offset is checked
against the file before anything is read or allocated, so a corrupt or hostile file gives one
``InfengError`` naming the file and the field, never a crash, a huge allocation or a wrong model.

Layout (little-endian)::

    "GGUF"  u32 version  u64 n_tensors  u64 n_kv
    n_kv    × (string key, u32 value type, value)          string = u64 length + UTF-8 bytes
    n_tensors × (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
    padding to general.alignment (default 32), then the tensor data; offsets are from there.

``GGUFFile`` is the container (metadata + tensor table + raw views); ``read_llama`` turns a
Llama GGUF into a model's parts: config, native tensors, tokenizer (via gguf_tokenizer).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infeng import format as native
from infeng.converters import gguf_types
from infeng.converters.gguf_tokenizer import build as build_tokenizer
from infeng.converters.gguf_types import GGML_TYPES, NATIVE_COPY
from infeng.errors import InfengError
from infeng.format import map_readonly
from infeng.format.config import ModelConfig
from infeng.format.schema import STORE_DTYPES, convert_dtype, expected_shapes, is_norm

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGN = 32
MAX_DIMS = 4
MAX_NAME = 64                      # GGML_MAX_NAME, counting the terminating zero in C
# metadata value types: id → (name, struct format or None for string/array)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALARS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
           U64: "<Q", I64: "<q", F64: "<d"}
NP_SCALARS = {U8: "<u1", I8: "<i1", U16: "<u2", I16: "<i2", U32: "<u4", I32: "<i4", F32: "<f4",
              BOOL: "<u1", U64: "<u8", I64: "<i8", F64: "<f8"}
MIN_KV_BYTES = 8 + 4 + 1           # empty key, type, the smallest value
MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_id: int
    dims: tuple[int, ...]          # GGML order: dims[0] is the innermost (row) length
    offset: int                    # absolute, in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy (row-major) order: outermost first."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


class _Cursor:
    """Bounds-checked reads over the mapped bytes; every failure names the file and what."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, msg: str):
        raise InfengError(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{what} at byte {self.pos} needs {n} bytes, only {self.size - self.pos} left (truncated or corrupt)")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v if len(v) > 1 else v[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {self.pos - n} is not valid UTF-8")

    def value(self, vtype: int, what: str) -> Any:
        if vtype == STR:
            return self.string(what)
        if vtype == ARR:
            etype, n = self.unpack("<IQ", f"array header of {what}")
            if etype == ARR:
                self.fail(f"{what}: arrays of arrays are not supported")
            if etype not in SCALARS and etype != STR:
                self.fail(f"{what}: array element type {etype} is not a GGUF type")
            if n > 1 << 62:
                self.fail(f"{what}: array length {n} is negative or absurd")
            if etype == STR:
                self.need(8 * n, f"{what}: {n} strings")            # each string is at least its length
                return [self.string(f"{what}[{i}]") for i in range(n)]
            size = struct.calcsize(SCALARS[etype])
            self.need(n * size, f"{what}: array of {n} elements")
            arr = np.frombuffer(self.buf, dtype=NP_SCALARS[etype], count=n, offset=self.pos)
            self.pos += n * size
            return arr.astype(bool).tolist() if etype == BOOL else arr.tolist()
        if vtype not in SCALARS:
            self.fail(f"{what}: value type {vtype} is not a GGUF type")
        v = self.unpack(SCALARS[vtype], what)
        return bool(v) if vtype == BOOL else v


class GGUFFile:
    """A validated GGUF file: ``version``, ``metadata`` (key → value), ``types`` (key → value
    type id), ``tensors`` (name → GGUFTensor, in file order). ``raw(name)`` is a uint8 view."""

    def __init__(self, path: str | os.PathLike):
        self.path = p = Path(path)
        self._mm, size = map_readonly(p, "a GGUF file", 24)
        c = _Cursor(self._mm, size, p)
        magic = bytes(self._mm[:4])
        if magic != MAGIC:
            c.fail(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        c.pos = 4
        version = c.unpack("<I", "version")
        if version not in VERSIONS:
            hint = " (a big-endian file?)" if struct.unpack("<I", struct.pack(">I", version))[0] in VERSIONS else ""
            c.fail(f"GGUF version {version} is not supported (this build reads {', '.join(map(str, VERSIONS))}){hint}")
        self.version = version
        n_tensors, n_kv = c.unpack("<qq", "tensor and metadata counts")
        left = size - c.pos
        if n_tensors < 0 or n_kv < 0:
            c.fail(f"negative count: {n_tensors} tensors, {n_kv} metadata entries")
        if n_tensors * MIN_TENSOR_BYTES + n_kv * MIN_KV_BYTES > left:
            c.fail(f"{n_tensors} tensors and {n_kv} metadata entries cannot fit in the {left} bytes left")

        self.metadata: dict[str, Any] = {}
        self.types: dict[str, int] = {}
        for i in range(n_kv):
            key = c.string(f"metadata key {i}")
            if key in self.metadata:
                c.fail(f"duplicate metadata key {key!r}")
            vtype = c.unpack("<I", f"value type of {key!r}")
            self.types[key] = vtype
            self.metadata[key] = c.value(vtype, f"metadata {key!r}")

        align = self.metadata.get("general.alignment", DEFAULT_ALIGN)
        if "general.alignment" in self.types and self.types["general.alignment"] != U32:
            c.fail("general.alignment must be a u32")
        if align <= 0 or align & (align - 1):
            c.fail(f"general.alignment {align} is not a power of two")
        self.alignment = align

        infos = []
        for i in range(n_tensors):
            name = c.string(f"tensor {i} name")
            where = f"tensor {name!r}"
            if len(name.encode()) >= MAX_NAME:
                c.fail(f"{where}: name is longer than {MAX_NAME - 1} bytes")
            n_dims = c.unpack("<I", f"{where}: n_dims")
            if not 1 <= n_dims <= MAX_DIMS:
                c.fail(f"{where}: {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            dims = c.unpack(f"<{n_dims}q", f"{where}: dimensions")
            dims = (dims,) if n_dims == 1 else tuple(dims)
            type_id, offset = c.unpack("<IQ", f"{where}: type and offset")
            infos.append((name, dims, type_id, offset))
        data_start = c.pos + (-c.pos % align)
        if infos and data_start > size:          # a vocabulary-only file may end unpadded
            c.fail(f"tensor data would start at byte {data_start}, past the end of the file ({size} bytes)")
        self.data_start = data_start
        data_len = size - data_start

        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, type_id, offset in infos:
            where = f"tensor {name!r}"
            if name in self.tensors:
                c.fail(f"duplicate tensor name {name!r}")
            if any(d <= 0 for d in dims):
                c.fail(f"{where}: dimension in {list(dims)} is not positive")
            if type_id not in GGML_TYPES:
                c.fail(f"{where}: unknown GGML type {type_id}")
            tname, block, block_bytes = GGML_TYPES[type_id]
            if dims[0] % block:
                c.fail(f"{where}: row length {dims[0]} is not a multiple of the {tname} block ({block})")
            n = 1
            for d in dims:                       # Python ints do not overflow; bound them anyway
                n *= d
                if n > data_len * block:         # more weights than the data region could ever hold
                    c.fail(f"{where}: shape {list(dims)} has more elements than the file could hold")
            nbytes = n // block * block_bytes
            if offset % align:
                c.fail(f"{where}: offset {offset} is not a multiple of the alignment {align}")
            if offset + nbytes > data_len:
                c.fail(f"{where}: data [{offset}, {offset + nbytes}) runs past the end of the data "
                       f"({data_len} bytes): truncated?")
            self.tensors[name] = GGUFTensor(name, type_id, dims, data_start + offset, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                c.fail(f"tensors {an!r} and {bn!r} overlap")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, a uint8 view of the mapped file (no copy)."""
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def get(self, key: str, kind: str, default: Any = None, required: bool = False) -> Any:
        """A metadata value of the expected kind ("int", "float", "str", "bool", "list")."""
        if key not in self.metadata:
            if required:
                raise InfengError(f"{self.path}: missing required metadata {key!r}")
            return default
        v = self.metadata[key]
        ok = {"int": isinstance(v, int) and not isinstance(v, bool) and self.types[key] not in (F32, F64),
              "float": isinstance(v, (int, float)) and not isinstance(v, bool),
              "str": isinstance(v, str), "bool": isinstance(v, bool), "list": isinstance(v, list)}[kind]
        if not ok:
            raise InfengError(f"{self.path}: metadata {key!r} should be {kind}, is {type(v).__name__} {str(v)[:40]!r}")
        if self.types[key] == F32:          # the shortest decimal that is this f32 (1e-05, not 9.99999974e-06)
            v = float(str(np.float32(v)))
        return v

    def close(self) -> None:
        if isinstance(self._mm, mmap.mmap):
            self._mm.close()


# ---- Llama GGUF → model parts -----------------------------------------------------------------

ARCHITECTURES = ("llama",)         # llama.cpp converts Llama, Mistral, TinyLlama, SmolLM as "llama"
LAYER_NAMES = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_q": "wq", "attn_k": "wk",
               "attn_v": "wv", "attn_output": "wo", "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}
K_QUANT_DTYPE = "bf16"


def native_name(gguf_name: str) -> str | None:
    if gguf_name == "token_embd.weight":
        return "tok_embeddings"
    if gguf_name == "output_norm.weight":
        return "norm"
    if gguf_name == "output.weight":
        return "output"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" and parts[2] in LAYER_NAMES:
        return f"layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}"
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


def read_llama(path: str | os.PathLike, k_quant_dtype: str | None = None):
    """A Llama GGUF's parts (tensors of gguf_types.NATIVE_COPY types — F32/F16/BF16,
    Q8_0/Q4_0/Q5_0/Q4_1/Q5_1, Q4_K/Q6_K — are views of the file, norms become f32, other
    dequantizable types go through ``store_k_quant``): (config, {native name: (dtype, array)},
    tokenizer dict, summary dict)."""

    k_dtype = k_quant_dtype or K_QUANT_DTYPE
    if k_dtype not in STORE_DTYPES:
        raise InfengError(f"--dtype {k_dtype!r}: must be one of {', '.join(STORE_DTYPES)}")
    g = GGUFFile(path)
    where = str(g.path)
    arch = g.get("general.architecture", "str", required=True)
    if arch not in ARCHITECTURES:
        raise InfengError(f"{where}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")

    def hp(key, kind="int", default=None):
        return g.get(f"{arch}.{key}", kind, default, required=default is None)
    dim, n_heads = hp("embedding_length"), hp("attention.head_count")
    head_dim = hp("attention.key_length", default=dim // n_heads if n_heads > 0 else 0)
    if hp("attention.value_length", default=head_dim) != head_dim:
        raise InfengError(f"{where}: attention.value_length differs from key_length (not supported)")
    if hp("rope.dimension_count", default=head_dim) != head_dim:
        raise InfengError(f"{where}: {arch}.rope.dimension_count {hp('rope.dimension_count')} != head size "
                          f"{head_dim}: partial rotary embedding is not supported")
    rope_scaling = None
    kind = hp("rope.scaling.type", "str", "none")
    if kind == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(hp("rope.scaling.factor", "float"))}
    elif kind != "none":
        raise InfengError(f"{where}: {arch}.rope.scaling.type {kind!r} is not supported (none, linear)")
    if "rope_freqs.weight" in g.tensors:
        raise InfengError(f"{where}: has rope_freqs.weight (Llama 3.1 RoPE scaling), which this converter cannot map")
    tok, bos_id, eos_ids = build_tokenizer(g, where)
    n_vocab = len(g.metadata["tokenizer.ggml.tokens"])
    cfg = ModelConfig(
        dim=dim, hidden_dim=hp("feed_forward_length"), n_layers=hp("block_count"), n_heads=n_heads,
        n_kv_heads=hp("attention.head_count_kv", default=n_heads), head_dim=head_dim,
        vocab_size=hp("vocab_size", default=n_vocab), max_seq_len=hp("context_length"),
        norm_eps=float(hp("attention.layer_norm_rms_epsilon", "float")),
        rope_theta=float(hp("rope.freq_base", "float", 10000.0)),
        tie_embeddings="output.weight" not in g.tensors, rope_scaling=rope_scaling,
        bos_id=bos_id, eos_ids=eos_ids)
    if cfg.n_layers > 4096 or cfg.dim > 1 << 20:
        raise InfengError(f"{where}: {cfg.n_layers} layers of width {cfg.dim} is not a plausible model")
    cfg.validate(where, {k: f"{arch}.{v}" for k, v in (
        ("dim", "embedding_length"), ("hidden_dim", "feed_forward_length"), ("n_layers", "block_count"),
        ("n_heads", "attention.head_count"), ("n_kv_heads", "attention.head_count_kv"),
        ("head_dim", "attention.key_length"), ("max_seq_len", "context_length"), ("vocab_size", "vocab_size"))})
    if cfg.vocab_size != n_vocab:
        raise InfengError(f"{where}: {arch}.vocab_size {cfg.vocab_size} != {n_vocab} tokens in tokenizer.ggml.tokens")

    shapes = expected_shapes(cfg)
    by_native = {}
    for name, t in g.tensors.items():
        nn = native_name(name)
        if nn is None or nn not in shapes:
            raise InfengError(f"{where}: tensor {name!r} is not part of a {arch} model this engine runs")
        by_native[nn] = t
    tensors, converted = {}, {}
    for nn, shape in shapes.items():
        if nn not in by_native:
            raise InfengError(f"{where}: missing tensor {gguf_name(nn)!r}")
        t = by_native[nn]
        if t.shape != shape:
            raise InfengError(f"{where}: tensor {t.name!r} has shape {list(t.shape)} (numpy order), the "
                              f"hyper-parameters say {list(shape)}")
        raw = g.raw(t.name)
        if t.type_name in NATIVE_COPY:
            dt = NATIVE_COPY[t.type_name]
            arr = raw.view(native.DTYPES[dt][0]).reshape(native.storage_shape(dt, shape))
            if is_norm(nn):
                if dt not in STORE_DTYPES:
                    raise InfengError(f"{where}: tensor {t.name!r} is {t.type_name}; norms must be F32/F16/BF16")
                dt, arr = "f32", convert_dtype(arr, dt, "f32")
        elif t.type_name in gguf_types.DEQUANTIZE and len(shape) == 2:
            dt, arr = store_k_quant(t, raw, k_dtype)
            converted[t.type_name] = converted.get(t.type_name, 0) + 1
        else:
            raise InfengError(f"{where}: tensor {t.name!r} has type {t.type_name}, which cannot be converted "
                              f"({', '.join(dict.fromkeys(list(NATIVE_COPY) + list(gguf_types.DEQUANTIZE)))})")
        if nn.endswith(".wq"):
            arr = unpermute_rope(arr, cfg.n_heads)
        elif nn.endswith(".wk"):
            arr = unpermute_rope(arr, cfg.n_kv_heads)
        tensors[nn] = (dt, arr)
    name = g.get("general.name", "str", "")
    types: dict[str, int] = {}
    for t in g.tensors.values():
        types[t.type_name] = types.get(t.type_name, 0) + 1
    summary = {"gguf_version": g.version, "name": name, "types": types, "k_quant_dtype": k_dtype if converted else None,
               "dequantized": converted}
    return cfg, tensors, tok, summary


def gguf_name(name: str) -> str:
    """native tensor name → GGUF tensor name (the inverse of ``native_name``)."""
    glob = {"tok_embeddings": "token_embd.weight", "norm": "output_norm.weight", "output": "output.weight"}
    if name in glob:
        return glob[name]
    _, i, w = name.split(".")
    return f"blk.{i}.{next(g for g, n in LAYER_NAMES.items() if n == w)}.weight"


def is_gguf(path: str | os.PathLike) -> bool:
    """True when the file starts with the GGUF magic (what it holds is checked on reading)."""
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def describe(info: dict[str, Any]) -> str:
    """The converter's summary line tail: which GGUF types came in and what became of them."""
    types = ", ".join(f"{n}×{k}" for k, n in sorted(info["types"].items()))
    text = f" (GGUF v{info['gguf_version']}: {types}"
    if info["dequantized"]:
        which = "/".join(sorted(info["dequantized"]))
        text += (f"; {which} dequantized to {info['k_quant_dtype']}: the native format has no k-quant dtype yet, "
                 f"and {info['k_quant_dtype']} keeps the dequantized weights to within its rounding")
    return text + ")"
