"""A model's tensors as stored, and the row-major view the rest of infeng reads.

A native file may hold a quantized matrix in the layout its kernel reads (16 rows interleaved,
``infeng.quant.interleave``): loading then maps it and copies nothing (DESIGN principle 3). The
numpy reference, GGUF export, quantizers and checksums still see GGUF-order blocks: ``tensors[name]``
de-interleaves such a matrix on first use (and keeps it), ``stored(name)`` gives the bytes as they are.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

import numpy as np

from infeng import format as native
from infeng.errors import InfengError
from infeng.quant.interleave import INTERLEAVED, can_interleave, deinterleave, interleave, interleave_c, layout_id

ROW_MAJOR = native.ROW_MAJOR
# the rows of the embedding table are looked up as stored, so it stays row-major in files
ROW_MAJOR_ONLY = ("tok_embeddings",)


def check_layout(where: str, dtype: str, layout: str) -> None:
    """Refuse, by name, a stored layout this build does not read."""
    if layout == ROW_MAJOR or (dtype in INTERLEAVED and layout == layout_id(dtype)):
        return
    ours = f"; this build's {dtype} layout is {layout_id(dtype)!r}" if dtype in INTERLEAVED else ""
    raise InfengError(f"{where}: stored in layout {layout!r}, which this build cannot read{ours} "
                      f"(convert or quantize the source again)")


class Tensors(Mapping):
    """name → (dtype, row-major storage array), over tensors that may be stored interleaved."""

    def __init__(self, row_major: Mapping | None = None):
        self._stored: dict[str, tuple[str, np.ndarray, str]] = {}   # name → (dtype, bytes as stored, layout)
        self._shape: dict[str, tuple[int, ...]] = {}                 # logical shapes of interleaved ones
        self._crc: dict[str, int] = {}                               # known crc32 of row-major bytes
        self._row_major: dict[str, tuple[str, np.ndarray]] = {}      # de-interleaved on first use
        for name, (dtype, arr) in (row_major or {}).items():
            self._stored[name] = (dtype, arr, ROW_MAJOR)

    @classmethod
    def of(cls, tensors: Mapping) -> "Tensors":
        return tensors if isinstance(tensors, Tensors) else cls(tensors)

    def add(self, name: str, dtype: str, arr: np.ndarray, layout: str, shape, crc: int | None = None) -> None:
        """A tensor as a file stores it: ``arr`` its bytes, ``shape`` its logical shape."""
        self._stored[name] = (dtype, arr, layout)
        if layout != ROW_MAJOR:
            self._shape[name] = tuple(shape)
        if crc is not None:
            self._crc[name] = crc

    def __getitem__(self, name: str) -> tuple[str, np.ndarray]:
        dtype, arr, layout = self._stored[name]
        if layout == ROW_MAJOR:
            return dtype, arr
        if name not in self._row_major:
            rows = self._shape[name][0]
            self._row_major[name] = (dtype, deinterleave(arr.reshape(rows // 16, -1), dtype))
        return self._row_major[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)

    def __contains__(self, name) -> bool:
        return name in self._stored

    def stored(self, name: str) -> tuple[str, np.ndarray, str]:
        """(dtype, the bytes as stored, layout): no de-interleaving."""
        return self._stored[name]

    def dtype(self, name: str) -> str:
        return self._stored[name][0]

    def nbytes(self, name: str) -> int:
        return self._stored[name][1].nbytes

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical shape (elements, not blocks)."""
        dtype, arr, layout = self._stored[name]
        return self._shape[name] if layout != ROW_MAJOR else native.logical_shape(dtype, arr.shape)

    def storage_shape(self, name: str) -> tuple[int, ...]:
        """The row-major storage array's shape."""
        dtype, arr, layout = self._stored[name]
        return native.storage_shape(dtype, self._shape[name]) if layout != ROW_MAJOR else tuple(arr.shape)

    def crc32(self, name: str) -> int:
        """crc32 of the row-major bytes (from the file's manifest when it was loaded from one)."""
        if name not in self._crc:
            self._crc[name] = zlib.crc32(memoryview(np.ascontiguousarray(self[name][1])).cast("B")) & 0xFFFFFFFF
        return self._crc[name]

    def kernel_view(self, name: str) -> tuple[str, np.ndarray] | None:
        """The stored bytes when they are already in the kernels' layout (interleaved dtype, array)."""
        dtype, arr, layout = self._stored[name]
        if layout == ROW_MAJOR:
            return None
        return INTERLEAVED[dtype], arr.reshape(self._shape[name][0] // 16, -1)

    def deinterleaved_count(self) -> int:
        """How many interleaved tensors were expanded to row-major (the engine should need none)."""
        return len(self._row_major)


def file_tensors(tensors: Tensors, kern=None, threads: int = 0) -> list[native.Tensor]:
    """The tensors to write to a native file: a quantized matrix the kernels interleave is stored
    interleaved (with its row-major crc32), so loading maps it as the kernels want it; an already
    interleaved one is written as it is. The C library ``kern`` interleaves when given."""
    out = []
    for name in tensors:
        dtype, arr, layout = tensors.stored(name)
        shape = tensors.shape(name)
        if layout == ROW_MAJOR and name not in ROW_MAJOR_ONLY and arr.ndim == 2 and can_interleave(dtype, arr.shape[0]):
            arr = interleave_c(kern, arr, dtype, threads) if kern is not None else interleave(arr, dtype)
            layout = layout_id(dtype)
        out.append(native.Tensor(name, dtype, shape, arr, layout,
                                 tensors.crc32(name) if layout != ROW_MAJOR else None))
    return out
