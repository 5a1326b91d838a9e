"""Every cffi struct the C library takes, built here and nowhere else.

A ``Structs`` builds structs for one kernel module and keeps alive every array they point into
(the C side only borrows memory). Fields are set by name, so a struct that gains a field (a bias,
a norm) needs no new helper here: ints and floats are copied, numpy arrays become pointers of the
field's C type, a ``Weight`` fills a ``struct ifg_weight``, None is NULL.

``LoraBatch`` is the one ``struct ifg_lora_batch`` of a forward session: rows
seg_start[i]..seg_start[i+1] use adapter table i, with the shrink's scratch grown to the largest
adapter rank seen.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from infeng.kernels.abi import dtype_code


@dataclass
class Weight:
    """A weight matrix for ``struct ifg_weight``: its dtype name, its bytes as the kernels read
    them, and its logical shape [rows][cols]."""
    dtype: str
    data: np.ndarray
    rows: int
    cols: int


def _fields(ffi, ctype) -> dict:
    t = ctype.item if ctype.kind == "pointer" else ctype
    return dict(t.fields)


class Structs:
    def __init__(self, kern):
        self.kern, self.ffi = kern, kern.ffi
        self.keep: list = []            # arrays and cdata the built structs point into

    def pointer(self, arr: np.ndarray, ctype: str = "float *"):
        """A C pointer into ``arr`` (kept alive with these structs; no copy)."""
        a = np.ascontiguousarray(arr)
        self.keep.append(a)
        return self.ffi.cast(ctype, self.ffi.from_buffer(a))

    def set(self, dst, **fields) -> None:
        """Set fields of a struct (a ``struct x *`` or an array element) by name."""
        ftypes = _fields(self.ffi, self.ffi.typeof(dst))
        for name, value in fields.items():
            ft = ftypes[name].type
            if value is None:
                setattr(dst, name, self.ffi.NULL)
            elif isinstance(value, Weight):
                w = getattr(dst, name)
                w.data = self.pointer(value.data, "void *")
                w.dtype, w.rows, w.cols = dtype_code(value.dtype), value.rows, value.cols
            elif isinstance(value, np.ndarray):
                setattr(dst, name, self.pointer(value, ft))
            else:
                setattr(dst, name, value)

    def new(self, ctype: str, **fields):
        """A new ``ctype *`` (e.g. "struct ifg_kv_cache") with its fields set."""
        s = self.ffi.new(ctype + " *")
        self.keep.append(s)
        self.set(s, **fields)
        return s

    def array(self, ctype: str, items: list[dict]):
        """A new ``ctype[len(items)]``, element i's fields set from items[i]."""
        arr = self.ffi.new(ctype + "[]", len(items))
        self.keep.append(arr)
        for i, f in enumerate(items):
            self.set(arr[i], **f)
        return arr

    def pointers(self, ctype: str, n: int):
        """A new ``ctype *[n]`` of NULLs (a table the caller fills with struct pointers)."""
        arr = self.ffi.new(ctype + " *[]", n)
        self.keep.append(arr)
        return arr

    # ---- the structs of forward.h and lora.h ------------------------------------------------
    def model(self, *, layers: list[dict], **fields):
        """``struct ifg_model *`` (dimensions, weights) with its ``struct ifg_layer[]``; each
        layer a dict of its fields (norm vectors as arrays, matrices as Weight)."""
        arr = self.array("struct ifg_layer", layers)
        return self.new("struct ifg_model", layers=arr, **fields), arr

    def scratch(self, max_tokens: int, **buffers):
        """``struct ifg_scratch *`` over the caller's activation buffers (forward.h)."""
        return self.new("struct ifg_scratch", max_tokens=max_tokens, **buffers)

    def kv_cache(self, k: np.ndarray, v: np.ndarray, block_table: np.ndarray, *, n_blocks: int,
                 block_size: int, **layout):
        """``struct ifg_kv_cache *`` over a paged pool: the K and V byte pools, block_table
        [n_slots][max_blocks] int32; ``layout``: the per-layer types and offsets, scale group
        and rotation of forward.h (absent: every layer f32)."""
        return self.new("struct ifg_kv_cache", k=k, v=v, n_blocks=n_blocks, block_size=block_size,
                        max_blocks=block_table.shape[1], block_table=block_table, **layout)

    def lora(self, a: np.ndarray, a_dtype: int, b: np.ndarray, b_dtype: int, h_scale: np.ndarray,
             rank: int, dora: np.ndarray | None = None):
        """``struct ifg_lora *``: one adapted projection in the kernels' layouts (lora.h);
        dtypes are DTYPE codes or LORA_I8."""
        return self.new("struct ifg_lora", a=a, a_dtype=a_dtype, b=b, b_dtype=b_dtype, h_scale=h_scale,
                        rank=rank, dora=dora)

    def lora_table(self, n: int):
        """``struct ifg_lora *[n]``, all NULL: an adapter's projections (NULL: not adapted)."""
        return self.pointers("struct ifg_lora", n)


class LoraBatch:
    """``struct ifg_lora_batch`` for steps of up to ``max_tokens`` rows in up to ``max_seg``
    adapter segments. Fill ``seg_start[:n_seg]`` and ``tables[:n_seg]`` (an adapter's table, or
    NULL), then ``commit(n_seg, T)``; ``reserve(rank)`` first, for the largest kernel rank used."""

    def __init__(self, kern, max_tokens: int, max_seg: int, widest_input: int, dim: int):
        self.kern, self.max_tokens, self.widest, self.dim = kern, max_tokens, widest_input, dim
        self._s = Structs(kern)
        self.seg_start = np.zeros(max_seg + 1, np.int32)
        self.tables = self._s.pointers("struct ifg_lora *", max_seg)     # one adapter table per segment
        self.struct = self._s.new("struct ifg_lora_batch", seg_start=self.seg_start, n_seg=0, max_rank=0)
        self.struct.seg = self.tables
        self.max_rank = 0
        self.NULL = kern.ffi.NULL

    def reserve(self, rank: int) -> None:
        """Scratch for adapters up to kernel rank ``rank``: h, the shrink's partial sums per k-chunk
        of the widest projection input, and tmp [max_tokens][dim]. Grows, never shrinks."""
        if rank <= self.max_rank:
            return
        rows = self.kern.lib.ifg_lora_h_rows(self.max_tokens, self.widest)
        self.h = np.zeros((rows, max(rank, 16)), np.float32)
        self.tmp = np.zeros((self.max_tokens, self.dim), np.float32)
        self._s.set(self.struct, h=self.h, tmp=self.tmp, max_rank=self.h.shape[1])
        self.max_rank = self.h.shape[1]

    def set(self, tables: list, starts: list[int], T: int):
        """Segments i over rows starts[i]..starts[i+1] (the last to T) with tables[i]; returns the struct."""
        for i, t in enumerate(tables):
            self.tables[i] = t if t is not None else self.NULL
        self.seg_start[:len(starts)] = starts
        return self.commit(len(tables), T)

    def commit(self, n_seg: int, T: int):
        self.seg_start[n_seg] = T
        self.struct.n_seg = n_seg
        return self.struct
