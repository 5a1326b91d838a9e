"""A strict safetensors reader: validates the header against the file before handing out views.

Format: u64 little-endian header length N, N bytes of JSON ({name: {dtype, shape, data_offsets}},
optional "__metadata__"), then the data region. Every count, offset and length is checked against
the file size (a header length past the end, overlapping or out-of-range tensors, lengths that do
not match dtype × shape) so a corrupt file gives one clear error, never a crash or a huge read.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from infeng.errors import InfengError
from infeng.format import map_readonly, plausible_shape

# safetensors dtype → (infeng dtype label, numpy storage dtype, bytes per element)
ST_DTYPES = {
    "F32": ("f32", np.dtype("<f4"), 4),
    "BF16": ("bf16", np.dtype("<u2"), 2),
    "F16": ("f16", np.dtype("<f2"), 2),
}
MAX_HEADER = 100 << 20


class SafetensorsFile:
    """``tensors``: name → (dtype label, numpy view of the mapped file)."""

    def __init__(self, path: str | os.PathLike):
        p = self.path = Path(path)
        self._mm, size = map_readonly(p, "a safetensors file", 8)
        (n,) = struct.unpack_from("<Q", self._mm, 0)
        if n > size - 8 or n > MAX_HEADER:
            raise InfengError(f"{p}: safetensors header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(bytes(self._mm[8:8 + n]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InfengError(f"{p}: safetensors header is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
        if not isinstance(header, dict):
            raise InfengError(f"{p}: safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None)
        data_start, data_len = 8 + n, size - 8 - n
        self.tensors: dict[str, tuple[str, np.ndarray]] = {}
        spans = []
        for name, e in header.items():
            where = f"{p}: tensor {name!r}"
            if not isinstance(e, dict):
                raise InfengError(f"{where}: header entry is not an object")
            st = e.get("dtype")
            if st not in ST_DTYPES:
                raise InfengError(f"{where}: dtype {st!r} is not supported (F32, BF16, F16)")
            shape, offs = e.get("shape"), e.get("data_offsets")
            if (not plausible_shape(shape)
                    or not isinstance(offs, list) or len(offs) != 2
                    or not all(isinstance(o, int) for o in offs) or not 0 <= offs[0] <= offs[1]):
                raise InfengError(f"{where}: bad shape or data_offsets")
            label, npd, size_el = ST_DTYPES[st]
            count = 1
            for d in shape:
                count *= d
            if offs[1] - offs[0] != count * size_el:
                raise InfengError(f"{where}: {offs[1] - offs[0]} bytes for shape {shape} {st} "
                                  f"({count * size_el} expected)")
            if offs[1] > data_len:
                raise InfengError(f"{where}: data ends at {offs[1]}, past the end of the data ({data_len} bytes): file truncated?")
            spans.append((offs[0], offs[1], name))
            view = memoryview(self._mm)[data_start + offs[0]:data_start + offs[1]]
            self.tensors[name] = (label, np.frombuffer(view, dtype=npd).reshape(shape))
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1 and b1 > b0 and a1 > a0:
                raise InfengError(f"{p}: tensors {an!r} and {bn!r} overlap")
