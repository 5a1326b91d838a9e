"""Which sequences run: admission, priorities and preemption over KV slots and blocks.

Higher ``priority`` first, first come first served within a priority, and a waiting request gains
one priority level per ``aging_s`` seconds so nothing starves. A running sequence that needs a
block the pool cannot give preempts the lowest-ranked running sequence (its blocks released, its
tokens kept for a recompute later, which the prefix cache mostly serves). A newcomer takes a slot
only from something ranked below it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from infeng.errors import InfengError
from infeng.runtime.adapters import LoadedAdapter
from infeng.runtime.kv import KVCache
from infeng.runtime.sampler import Sampler
from infeng.runtime.textstream import TextStream
from infeng.runtime.types import Request, Result


@dataclass
class Seq:
    req: Request
    order: int              # arrival number (FCFS tie-break)
    ids: list[int]          # prompt + generated
    n_prompt: int           # tokens to prefill before sampling (grows on preemption)
    result: Result
    text: TextStream | None = None     # None: not detokenized while running
    adapter: LoadedAdapter | None = None
    sampler: Sampler | None = None
    slot: int = -1
    n_fed: int = 0          # tokens through the forward pass (their K/V is cached)
    draft: list[int] = field(default_factory=list)   # speculative tokens verified by this step
    spec: object = None     # the speculator's per-sequence state (speculate.SeqSpec)
    rope_class: str | None = None      # LongRoPE / dynamic NTK past the original length: K/V differ by it

    @property
    def salt(self) -> str | None:
        """What else than the tokens the K/V depend on (prefix sharing): adapter, RoPE class."""
        a = self.adapter.name if self.adapter else None
        return a if self.rope_class is None else f"{a}|{self.rope_class}"

    @property
    def prefilling(self) -> bool:
        return self.n_fed < self.n_prompt


class Scheduler:
    def __init__(self, kv: KVCache, n_slots: int, max_queue: int, max_queued_tokens: int | None,
                 aging_s: float, prefix_cache: bool):
        self.kv, self.max_queue, self.max_queued_tokens = kv, max_queue, max_queued_tokens
        self.aging_s, self.prefix_cache = aging_s, prefix_cache
        self.waiting: list[Seq] = []
        self.running: list[Seq] = []
        self.free_slots = list(range(n_slots - 1, -1, -1))

    def check_room(self, req_id: str, n_prompt: int) -> None:
        """Admission control: refuse a request the queue has no room for."""
        if len(self.waiting) >= self.max_queue:
            raise InfengError(f"request {req_id}: queue full ({self.max_queue} requests waiting)")
        if self.max_queued_tokens is not None:
            queued = sum(s.n_prompt - s.n_fed for s in self.waiting)
            if queued + n_prompt > self.max_queued_tokens:
                raise InfengError(f"request {req_id}: queued prompt tokens would exceed {self.max_queued_tokens}")

    def rank(self, s: Seq, now: float) -> tuple[float, int]:
        """Sort key: smaller runs first (aged priority, then arrival)."""
        waited = now - s.result.t_submit
        return (-(s.req.priority + waited / self.aging_s), s.order)

    def expired(self, now: float, cancel: set[str]) -> list[tuple[Seq, str]]:
        """Sequences to end now: cancelled, or past their deadline."""
        out = []
        for s in self.waiting + self.running:
            if s.req.id in cancel:
                out.append((s, "cancelled"))
            elif s.req.deadline_s is not None and now - s.result.t_submit > s.req.deadline_s:
                out.append((s, "deadline"))
        return out

    def remove(self, s: Seq) -> None:
        """Take a sequence out (it finished): its slot and blocks go back."""
        if s in self.running:
            self.running.remove(s)
            self.kv.release(s.slot)
            self.free_slots.append(s.slot)
        elif s in self.waiting:
            self.waiting.remove(s)

    def admit(self, now: float) -> tuple[list[Seq], list[Seq], int]:
        """Give running sequences the block their next token needs, then admit waiting ones, best
        first, while slots and blocks last. Returns the newly admitted sequences (they hold a slot
        and run from the next batch), those admitted with nothing to generate (max_tokens 0:
        already out again, to be finished by the caller), and how many were preempted."""
        kv, preempted = self.kv, 0
        # running sequences need a block for the token they decode next (or, prefilling a
        # sliding-window model's prompt, for its next chunk)
        for s in sorted(self.running, key=lambda s: self.rank(s, now)):
            if s in self.running and (kv.chunk or not s.prefilling):
                need = kv.prefill_target(s.n_fed, s.n_prompt) if s.prefilling else s.n_fed + 1
                while not kv.ensure(s.slot, need):
                    # free blocks by preempting the lowest-ranked sequence, s itself if it is that
                    v = self._preempt_one(now)
                    if v is None:
                        break
                    preempted += 1
                    if v is s:
                        break
        self.waiting.sort(key=lambda s: self.rank(s, now))
        admitted, empty, deferred = [], [], []
        while self.waiting:
            s = self.waiting[0]
            if self.prefix_cache and self._prefix_in_flight(s):
                deferred.append(self.waiting.pop(0))    # its prefix is being computed right now:
                continue                                 # join next step and share those blocks
            if not self.free_slots:
                if not self._preempt_one(now, below=s):
                    break       # every slot busy with something that ranks at least as high
                preempted += 1
            slot = self.free_slots[-1]
            cached = kv.attach_prefix(slot, s.ids, s.salt) if self.prefix_cache else 0
            if not kv.ensure(slot, kv.prefill_target(cached, s.n_prompt)):
                kv.release(slot)
                # make room only by preempting something that ranks below the newcomer
                if self._preempt_one(now, below=s):
                    preempted += 1
                    continue
                break
            self.free_slots.pop()
            self.waiting.pop(0)
            s.slot, s.n_fed = slot, cached
            if s.result.t_admit is None:
                s.result.t_admit = now
                s.result.cached_tokens = cached
            self.running.append(s)
            if s.req.params.max_tokens == 0:
                self.remove(s)
                empty.append(s)
            else:
                admitted.append(s)
        self.waiting[:0] = deferred
        return admitted, empty, preempted

    def _prefix_in_flight(self, w: Seq) -> bool:
        """Does a running sequence still prefill a full block that ``w``'s prompt starts with
        and the cache does not hold yet? (Prompts sharing a system prompt that arrive together
        would otherwise all compute it.)"""
        kv, bs = self.kv, self.kv.block_size
        n_full = (len(w.ids) - 1) // bs
        if n_full == 0:
            return False
        for s in self.running:
            if s.prefilling and s.n_prompt > bs and s.salt == w.salt and s.ids[:bs] == w.ids[:bs]:
                done = len(kv.hashes[s.slot])        # blocks of s already published
                m = 0
                while m < n_full and (m + 1) * bs <= s.n_prompt and \
                        s.ids[m * bs:(m + 1) * bs] == w.ids[m * bs:(m + 1) * bs]:
                    m += 1
                if m > done:
                    return True
        return False

    def _preempt_one(self, now: float, below: Seq | None = None) -> Seq | None:
        """Release the lowest-ranked running sequence (ranked below ``below`` if given) back to
        the queue; returns it, or None if there is none."""
        cands = self.running
        if below is not None:
            key = self.rank(below, now)
            cands = [s for s in cands if self.rank(s, now) > key]
        if not cands:
            return None
        v = max(cands, key=lambda s: self.rank(s, now))
        self.running.remove(v)
        self.kv.release(v.slot)
        self.free_slots.append(v.slot)
        v.slot, v.n_fed = -1, 0
        v.n_prompt = len(v.ids)     # recompute all it has (prompt + generated), then sample on
        v.result.preemptions += 1
        self.waiting.append(v)
        return v
