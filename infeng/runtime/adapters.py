"""Adapter manager: LoRA/DoRA adapters loaded beside one base model, ready for the C forward pass.

Loading maps the adapter file (checked against the base's identity), packs A and Bᵀ into the
layouts the kernels stream (lora.h: Aᵀ, and Bᵀ in runs of 16 outputs, for int8 with 4 ranks per
32-bit lane for integer dot products; rank zero-padded to a multiple of 4; float files store B,
whose transpose is taken here), gives the kernels the LoRA
scale (times int8 storage's per-rank scales) as one [rank] vector, precomputes DoRA's per-row
factor m / ‖W + s·BA‖ from the base weights, and builds the C table the forward pass reads
([n_layers × 7] pointers, NULL where a projection is not adapted). Memory is bounded by a budget:
loading past it evicts the least recently used adapter that no request is using and that is not
pinned. Loading a name again replaces the adapter (hot reload);
``reload_changed`` does that for every file whose modification time moved.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infeng.errors import InfengError
from infeng.kernels.abi import LORA_I8, LORA_RG, LORA_VB, dtype_code
from infeng.kernels.structs import Structs
from infeng.model.adapter import Adapter, load_adapter, takes_bf16_dp
from infeng.model.loader import MATRICES, Model


def kernel_rank(rank: int) -> int:
    """The rank the kernels see: padded with zero ranks to a multiple of LORA_RG."""
    return -(-rank // LORA_RG) * LORA_RG


def _padded(m: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out = np.zeros((rows, cols), m.dtype)
    out[:m.shape[0], :m.shape[1]] = m
    return out


def pack_lora_a(a: np.ndarray) -> np.ndarray:
    """A [r, K] → the kernels' Aᵀ [K, r'] (r' padded with zero ranks to a multiple of 4)."""
    r, K = a.shape
    return np.ascontiguousarray(_padded(a, kernel_rank(r), K).T)


def pack_lora_a_bf16(a: np.ndarray) -> np.ndarray:
    """bf16 A [r, K] (uint16 bits) → the bf16 dot-product (bf16_dp) kernels' [K'/2, r', 2] (K' = K rounded
    up to even, r' to 4; zero padding): 2 consecutive k of a rank in each 4 bytes."""
    r, K = a.shape
    rp, kp = kernel_rank(r), K + K % 2
    a2 = _padded(a.astype(np.uint16), rp, kp).reshape(rp, kp // 2, 2)               # [i, k/2, k%2]
    return np.ascontiguousarray(a2.transpose(1, 0, 2))


def pack_lora_a_i8(a: np.ndarray) -> np.ndarray:
    """int8 A [r, K] → the integer kernels' [K'/4, r', 4] bytes q + 128 (K' = K rounded up to 32,
    r' to 4; zero padding): 4 consecutive k of a rank in each 4 bytes."""
    r, K = a.shape
    rp, kp = kernel_rank(r), -(-K // 32) * 32
    a4 = _padded(a.astype(np.int8), rp, kp).reshape(rp, kp // 4, 4)                # [i, k/4, k%4]
    return np.ascontiguousarray(a4.transpose(1, 0, 2)).view(np.uint8) ^ np.uint8(0x80)


def pack_lora_bt(bt: np.ndarray) -> np.ndarray:
    """Bᵀ [r, N] → the kernels' [N'/16, r', 16] (r', N' padded with zeros to 4 and 16)."""
    r, N = bt.shape
    rp, np_ = kernel_rank(r), -(-N // LORA_VB) * LORA_VB
    return np.ascontiguousarray(_padded(bt, rp, np_).reshape(rp, np_ // LORA_VB, LORA_VB).transpose(1, 0, 2))


def pack_lora_bt_bf16(bt: np.ndarray) -> np.ndarray:
    """bf16 Bᵀ [r, N] (uint16 bits) → the bf16 dot-product (bf16_dp) kernels' [N'/16, r'/2, 16, 2] (N' = N
    rounded up to 16, r' to 4; zero padding): 2 consecutive ranks of an output in each 4 bytes."""
    r, N = bt.shape
    rp, np_ = kernel_rank(r), -(-N // LORA_VB) * LORA_VB
    b = _padded(bt.astype(np.uint16), rp, np_).reshape(rp // 2, 2, np_ // LORA_VB, LORA_VB)   # [i/2, i%2, n/16, n%16]
    return np.ascontiguousarray(b.transpose(2, 0, 3, 1))


def pack_lora(a: np.ndarray, bt: np.ndarray, a_dtype: str, b_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """A [r, K] and Bᵀ [r, N] of kernel dtypes f32 / bf16 / bf16_dp (both uint16 bits) / int8 in
    the layouts the kernels stream (lora.h), each by its own dtype."""
    pa = {"f32": pack_lora_a, "bf16": pack_lora_a, "bf16_dp": pack_lora_a_bf16, "int8": pack_lora_a_i8}[a_dtype]
    pb = {"f32": pack_lora_bt, "bf16": pack_lora_bt, "bf16_dp": pack_lora_bt_bf16, "int8": pack_lora_bt_i8}[b_dtype]
    return pa(a), pb(bt)


def pack_lora_bt_i8(bt: np.ndarray) -> np.ndarray:
    """int8 Bᵀ [r, N] → the integer kernels' [N'/16, r'/4, 16, 4] bytes q + 128 (N' = N rounded
    up to 16, r' to 4; zero padding)."""
    r, N = bt.shape
    rp, np_ = kernel_rank(r), -(-N // LORA_VB) * LORA_VB
    b = _padded(bt.astype(np.int8), rp, np_).reshape(rp // 4, 4, np_ // LORA_VB, LORA_VB)   # [i/4, i%4, n/16, n%16]
    return np.ascontiguousarray(b.transpose(2, 0, 3, 1)).view(np.uint8) ^ np.uint8(0x80)


@dataclass
class LoadedAdapter:
    name: str
    adapter: Adapter
    table: object                 # cffi "struct ifg_lora *[n_layers * 7]"
    nbytes: int
    load_s: float
    path: str
    mtime: float
    pinned: bool = False
    in_use: int = 0               # requests holding it
    uses: int = 0
    keep: list = field(default_factory=list, repr=False)

    @property
    def rank(self) -> int:
        return self.adapter.rank

    @property
    def kernel_rank(self) -> int:
        """Columns of h the kernels need for this adapter (its rank, padded)."""
        return kernel_rank(self.adapter.rank)

    @property
    def use_dora(self) -> bool:
        return self.adapter.use_dora


class AdapterManager:
    def __init__(self, kern, base: Model, budget_mb: float | None = None):
        self.kern, self.base, self.budget_mb = kern, base, budget_mb
        self.loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()   # LRU: least recent first
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.loaded.values())

    @property
    def max_rank(self) -> int:
        return max((a.rank for a in self.loaded.values()), default=0)

    def load(self, path: str | Path, name: str | None = None, pinned: bool = False) -> LoadedAdapter:
        t0 = time.perf_counter()
        p = Path(path)
        a = load_adapter(p, self.base, name)
        old = self.loaded.get(a.name)
        if old is not None and old.in_use:
            raise InfengError(f"adapter {a.name!r} is in use by {old.in_use} request(s); reload it when they finish")
        la = self._build(a, p, pinned)
        la.load_s = time.perf_counter() - t0
        if old is not None:
            del self.loaded[a.name]
        self._make_room(la.nbytes)
        self.loaded[a.name] = la
        return la

    def unload(self, name: str) -> None:
        la = self.get(name)
        if la.in_use:
            raise InfengError(f"adapter {name!r} is in use by {la.in_use} request(s)")
        del self.loaded[name]

    def get(self, name: str) -> LoadedAdapter:
        la = self.loaded.get(name)
        if la is None:
            raise InfengError(f"adapter {name!r} is not loaded (loaded: {', '.join(self.loaded) or 'none'})")
        return la

    def acquire(self, name: str) -> LoadedAdapter:
        la = self.get(name)
        la.in_use += 1
        la.uses += 1
        self.loaded.move_to_end(name)
        return la

    def release(self, la: LoadedAdapter) -> None:
        la.in_use -= 1

    def reload_changed(self) -> list[str]:
        """Reload every idle adapter whose file changed on disk; returns their names."""
        out = []
        for name, la in list(self.loaded.items()):
            try:
                m = os.stat(la.path).st_mtime
            except OSError:
                continue
            if m != la.mtime and not la.in_use:
                self.load(la.path, name, la.pinned)
                out.append(name)
        return out

    def _make_room(self, need: int) -> None:
        if self.budget_mb is None:
            return
        budget = self.budget_mb * 2**20
        if need > budget:
            raise InfengError(f"adapter needs {need / 2**20:.1f} MB, more than the adapter budget of {self.budget_mb} MB")
        for name in list(self.loaded):
            if self.nbytes + need <= budget:
                return
            la = self.loaded[name]
            if not la.pinned and not la.in_use:
                del self.loaded[name]
                self.evictions += 1
        if self.nbytes + need > budget:
            raise InfengError(f"adapter budget of {self.budget_mb} MB is full of pinned or busy adapters")

    def _build(self, a: Adapter, path: Path, pinned: bool) -> LoadedAdapter:
        cfg = self.base.config
        S = Structs(self.kern)
        table = S.lora_table(cfg.n_layers * len(MATRICES))
        nbytes = 0
        for t in a.targets:
            _, layer, proj = t.split(".")
            int8 = a.storage == "int8"
            if int8:                    # int8 A and Bᵀ; their scales and s fold into h
                _, A = a.tensors[f"{t}.lora_a"]
                _, Bt = a.tensors[f"{t}.lora_bt"]
                hs = a.tensors[f"{t}.lora_a_scale"][1] * a.tensors[f"{t}.lora_bt_scale"][1] * np.float32(a.scale)
                a_code = b_code = LORA_I8
                la_dtype = lb_dtype = "int8"
            else:                       # float files store B [out, r]
                la_dtype, A = a.tensors[f"{t}.lora_a"]
                lb_dtype, B = a.tensors[f"{t}.lora_b"]
                Bt = B.T
                hs = np.full(a.rank, a.scale, np.float32)
                # bf16 pairs take their input as the base's bf16 matrices do: rounded to bf16 for
                # vdpbf16ps (bf16_dp) under bf16_act=bf16, exact products by default
                if takes_bf16_dp(self.base, la_dtype, lb_dtype):
                    la_dtype = lb_dtype = "bf16_dp"
                a_code, b_code = dtype_code(la_dtype), dtype_code(lb_dtype)
            A, Bt = pack_lora(A, Bt, la_dtype, lb_dtype)
            hs = _padded(np.asarray(hs, np.float32)[None, :], 1, kernel_rank(a.rank))[0]
            dora = None
            if a.use_dora:
                w = self.base.f32(f"layers.{layer}.{proj}") + a.delta(t)
                dora = np.ascontiguousarray(a.f32(f"{t}.dora_m") / np.linalg.norm(w, axis=1), dtype=np.float32)
                nbytes += dora.nbytes
            table[int(layer) * len(MATRICES) + MATRICES.index(proj)] = S.lora(
                A, a_code, Bt, b_code, hs, kernel_rank(a.rank), dora)
            nbytes += A.nbytes + Bt.nbytes + hs.nbytes
        return LoadedAdapter(a.name, a, table, nbytes, 0.0, str(path), os.stat(path).st_mtime, pinned,
                             keep=S.keep)
