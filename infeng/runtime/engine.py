"""Engine: requests in, tokens out.

    engine = Engine.load("model.infeng", threads=2, kv_budget_mb=512, max_batch_tokens=512)
    for ev in engine.stream([Request(id="a", prompt="...", params=SamplingParams(max_tokens=64))]):
        ...   # TokenEvent per sampled token, then one FinishEvent per request

Every step packs one ragged batch: one decode token for each running sequence plus prefill
chunks of admitted prompts (chunked prefill, at most ``max_batch_tokens`` tokens a step), runs
it through one C forward call and samples the next token of every sequence whose logits came
out. Sequences join and leave between steps.

Scheduling: higher ``priority`` first, first come first served within a priority, and a waiting
request gains one priority level per ``aging_s`` seconds so nothing starves. Admission control
rejects (finish reason "rejected", with the reason) instead of queueing without bound. KV memory
is a block pool bounded by ``kv_budget_mb``; when it runs dry the lowest-priority, newest running
sequence is preempted (its blocks released, its tokens kept) and recomputed later — its full
blocks usually survive in the prefix cache, so the recompute is mostly a cache hit. Prompts that
share full blocks of tokens share their K/V (see kv.py).

Step buffers, the KV pool and sampler scratch are allocated once: the decode loop allocates no
arrays. Prompts are tokenized in ``submit`` (the caller's thread), not inside a step.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from infeng import kernels
from infeng.errors import InfengError
from infeng.kernels import ptr
from infeng.model.llama import LlamaC
from infeng.model.loader import Model, load_model
from infeng.runtime.adapters import AdapterManager, LoadedAdapter, lora_scratch
from infeng.runtime.kv import KVCache
from infeng.runtime.sampler import Sampler, SamplingParams, token_logprobs
from infeng.runtime.tokenizer import StreamDecoder, Tokenizer

DEFAULT_CONTEXT = 4096


@dataclass
class Request:
    id: str
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0                  # higher runs sooner
    deadline_s: float | None = None    # seconds after submission; then it ends with "deadline"
    adapter: str | None = None         # name of a loaded LoRA/DoRA adapter


@dataclass
class Result:
    id: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str      # length | stop | context | cancelled | rejected | deadline
    seed: int | None
    t_submit: float
    t_admit: float | None = None
    t_first: float | None = None
    t_done: float | None = None
    token_times: list[float] = field(default_factory=list)
    request: Request | None = field(default=None, repr=False)
    text: str = ""                     # the completion (stop string excluded)
    error: str | None = None           # why it was rejected
    cached_tokens: int = 0             # prompt tokens served from the prefix cache
    preemptions: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_submit

    @property
    def queue_s(self) -> float | None:
        return None if self.t_admit is None else self.t_admit - self.t_submit

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None


@dataclass
class TokenEvent:
    id: str
    token_id: int
    text: str          # the text this token completed ("" while held back)
    logprobs: tuple | None = None   # (log p of the token, [(id, log p)...]) when params.logprobs is set


@dataclass
class FinishEvent:
    id: str
    result: Result


@dataclass
class _Seq:
    req: Request
    order: int              # arrival number (FCFS tie-break)
    ids: list[int]          # prompt + generated
    n_prompt: int           # tokens to prefill before sampling (grows on preemption)
    sampler: Sampler | None
    result: Result
    decoder: StreamDecoder | None
    slot: int = -1
    n_fed: int = 0          # tokens through the forward pass (their K/V is cached)
    text: str = ""          # completion text so far (with a possible held-back tail)
    emitted: int = 0        # characters of text already handed out
    stop_hit: bool = False  # ended on a stop string (text already cut before it)
    adapter: LoadedAdapter | None = None

    @property
    def salt(self) -> str | None:
        return self.adapter.name if self.adapter else None

    @property
    def prefilling(self) -> bool:
        return self.n_fed < self.n_prompt


@dataclass
class StepStats:
    steps: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0      # wall time of steps that carried prefill tokens
    decode_tokens: int = 0
    decode_s: float = 0.0       # wall time of decode-only steps
    c_s: float = 0.0            # time inside the C forward call
    step_s: float = 0.0         # whole-step wall time: packing, C call, sampling, bookkeeping
                                # (step_s - c_s is the Python-side overhead, sampling included)
    sampled: int = 0
    batch_tokens: int = 0       # sums over steps, for means
    running: int = 0            # sequences in the batch
    queued: int = 0             # requests waiting
    max_running: int = 0
    max_queued: int = 0
    max_kv_blocks: int = 0
    preemptions: int = 0
    rejected: int = 0


def _by_adapter(seqs) -> list:
    """The sequences in order, except that those using the same adapter are made adjacent (in
    order of first appearance): each adapter is then one segment of the batch, and its weights
    are read once per step instead of once per row."""
    groups: dict[int, list] = {}
    for s in seqs:
        groups.setdefault(id(s.adapter), []).append(s)
    return [s for g in groups.values() for s in g]


class Engine:
    def __init__(self, model: Model, threads: int | None = None, max_batch: int = 8,
                 max_batch_tokens: int = 512, max_seq_len: int | None = None, block_size: int = 16,
                 kv_budget_mb: float | None = None, isa: str | None = None, max_queue: int = 4096,
                 max_queued_tokens: int | None = None, aging_s: float = 10.0, detokenize: bool = True,
                 tokenizer: Tokenizer | None = None, net=None, clock=None, prefix_cache: bool = True,
                 adapter_budget_mb: float | None = None):
        """``net`` and ``clock`` replace the C forward pass and the wall clock (the simulator
        drives this same scheduler with a cost model and virtual time)."""
        self.model, self.cfg = model, model.config
        self.kern = kernels.load(isa) if isa else kernels.active()
        self.isa = self.kern.ffi.string(self.kern.lib.ifg_isa()).decode()
        self.threads = threads or default_threads()
        self.max_batch = max_batch
        if max_seq_len is not None and not 0 < max_seq_len <= self.cfg.max_seq_len:
            raise InfengError(f"context length {max_seq_len} must be in 1..{self.cfg.max_seq_len} (the model's maximum)")
        # The KV pool is sized for every slot at full context, so a 128k-context model gets a
        # default window that fits in memory; ask for more explicitly.
        self.max_seq_len = max_seq_len or min(self.cfg.max_seq_len, DEFAULT_CONTEXT)
        self.max_batch_tokens = max(max_batch_tokens, max_batch)
        self.max_queue = max_queue
        self.max_queued_tokens = max_queued_tokens
        self.aging_s = aging_s
        self.detokenize = detokenize
        self.prefix_cache = prefix_cache
        self.tokenizer = tokenizer or Tokenizer(model.tokenizer, self.cfg.bos_id, self.cfg.eos_ids)
        self.clock = clock or time.perf_counter
        self.net = net or LlamaC(self.kern, model, self.max_batch_tokens, max_batch, self.threads)
        self.step_log: list | None = None   # set to a list to record (T, n_out, ctx, seconds) per step
        try:
            self.kv = KVCache(self.kern, self.cfg, max_batch, self.max_seq_len, block_size, kv_budget_mb)
        except MemoryError:
            raise InfengError(f"not enough memory for a KV cache of {max_batch} sequences x {self.max_seq_len} "
                              f"positions: lower --max-batch or --ctx") from None
        if self.kv.n_blocks < self.kv.max_blocks:
            raise InfengError(f"KV budget {kv_budget_mb} MB holds {self.kv.n_blocks * block_size} positions, "
                              f"less than one sequence of {self.max_seq_len}: raise it or lower the context")
        V = self.cfg.vocab_size
        self._probs = np.zeros((max_batch, V), np.float32)
        self._idx = np.zeros((max_batch, V), np.int32)
        self._scratch = [(ptr(self.kern, self._probs[i]), ptr(self.kern, self._idx[i], "int32_t *"))
                         for i in range(max_batch)]
        self.stats = StepStats()
        self.adapters = AdapterManager(self.kern, model, adapter_budget_mb)
        self._seg_start = np.zeros(2 * max_batch + 2, np.int32)      # rows of each adapter segment
        self._seg_tables = self.kern.ffi.new("struct ifg_lora **[]", 2 * max_batch + 1)
        self._lora = self.kern.ffi.new("struct ifg_lora_batch *")
        self._lora.seg_start = ptr(self.kern, self._seg_start, "int32_t *")
        self._lora.seg = self._seg_tables
        self._lora_h = None
        self._lora_tmp = None
        self._arrivals = 0
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._outbox: deque = deque()
        self._cancel: set[str] = set()

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, **kw) -> "Engine":
        return cls(load_model(path, verify=verify), **kw)

    # ---- the public API -------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue a request (tokenized here, on the caller's thread). A request that cannot run
        finishes at the next step with finish_reason "rejected" and the reason in ``error``."""
        now = self.clock()
        self._arrivals += 1
        try:
            params = req.params.validated(f"request {req.id}")
            ids = self.prompt_ids(req)
            if len(ids) >= self.max_seq_len:
                raise InfengError(f"request {req.id}: prompt of {len(ids)} tokens leaves no room in the "
                                  f"context of {self.max_seq_len}")
            if len(self._waiting) >= self.max_queue:
                raise InfengError(f"request {req.id}: queue full ({self.max_queue} requests waiting)")
            if self.max_queued_tokens is not None:
                queued = sum(s.n_prompt - s.n_fed for s in self._waiting)
                if queued + len(ids) > self.max_queued_tokens:
                    raise InfengError(f"request {req.id}: queued prompt tokens would exceed {self.max_queued_tokens}")
            if req.deadline_s is not None and not req.deadline_s > 0:
                raise InfengError(f"request {req.id}: deadline_s must be > 0")
            adapter = self.adapters.acquire(req.adapter) if req.adapter else None
        except InfengError as e:
            r = Result(req.id, [], [], "rejected", None, now, t_done=now, request=req, error=str(e))
            self.stats.rejected += 1
            self._outbox.append(FinishEvent(req.id, r))
            return
        res = Result(req.id, list(ids), [], "length", params.seed, now, request=req)  # the caller's
        req = Request(req.id, req.prompt, req.prompt_ids, params, req.priority, req.deadline_s, req.adapter)
        dec = self.tokenizer.stream(ids) if (self.detokenize or params.stop) else None
        self._waiting.append(_Seq(req, self._arrivals, list(ids), len(ids), None, res, dec, adapter=adapter))

    def cancel(self, request_id: str) -> None:
        """End a request at the next step (finish_reason "cancelled"), freeing its blocks."""
        self._cancel.add(request_id)

    @property
    def occupancy(self) -> tuple[int, int]:
        """(requests waiting, sequences running), for a front end's gauges."""
        return len(self._waiting), len(self._running)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._running or self._outbox)

    def stream(self, requests: Iterable[Request] = ()) -> Iterator[TokenEvent | FinishEvent]:
        """Submit ``requests`` and run until every request has finished, yielding events."""
        for r in requests:
            self.submit(r)
        while self.busy:
            yield from self.step()

    def generate(self, requests: Iterable[Request]) -> Iterator[Result | tuple[Request, InfengError]]:
        """Run requests to completion, yielding each Result as it finishes, or (request, error)
        for a request that was rejected."""
        for ev in self.stream(requests):
            if isinstance(ev, FinishEvent):
                if ev.result.finish_reason == "rejected":
                    yield (ev.result.request, InfengError(ev.result.error))
                else:
                    yield ev.result

    def load_adapter(self, path, name: str | None = None, pinned: bool = False) -> LoadedAdapter:
        """Load (or hot-reload, by name) an adapter while the engine runs; requests can name it
        from the next step on."""
        return self.adapters.load(path, name, pinned)

    def unload_adapter(self, name: str) -> None:
        self.adapters.unload(name)

    def prompt_ids(self, req: Request) -> list[int]:
        if req.prompt_ids is not None:
            ids = list(req.prompt_ids)
            bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < self.cfg.vocab_size)]
            if bad:
                raise InfengError(f"request {req.id}: token id {bad[0]!r} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
            return ids or [self.cfg.bos_id or 0]
        return self.tokenizer.encode(req.prompt or "")

    # ---- one step -------------------------------------------------------------------------
    def step(self) -> list[TokenEvent | FinishEvent]:
        events: list = []
        while self._outbox:
            events.append(self._outbox.popleft())
        t0 = self.clock()
        self._expire(t0, events)
        self._admit(t0)
        if not self._running:
            return events
        net, kv, st = self.net, self.kv, self.stats
        # decode tokens first (one each), then prefill chunks, highest priority first
        T = n_out = n_seqs = 0
        self._ctx = 0
        self._n_seg, self._seg_ad = 0, []
        has_prefill = False
        outs: list[_Seq] = []
        for s in _by_adapter(s for s in self._running if not s.prefilling):
            n_seqs += 1
            T = self._put(s, 1, T)
            net.out_rows[n_out] = T - 1
            n_out += 1
            outs.append(s)
        budget = self.max_batch_tokens
        for s in self._running:
            if s.prefilling and T < budget:
                n = min(s.n_prompt - s.n_fed, budget - T)
                T = self._put(s, n, T)
                n_seqs += 1
                has_prefill = True
                st.prefill_tokens += n
                if not s.prefilling:
                    net.out_rows[n_out] = T - 1
                    n_out += 1
                    outs.append(s)
        lora = self._lora_batch(T)
        tc = self.clock()
        net.step(kv, T, n_out, lora)
        st.c_s += self.clock() - tc
        if self.prefix_cache:
            for s in self._running:
                kv.register_full(s.slot, s.ids, s.n_fed, s.salt)
        # sample, stream, finish
        for i, s in enumerate(outs):
            p = s.req.params
            if p.logits_processor is not None:
                p.logits_processor(s.result.token_ids, net.logits[i])
            tok = s.sampler(net.logit_rows[i])
            lp = token_logprobs(net.logits[i], tok, p.logprobs) if p.logprobs is not None else None
            now = self.clock()
            s.ids.append(tok)
            r = s.result
            r.token_ids.append(tok)
            r.token_times.append(now)
            if r.t_first is None:
                r.t_first = now
            reason = self._stop_reason(s, tok)
            if reason and s.decoder is not None and not s.stop_hit:
                s.text += s.decoder.flush()
            events.append(TokenEvent(r.id, tok, self._text_delta(s, final=reason is not None), lp))
            if reason:
                self._finish(s, reason, now, events)
        dt = self.clock() - t0
        st.steps += 1
        st.step_s += dt
        if self.step_log is not None:
            self.step_log.append((T, n_out, self._ctx, dt))
        st.sampled += len(outs)
        st.batch_tokens += T
        st.running += n_seqs
        st.queued += len(self._waiting)
        st.max_running = max(st.max_running, len(self._running))
        st.max_queued = max(st.max_queued, len(self._waiting))
        st.max_kv_blocks = max(st.max_kv_blocks, kv.blocks_used())
        if has_prefill:
            st.prefill_s += dt
        else:
            st.decode_tokens += len(outs)
            st.decode_s += dt
        return events

    # ---- scheduling -----------------------------------------------------------------------
    def _rank(self, s: _Seq, now: float) -> tuple[float, int]:
        """Sort key: smaller runs first (aged priority, then arrival)."""
        waited = now - s.result.t_submit
        return (-(s.req.priority + waited / self.aging_s), s.order)

    def _expire(self, now: float, events: list) -> None:
        for s in list(self._waiting) + list(self._running):
            if s.req.id in self._cancel:
                self._finish(s, "cancelled", now, events)
            elif s.req.deadline_s is not None and now - s.result.t_submit > s.req.deadline_s:
                self._finish(s, "deadline", now, events)
        self._cancel.clear()

    def _admit(self, now: float) -> None:
        kv = self.kv
        # running sequences need a block for the token they decode next
        for s in sorted(self._running, key=lambda s: self._rank(s, now)):
            if s in self._running and not s.prefilling:
                while not kv.ensure(s.slot, s.n_fed + 1):
                    # free blocks by preempting the lowest-ranked sequence, s itself if it is that
                    v = self._preempt_one(now, protect=None)
                    if v is None or v is s:
                        break
        # new sequences, best first, while slots and blocks last
        self._waiting.sort(key=lambda s: self._rank(s, now))
        deferred = []
        while self._waiting:
            s = self._waiting[0]
            if self.prefix_cache and self._prefix_in_flight(s):
                deferred.append(self._waiting.pop(0))   # its prefix is being computed right now:
                continue                                 # join next step and share those blocks
            if not self._free_slots and not self._preempt_one(now, protect=None, below=s):
                break       # every slot busy with something that ranks at least as high
            slot = self._free_slots[-1]
            cached = kv.attach_prefix(slot, s.ids, s.salt) if self.prefix_cache else 0
            if not kv.ensure(slot, s.n_prompt):
                kv.release(slot)
                # make room only by preempting something that ranks below the newcomer
                if self._preempt_one(now, protect=None, below=s):
                    continue
                break
            self._free_slots.pop()
            self._waiting.pop(0)
            s.slot, s.n_fed = slot, cached
            r = s.result
            if r.t_admit is None:
                r.t_admit = now
                r.cached_tokens = cached
            if s.sampler is None:
                s.sampler = Sampler(self.kern, s.req.params, self.cfg.vocab_size, *self._scratch[slot])
            else:       # keep the random stream; point at this slot's scratch
                s.sampler.probs, s.sampler.idx = self._scratch[slot]
            if s.req.params.max_tokens == 0:
                self._running.append(s)
                self._finish(s, "length", now, self._outbox)
                continue
            self._running.append(s)
        self._waiting[:0] = deferred
        # rows of one adapter side by side: one segment per adapter in the step's batch
        self._running.sort(key=lambda s: s.salt or "")

    def _prefix_in_flight(self, w: _Seq) -> bool:
        """Does a running sequence still prefill a full block that ``w``'s prompt starts with
        and the cache does not hold yet? (Prompts sharing a system prompt that arrive together
        would otherwise all compute it.)"""
        kv, bs = self.kv, self.kv.block_size
        n_full = (len(w.ids) - 1) // bs
        if n_full == 0:
            return False
        for s in self._running:
            if s.prefilling and s.n_prompt > bs and s.salt == w.salt and s.ids[:bs] == w.ids[:bs]:
                done = len(kv.hashes[s.slot])        # blocks of s already published
                m = 0
                while m < n_full and (m + 1) * bs <= s.n_prompt and \
                        s.ids[m * bs:(m + 1) * bs] == w.ids[m * bs:(m + 1) * bs]:
                    m += 1
                if m > done:
                    return True
        return False

    def _preempt_one(self, now: float, protect: _Seq | None, below: _Seq | None = None) -> _Seq | None:
        """Release the lowest-ranked running sequence (not ``protect``; ranked below ``below``
        if given) back to the queue; returns it, or None if there is none."""
        cands = [s for s in self._running if s is not protect]
        if below is not None:
            key = self._rank(below, now)
            cands = [s for s in cands if self._rank(s, now) > key]
        if not cands:
            return None
        v = max(cands, key=lambda s: self._rank(s, now))
        self._running.remove(v)
        self.kv.release(v.slot)
        self._free_slots.append(v.slot)
        v.slot, v.n_fed = -1, 0
        v.n_prompt = len(v.ids)     # recompute all it has (prompt + generated), then sample on
        v.result.preemptions += 1
        self.stats.preemptions += 1
        self._waiting.append(v)
        return v

    def _put(self, s: _Seq, n: int, T: int) -> int:
        net, start = self.net, s.n_fed
        if self._n_seg == 0 or self._seg_ad[-1] is not s.adapter:     # a new adapter segment
            self._seg_ad.append(s.adapter)
            self._seg_start[self._n_seg] = T
            self._n_seg += 1
        self._ctx += n * start + n * (n + 1) // 2        # attention work: positions attended
        for j in range(n):
            net.tokens[T + j] = s.ids[start + j]
            net.pos[T + j] = start + j
            net.seq[T + j] = s.slot
        s.n_fed = start + n
        return T + n

    def _lora_batch(self, T: int):
        """The C view of this step's adapter segments, or NULL when no row uses an adapter."""
        if all(a is None for a in self._seg_ad):
            return self.kern.ffi.NULL
        L, ffi = self._lora, self.kern.ffi
        r = max(a.kernel_rank for a in self._seg_ad if a is not None)
        if self._lora_h is None or self._lora_h.shape[1] < r:     # grows with the largest rank seen
            self._lora_h = lora_scratch(self.kern, self.cfg, self.max_batch_tokens, r)
            self._lora_tmp = np.zeros((self.max_batch_tokens, self.cfg.dim), np.float32)
            L.h, L.max_rank = ptr(self.kern, self._lora_h), self._lora_h.shape[1]
            L.tmp = ptr(self.kern, self._lora_tmp)
        for i, a in enumerate(self._seg_ad):
            self._seg_tables[i] = a.table if a is not None else ffi.NULL
        self._seg_start[self._n_seg] = T
        L.n_seg = self._n_seg
        return L

    def _stop_reason(self, s: _Seq, tok: int) -> str | None:
        p = s.req.params
        if (not p.ignore_eos and tok in self.tokenizer.eos_ids) or tok in p.stop_token_ids:
            return "stop"
        if s.decoder is not None:
            s.text += s.decoder.push(tok)
            if p.stop:
                window = s.text[max(0, s.emitted - max(map(len, p.stop))):]
                hits = [window.find(x) for x in p.stop if x in window]
                if hits:
                    s.text = s.text[:len(s.text) - len(window) + min(hits)]
                    s.stop_hit = True
                    return "stop"
        if len(s.result.token_ids) >= p.max_tokens:
            return "length"
        if len(s.ids) >= self.max_seq_len:
            return "context"
        return None

    def _text_delta(self, s: _Seq, final: bool) -> str:
        """Text not yet handed out, keeping back a tail that could still become a stop string."""
        if s.decoder is None:
            return ""
        end = len(s.text)
        if not final:
            for x in s.req.params.stop:
                for k in range(min(len(x) - 1, end - s.emitted), 0, -1):
                    if s.text.endswith(x[:k]):
                        end = min(end, len(s.text) - k)
                        break
        delta = s.text[s.emitted:end]
        s.emitted = end
        return delta

    def _finish(self, s: _Seq, reason: str, now: float, events) -> None:
        r = s.result
        r.finish_reason, r.t_done = reason, now
        if s.decoder is not None:
            if not s.stop_hit:
                s.text += s.decoder.flush()
            r.text = s.text
        elif r.token_ids:           # not streamed: decode once, here, not per token
            toks = r.token_ids[:-1] if r.finish_reason == "stop" else r.token_ids
            r.text = self.tokenizer.completion_text(r.prompt_ids, toks)
        if s in self._running:
            self._running.remove(s)
            self.kv.release(s.slot)
            self._free_slots.append(s.slot)
        elif s in self._waiting:
            self._waiting.remove(s)
        if s.adapter is not None:
            self.adapters.release(s.adapter)
            s.adapter = None
        events.append(FinishEvent(r.id, r))


def default_threads() -> int:
    """Physical cores available to this process (hyperthreads share the FMA units)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        n = os.cpu_count() or 1
    try:
        siblings = open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read().strip()
        per_core = len([x for part in siblings.split(",") for x in
                        (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))])
        return max(1, n // max(per_core, 1))
    except (OSError, ValueError):
        return max(1, n)
