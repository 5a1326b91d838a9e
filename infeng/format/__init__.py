"""The engine-native file: one self-contained, mmap-able file.

Layout::

    0   8 bytes  magic  b"INFENG\\0\\0"
    8   u32      format version (little-endian)
    12  u32      flags (0)
    16  u64      manifest length in bytes
    24  ...      manifest: UTF-8 JSON (config, tokenizer, generation defaults, tensors)
        ...      zero padding to a multiple of 64
    D   ...      tensor data; every tensor starts at a multiple of 64 from D

Each tensor entry: name, dtype, shape, layout, offset (from D), nbytes, crc32. ``layout`` is
"row_major" (blocks in GGUF order) or the kernels' layout the bytes are stored in (e.g.
"q4_0x16.<fingerprint>", infeng.quant.interleave); such an entry also holds ``logical_crc32``, the
crc32 of the row-major bytes, so a model's identity does not depend on how it is stored. Loading
maps the file and hands out numpy views of it; nothing is copied. Writing goes to a temporary name in the
same directory and is renamed into place at the end, so a failed write leaves nothing behind.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from infeng.errors import InfengError
from infeng.telemetry import atomic_path

MAGIC = b"INFENG\0\0"
VERSION = 1
ALIGN = 64
ROW_MAJOR = "row_major"
HEADER = struct.Struct("<8sIIQ")

# dtype label → (numpy storage dtype, bytes per element). bf16 is stored as its uint16 bits.
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "f32": (np.dtype("<f4"), 4),
    "bf16": (np.dtype("<u2"), 2),
    "f16": (np.dtype("<f2"), 2),
    "i32": (np.dtype("<i4"), 4),
    "u8": (np.dtype("u1"), 1),
    "i8": (np.dtype("i1"), 1),
    "q8_0": (np.dtype("u1"), 1),
    "q4_0": (np.dtype("u1"), 1),
    "q5_0": (np.dtype("u1"), 1),
    "q4_k": (np.dtype("u1"), 1),
    "q4_1": (np.dtype("u1"), 1),
    "q5_1": (np.dtype("u1"), 1),
    "q6_k": (np.dtype("u1"), 1),
    "q5_k": (np.dtype("u1"), 1),
    "fp8": (np.dtype("u1"), 1),
}
# Block-quantized dtypes (infeng.quant, GGUF-compatible): label → (weights per block, bytes per
# block). The manifest's "shape" is the logical [..., K] (K a multiple of the block); the data is
# uint8 [..., K / block * bytes] and "nbytes" is exactly that many bytes.
BLOCKS: dict[str, tuple[int, int]] = {"q8_0": (32, 34), "q4_0": (32, 18), "q5_0": (32, 22), "q4_k": (256, 144), "fp8": (32, 34),
                                    "q4_1": (32, 20), "q5_1": (32, 24), "q6_k": (256, 210),
                                    "q5_k": (256, 176)}


def storage_shape(dtype: str, shape) -> tuple[int, ...] | None:
    """Shape of the stored array for a logical shape (None: not representable in dtype)."""
    shape = tuple(shape)
    if dtype not in BLOCKS:
        return shape
    qk, bb = BLOCKS[dtype]
    if not shape or shape[-1] % qk:
        return None
    return shape[:-1] + (shape[-1] // qk * bb,)


def logical_shape(dtype: str, stored) -> tuple[int, ...]:
    """Inverse of storage_shape."""
    stored = tuple(stored)
    if dtype not in BLOCKS:
        return stored
    qk, bb = BLOCKS[dtype]
    return stored[:-1] + (stored[-1] // bb * qk,)


MAX_ELEMENTS = 1 << 48


def plausible_shape(shape) -> bool:
    """A list of non-negative ints (not bools) whose non-zero dims multiply to < 2^48: numpy
    refuses to even make an empty view of a shape like [0, 2^40, 2^40] (found by fuzzing)."""
    if not isinstance(shape, list) or len(shape) > 8:
        return False
    n = 1
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            return False
        n *= max(d, 1)
    return n < MAX_ELEMENTS


def align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Tensor:
    """A tensor as stored: its bytes (a numpy view) and its logical dtype label."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # storage dtype per DTYPES, C-contiguous
    layout: str = "row_major"
    logical_crc32: int | None = None   # crc32 of the row-major bytes, when layout is not row_major


def write(path: str | os.PathLike, manifest: dict[str, Any], tensors: Iterable[Tensor],
          progress=None) -> Path:
    """Write a native file atomically. ``manifest`` holds everything but the tensor table."""
    path = Path(path)
    tensors = list(tensors)
    names = set()
    table = []
    offset = 0
    for t in tensors:
        if t.name in names:
            raise InfengError(f"{path}: duplicate tensor name {t.name!r}")
        names.add(t.name)
        if t.dtype not in DTYPES:
            raise InfengError(f"{path}: tensor {t.name!r}: unknown dtype {t.dtype!r}")
        sshape = storage_shape(t.dtype, t.shape)
        if sshape is None:
            raise InfengError(f"{path}: tensor {t.name!r}: shape {list(t.shape)} is not a whole number of {t.dtype} blocks")
        nbytes = int(np.prod(sshape, dtype=np.int64)) * DTYPES[t.dtype][1]
        if t.data.nbytes != nbytes:
            raise InfengError(f"{path}: tensor {t.name!r}: {t.data.nbytes} bytes of data for shape "
                              f"{list(t.shape)} {t.dtype} ({nbytes} expected)")
        offset = align(offset)
        # crc32 is written as a fixed-width placeholder first and patched after the data pass.
        table.append({"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "layout": t.layout,
                      "offset": offset, "nbytes": nbytes, "crc32": "00000000"})
        if t.layout != ROW_MAJOR:
            table[-1]["logical_crc32"] = f"{t.logical_crc32:08x}"
        offset += nbytes
    full = dict(manifest, format="infeng", version=VERSION, tensors=table)
    blob = json.dumps(full, separators=(",", ":")).encode()
    data_start = align(HEADER.size + len(blob))

    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, 0, len(blob)))
            f.write(blob)
            for entry, t in zip(table, tensors):
                f.seek(data_start + entry["offset"])
                buf = memoryview(np.ascontiguousarray(t.data)).cast("B")
                f.write(buf)
                entry["crc32"] = f"{zlib.crc32(buf) & 0xffffffff:08x}"
                if progress:
                    progress(t.name, entry["nbytes"])
            f.truncate(data_start + offset)
            patched = json.dumps(full, separators=(",", ":")).encode()
            assert len(patched) == len(blob)
            f.seek(HEADER.size)
            f.write(patched)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise InfengError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


class NativeFile:
    """A mapped native file: ``manifest`` (dict) and ``tensors`` (name → numpy view)."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        p = self.path
        self._mm, size = map_readonly(p, "an infeng file", HEADER.size)
        magic, version, _flags, mlen = HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC:
            raise InfengError(f"{p}: not an infeng file (bad magic {magic[:8]!r})")
        if version != VERSION:
            raise InfengError(f"{p}: infeng format version {version} is not supported (this build reads {VERSION})")
        if mlen > size - HEADER.size:
            raise InfengError(f"{p}: manifest length {mlen} runs past the end of the file ({size} bytes)")
        try:
            man = json.loads(bytes(self._mm[HEADER.size:HEADER.size + mlen]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InfengError(f"{p}: manifest is not valid JSON ({e})") from None
        if not isinstance(man, dict) or not isinstance(man.get("tensors"), list):
            raise InfengError(f"{p}: manifest has no tensor table")
        self.manifest = man
        data_start = align(HEADER.size + mlen)
        self.tensors: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}   # logical shapes (tensors[] holds storage)
        self.layouts: dict[str, str] = {}               # "row_major" or a kernel layout (module doc)
        self.crcs: dict[str, int] = {}                  # crc32 of each tensor's row-major bytes
        for i, e in enumerate(man["tensors"]):
            self._add(e, i, data_start, size, verify)

    def _add(self, e: Any, i: int, data_start: int, size: int, verify: bool):
        p = self.path
        if not isinstance(e, dict):
            raise InfengError(f"{p}: tensor entry {i} is not an object")
        name = e.get("name")
        where = f"{p}: tensor {name!r}"
        try:
            dtype, shape, off, nbytes = e["dtype"], e["shape"], e["offset"], e["nbytes"]
        except KeyError as k:
            raise InfengError(f"{where}: entry lacks {k}") from None
        if not isinstance(name, str) or name in self.tensors:
            raise InfengError(f"{where}: missing or duplicate name")
        if dtype not in DTYPES:
            raise InfengError(f"{where}: unknown dtype {dtype!r}")
        if (not plausible_shape(shape)
                or not isinstance(off, int) or not isinstance(nbytes, int) or off < 0 or nbytes < 0):
            raise InfengError(f"{where}: bad shape, offset or length")
        sshape = storage_shape(dtype, shape)
        if sshape is None:
            raise InfengError(f"{where}: shape {shape} is not a whole number of {dtype} blocks")
        want = DTYPES[dtype][1]
        for d in sshape:
            want *= d
        if want != nbytes:
            raise InfengError(f"{where}: length {nbytes} does not match shape {shape} {dtype} ({want} bytes)")
        if off % ALIGN:
            raise InfengError(f"{where}: offset {off} is not {ALIGN}-byte aligned")
        if data_start + off + nbytes > size:
            raise InfengError(f"{where}: offset {off} + length {nbytes} runs past the end of the file "
                              f"({size - data_start} data bytes)")
        view = memoryview(self._mm)[data_start + off:data_start + off + nbytes]
        if verify:
            crc = f"{zlib.crc32(view) & 0xffffffff:08x}"
            if crc != e.get("crc32"):
                raise InfengError(f"{where}: checksum mismatch (stored {e.get('crc32')}, data {crc}): file is corrupt")
        layout = e.get("layout", ROW_MAJOR)
        crc = e.get("crc32") if layout == ROW_MAJOR else e.get("logical_crc32")
        if not isinstance(layout, str) or not isinstance(crc, str) or len(crc) != 8:
            raise InfengError(f"{where}: bad layout or checksum entry")
        try:
            self.crcs[name] = int(crc, 16)
        except ValueError:
            raise InfengError(f"{where}: checksum {crc!r} is not hexadecimal") from None
        arr = np.frombuffer(view, dtype=DTYPES[dtype][0]).reshape(sshape)
        self.tensors[name] = arr
        self.dtypes[name] = dtype
        self.shapes[name] = tuple(shape)
        self.layouts[name] = layout


def map_readonly(path: Path, what: str, min_size: int) -> tuple[mmap.mmap, int]:
    """Map a file read-only; InfengError (one line, naming the file) if it cannot be, or if it is
    shorter than ``min_size`` bytes and so cannot be ``what``."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise InfengError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InfengError(f"{path}: is a directory, not {what}") from None
    except OSError as e:
        raise InfengError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < min_size:
            raise InfengError(f"{path}: not {what} (only {size} bytes)")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size


def is_native(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC
