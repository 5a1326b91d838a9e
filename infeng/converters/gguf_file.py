"""The GGUF container (versions 2 and 3), read strictly: every count, length, shape and offset is
checked against the file before anything is read or allocated, so a corrupt or hostile file gives
one ``InfengError`` naming the file and the field, never a crash, a huge allocation or a wrong model.

Layout (little-endian)::

    "GGUF"  u32 version  u64 n_tensors  u64 n_kv
    n_kv    × (string key, u32 value type, value)          string = u64 length + UTF-8 bytes
    n_tensors × (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
    padding to general.alignment (default 32), then the tensor data; offsets are from there.

``GGUFFile`` is the container: metadata, tensor table and raw views of the mapped file. What a
model is made of is gguf_read.py's business.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infeng.converters.gguf_types import GGML_TYPES
from infeng.errors import InfengError
from infeng.format import map_readonly

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
