"""Paged KV cache with prefix sharing.

K/V live in a pool of fixed-size blocks per layer; each sequence slot has a block table, and the
attention kernels read through it, so a sequence's positions need not be contiguous and a block
can appear in several tables. A block that holds ``block_size`` positions of known tokens is
*full*: its content is a pure function of the token ids up to its end, so it is registered under
a chain hash of those ids and other sequences with the same prefix reuse it instead of
recomputing it. Blocks are reference counted; a full block whose last user leaves stays cached
(LRU) until its memory is needed.
"""
from __future__ import annotations

import mmap
from collections import OrderedDict

import numpy as np

from infeng.errors import InfengError
from infeng.kernels.abi import KV_ROT, KV_TYPE, KVQ_SHAPE
from infeng.kernels.structs import Structs
from infeng.model.config import ModelConfig
from infeng.quant.kvcache import CHANNEL, KV_TYPES, POS, part_bytes, rotation_signs
from infeng.runtime.kvspec import KVSpec, kv_spec


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array whose memory the OS supplies in small pages as they are first written.
    np.zeros asks for transparent huge pages on big arrays; a KV pool's first step then faults
    in (zeroes, maybe compacts for) 2 MiB per layer for K and V each — most of a second for
    SmolLM2's first prompt on a busy machine — where a few 4 KiB pages per block do."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        m = mmap.mmap(-1, max(n, 1))
    except OSError:
        raise MemoryError(f"cannot map {n} bytes") from None
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(m, dtype, count=n // np.dtype(dtype).itemsize).reshape(shape)


def full_window(cfg: ModelConfig) -> int:
    """The sliding window when every layer has it (then a sequence's KV is bounded by it), else 0."""
    return cfg.sliding_window if cfg.swa_layers and len(cfg.swa_layers) == cfg.n_layers else 0


class KVCache:
    def __init__(self, kern, cfg: ModelConfig, n_slots: int, max_seq_len: int,
                 block_size: int = 16, budget_mb: float | None = None, chunk: int | None = None,
                 spec: KVSpec | None = None):
        """``chunk``: the most positions a step prefills for one sequence, when the caller grants
        prefill blocks that many at a time (the scheduler does); with a sliding window it bounds
        what a sequence holds, and the pool is sized for that instead of the whole context."""
        self.block_size = block_size
        self.max_blocks = -(-max_seq_len // block_size)          # table entries per sequence
        # a model whose every layer attends to the last `window` positions only: a sequence holds
        # the blocks of its window (drop_before gives the older ones back) and of the chunk it
        # computes, never its whole context
        self.window = full_window(cfg)
        self.chunk = chunk if self.window and chunk else 0
        self.seq_blocks = self.max_blocks                        # blocks one sequence holds at most
        if self.chunk:      # positions [n_fed+1-window, n_fed+chunk) span at most this many blocks
            self.seq_blocks = min(self.max_blocks, (self.window + self.chunk - 2) // block_size + 2)
        self.spec = spec or kv_spec(cfg)
        k_layer, v_layer = self._layer_bytes(cfg, self.spec, block_size)   # per layer per block
        self.block_bytes = sum(k_layer) + sum(v_layer)                      # every layer, scales too
        # per-channel keys: the f32 rows of each slot's group being filled (kernels_c/kvq.h); two
        # groups, so a rejected draft (at most speculate.MAX_K + 1 positions) that crossed into the
        # next group leaves the one it rolls back into intact. The budget pays for it first.
        self.stage_rows = 2 * POS if any(t in CHANNEL for t in self.spec.k) else 0
        stage_bytes = 4 * cfg.n_layers * n_slots * self.stage_rows * cfg.n_kv_heads * cfg.head_dim
        n_blocks = n_slots * self.seq_blocks
        if budget_mb is not None:
            n_blocks = min(n_blocks, (int(budget_mb * 2**20) - stage_bytes) // self.block_bytes)
            if n_blocks < 1:
                raise InfengError(f"KV budget {budget_mb} MB holds no block of {self.block_bytes} bytes"
                                  + (f" beside the per-channel keys' stage of {stage_bytes} bytes" if stage_bytes else ""))
        self.n_blocks = n_blocks
        # one byte pool each for K and V; layer l's section starts at k_off[l] / v_off[l]
        self.k_off = np.concatenate([[0], np.cumsum(k_layer[:-1], dtype=np.int64) * n_blocks]).astype(np.int64)
        self.v_off = np.concatenate([[0], np.cumsum(v_layer[:-1], dtype=np.int64) * n_blocks]).astype(np.int64)
        self.k = lazy_zeros((sum(k_layer) * n_blocks,), np.uint8)
        self.v = lazy_zeros((sum(v_layer) * n_blocks,), np.uint8)
        self.table = np.zeros((n_slots, self.max_blocks), np.int32)
        self.owned: list[list[int]] = [[] for _ in range(n_slots)]   # block ids per slot, in order
        self.hashes: list[list[int]] = [[] for _ in range(n_slots)]  # chain hash per full block
        self.ref = [0] * n_blocks
        self.free = list(range(n_blocks - 1, -1, -1))                # never-filled or evicted
        self.cached: OrderedDict[int, int] = OrderedDict()           # hash → block, ref 0, LRU first
        self.by_hash: dict[int, int] = {}                            # hash → block, any ref
        self.hash_of: dict[int, int] = {}                            # block → hash
        self.hits = self.lookups = 0                                  # prefix tokens reused / asked
        self._structs = Structs(kern)
        codes = {name: KV_TYPE[name] for name in KV_TYPES}
        signs = rotation_signs(cfg.head_dim, self.spec.seed) if self.spec.rotated else None
        self.stage = lazy_zeros((stage_bytes // 4,), np.float32) if self.stage_rows else None
        self.struct = self._structs.kv_cache(
            self.k, self.v, self.table, n_blocks=n_blocks, block_size=block_size,
            k_type=np.array([codes[t] for t in self.spec.k], np.int32),
            v_type=np.array([codes[t] for t in self.spec.v], np.int32),
            k_off=self.k_off, v_off=self.v_off, group=self.spec.group, rot_signs=signs,
            rotate=self._rotate_bits(self.spec), stage=self.stage, stage_rows=self.stage_rows,
            n_seqs=n_slots)

    @staticmethod
    def _rotate_bits(spec: KVSpec) -> np.ndarray:
        """ifg_kv_cache.rotate: per layer, which of queries+keys / values the kernels rotate."""
        v = spec.rotate_v or (False,) * len(spec.rotate)
        return np.array([KV_ROT["k"] * a | KV_ROT["v"] * b for a, b in zip(spec.rotate, v)], np.int32)

    @staticmethod
    def _layer_bytes(cfg: ModelConfig, spec: KVSpec, bs: int) -> tuple[list[int], list[int]]:
        """Bytes of one block of each layer's K and V pools; refuses shapes the compressed layout
        cannot hold."""
        hd, n_kv = cfg.head_dim, cfg.n_kv_heads
        if not spec.all_f32:
            if bs % KVQ_SHAPE["pos"] or bs > KVQ_SHAPE["max_bs"]:
                raise InfengError(f"KV type {spec.describe()} needs a block size that is a multiple of "
                                  f"{KVQ_SHAPE['pos']} up to {KVQ_SHAPE['max_bs']}, not {bs}")
            if hd % KVQ_SHAPE["chunk"]:
                raise InfengError(f"KV type {spec.describe()} needs head_dim a multiple of "
                                  f"{KVQ_SHAPE['chunk']}; this model's is {hd}")
        k = [n_kv * part_bytes(t, bs, hd, spec.group) for t in spec.k]
        v = [n_kv * part_bytes(t, bs, hd, spec.group) for t in spec.v]
        return k, v

    @property
    def bytes_per_token(self) -> float:
        """KV bytes one position costs over all layers (codes and scales)."""
        return self.block_bytes / self.block_size

    @property
    def bytes(self) -> int:
        """The pools and the per-channel keys' stage."""
        return self.k.nbytes + self.v.nbytes + (self.stage.nbytes if self.stage is not None else 0)

    def blocks_used(self) -> int:
        """Blocks referenced by some sequence (cached-but-idle blocks count as free)."""
        return self.n_blocks - len(self.free) - len(self.cached)

    def available(self) -> int:
        return len(self.free) + len(self.cached)

    def held(self, slot: int) -> int:
        """Blocks the slot holds now (a sliding window's dropped ones not counted)."""
        return sum(b >= 0 for b in self.owned[slot])

    def room(self, slot: int) -> int:
        """Positions the slot has blocks for: [0, room) less what drop_before gave back."""
        return len(self.owned[slot]) * self.block_size

    def prefill_target(self, n_fed: int, n_prompt: int) -> int:
        """The positions a prefilling sequence needs blocks for before its next step: its whole
        prompt, or with a window only the next chunk (the earlier ones are dropped as it goes)."""
        return min(n_prompt, n_fed + self.chunk) if self.chunk else n_prompt

    # ---- prefix sharing -----------------------------------------------------------------
    def chain(self, ids: list[int], n_blocks: int, salt: str | None = None) -> list[int]:
        """Chain hashes of the first ``n_blocks`` full blocks of ``ids``. ``salt`` names what
        else the K/V depend on (an adapter), so different adapters never share blocks."""
        out, h, bs = [], hash(salt) if salt else 0, self.block_size
        for j in range(n_blocks):
            h = hash((h, tuple(ids[j * bs:(j + 1) * bs])))
            out.append(h)
        return out

    def attach_prefix(self, slot: int, ids: list[int], salt: str | None = None) -> int:
        """Point ``slot``'s table at cached blocks holding the longest known prefix of ``ids``;
        returns how many positions are already computed. At least the last prompt token is left
        to compute (its logits are needed). With a sliding window only the blocks the window
        still reads are taken (a chain hash names its whole prefix, so the older ones need not
        be cached at all)."""
        assert not self.owned[slot]
        bs = self.block_size
        n_full = (len(ids) - 1) // bs
        self.lookups += len(ids)
        hashes = self.chain(ids, n_full, salt)
        m = 0                               # blocks of prefix found
        if self.window:                     # the longest prefix whose window is all cached
            for m in range(n_full, 0, -1):
                if all(h in self.by_hash for h in hashes[self._first_needed(m * bs):m]):
                    break
            else:
                m = 0
        else:
            while m < n_full and hashes[m] in self.by_hash:
                m += 1
        first = self._first_needed(m * bs)
        for j in range(m):
            b = self.by_hash[hashes[j]] if j >= first else -1
            if b >= 0:
                self._take(b)
                self.table[slot, j] = b
            self.owned[slot].append(b)
            self.hashes[slot].append(hashes[j])
        n = m * bs
        self.hits += n
        return n

    def _first_needed(self, pos: int) -> int:
        """The first block a token at ``pos`` attends to (0 without a window)."""
        return max(0, pos + 1 - self.window) // self.block_size if self.window else 0

    def register_full(self, slot: int, ids: list[int], n_computed: int, salt: str | None = None) -> None:
        """Publish the slot's blocks that became full (all positions < n_computed written)."""
        bs = self.block_size
        have = len(self.hashes[slot])
        n_full = min(n_computed // bs, len(self.owned[slot]))
        if n_full <= have:
            return
        h = self.hashes[slot][-1] if have else (hash(salt) if salt else 0)
        for j in range(have, n_full):
            h = hash((h, tuple(ids[j * bs:(j + 1) * bs])))
            self.hashes[slot].append(h)
            b = self.owned[slot][j]
            if b >= 0 and h not in self.by_hash and b not in self.hash_of:
                self.by_hash[h] = b
                self.hash_of[b] = h

    # ---- allocation ---------------------------------------------------------------------
    def ensure(self, slot: int, n_positions: int) -> bool:
        """Own blocks for positions [0, n_positions) of ``slot``; False (nothing changed) if the
        pool cannot supply them."""
        need = -(-n_positions // self.block_size)
        if need > self.max_blocks:
            return False
        have = len(self.owned[slot])
        if need - have > self.available():
            return False
        for j in range(have, need):
            b = self._new_block()
            self.table[slot, j] = b
            self.owned[slot].append(b)
        return True

    def release(self, slot: int) -> None:
        for b in self.owned[slot]:
            self._unref(b)
        self.owned[slot] = []
        self.hashes[slot] = []

    def truncate(self, slot: int, n_positions: int) -> None:
        """Roll the slot back to its first ``n_positions`` positions (speculative tokens that were
        rejected): blocks wholly past them are given back, and no block holding a position past
        them stays published to the prefix cache. Positions past the end in the last kept block
        are garbage until rewritten; attention never reads past a row's own position."""
        bs = self.block_size
        keep = -(-n_positions // bs)
        own = self.owned[slot]
        while len(own) > keep:
            self._unref(own.pop())
        del self.hashes[slot][n_positions // bs:]

    def drop_before(self, slot: int, first: int) -> None:
        """Give back the slot's blocks wholly before position ``first`` (sliding-window models:
        attention never reads them again). Their table entries go stale; ``owned`` keeps -1."""
        own, bs = self.owned[slot], self.block_size
        for j in range(min(len(own), max(first, 0) // bs)):
            if own[j] >= 0:
                self._unref(own[j])
                own[j] = -1

    def _unref(self, b: int) -> None:
        if b < 0:                               # dropped already (drop_before)
            return
        self.ref[b] -= 1
        if self.ref[b] == 0:
            h = self.hash_of.get(b)
            if h is not None:
                self.cached[h] = b              # keep its content for a later prefix hit
            else:
                self.free.append(b)

    def _take(self, b: int) -> None:
        if self.ref[b] == 0:
            self.cached.pop(self.hash_of[b], None)
        self.ref[b] += 1

    def _new_block(self) -> int:
        if self.free:
            b = self.free.pop()
        else:                                   # evict the least recently released cached block
            h, b = self.cached.popitem(last=False)
            del self.by_hash[h]
            del self.hash_of[b]
        self.ref[b] = 1
        return b
