"""Engine: requests in, tokens out.

    engine = Engine.load("model.infeng", threads=2, kv_budget_mb=512, max_batch_tokens=512)
    for ev in engine.stream([Request(id="a", prompt="...", params=SamplingParams(max_tokens=64))]):
        ...   # TokenEvent per sampled token, then one FinishEvent per request

Every step schedules (scheduler.py: admission, priorities, preemption), packs one ragged batch
(packer.py: a decode token per running sequence plus prefill chunks, at most
``max_batch_tokens`` tokens a step, rows grouped by adapter), runs it through one C forward call
(session.py) and samples the next token of every sequence whose logits came out, streaming its
text (textstream.py: stop strings, UTF-8 holdback). Sequences join and leave between steps.
Admission control rejects (finish reason "rejected", with the reason) instead of queueing without
bound. KV memory is a block pool bounded by ``kv_budget_mb``; prompts that share full blocks of
tokens share their K/V (kv.py). ``engine.hooks`` reports the edges of each step's phases to
subscribers (hooks.py; ``infeng profile`` uses them). With ``speculate`` (speculate.py), decoding
sequences carry drafted tokens that the same forward pass verifies; a step may then give a
sequence several tokens.

Step buffers, the KV pool and sampler scratch are allocated once: the decode loop allocates no
arrays. Prompts are tokenized in ``submit`` (the caller's thread), not inside a step.
"""
from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from infeng import kernels
from infeng.errors import InfengError
from infeng.kernels import default_threads, ptr
from infeng.model.loader import Model, load_model
from infeng.runtime.adapters import AdapterManager, LoadedAdapter
from infeng.runtime.hooks import Hooks
from infeng.runtime.kv import full_window
from infeng.runtime.kvspec import kv_spec
from infeng.runtime.packer import BatchPacker
from infeng.runtime.sampler import Sampler, SamplingParams, token_logprobs
from infeng.runtime.scheduler import Scheduler, Seq
from infeng.runtime.session import ForwardSession
from infeng.runtime.speculate import SpecConfig, make_speculator
from infeng.runtime.textstream import TextStream
from infeng.runtime.tokenizer import Tokenizer
from infeng.runtime.types import FinishEvent, Request, Result, StepStats, TokenEvent

__all__ = ["Engine", "Request", "Result", "TokenEvent", "FinishEvent", "StepStats", "SamplingParams",
           "default_threads", "DEFAULT_CONTEXT"]

DEFAULT_CONTEXT = 4096


class Engine:
    def __init__(self, model: Model, threads: int | None = None, max_batch: int = 8,
                 max_batch_tokens: int = 512, max_seq_len: int | None = None, block_size: int = 16,
                 kv_budget_mb: float | None = None, isa: str | None = None, max_queue: int = 4096,
                 max_queued_tokens: int | None = None, aging_s: float = 10.0, detokenize: bool = True,
                 tokenizer: Tokenizer | None = None, net=None, clock=None, prefix_cache: bool = True,
                 adapter_budget_mb: float | None = None, speculate: SpecConfig | None = None,
                 kv_dtype: str = "f32", kv_policy: str | None = None, kv_rotate: str = "auto",
                 kv_group: int | None = None, kv_seed: int = 0):
        """``net`` and ``clock`` replace the C forward pass and the wall clock (the simulator
        drives this same scheduler with a cost model and virtual time). ``kv_*``: what the KV
        cache stores per layer (runtime/kvspec.py)."""
        self.model, self.cfg = model, model.config
        self.kern = kernels.load(isa) if isa else kernels.active()
        self.isa = self.kern.ffi.string(self.kern.lib.ifg_isa()).decode()
        self.threads = threads or default_threads()
        self.max_batch = max_batch
        if max_seq_len is not None and not 0 < max_seq_len <= self.cfg.max_seq_len:
            raise InfengError(f"context length {max_seq_len} must be in 1..{self.cfg.max_seq_len} (the model's maximum)")
        # The KV pool is sized for every slot at full context, so a 128k-context model gets a
        # default window that fits in memory; ask for more explicitly. A sliding-window model's
        # pool is sized for its window, whatever the context.
        self.max_seq_len = max_seq_len or (self.cfg.max_seq_len if full_window(self.cfg)
                                           else min(self.cfg.max_seq_len, DEFAULT_CONTEXT))
        self.max_batch_tokens = max(max_batch_tokens, max_batch)
        self.detokenize = detokenize
        self.prefix_cache = prefix_cache
        self.tokenizer = tokenizer or Tokenizer(model.tokenizer, self.cfg.bos_id, self.cfg.eos_ids)
        self.clock = clock or time.perf_counter
        # logits rows: one per sequence, and one per drafted position when speculating
        max_out = max_batch * (1 + speculate.validated().longest) if speculate else max_batch
        kv_types = kv_spec(self.cfg, kv_dtype, kv_policy, kv_rotate, kv_group, kv_seed)
        try:
            self.session = ForwardSession(self.kern, model, max_tokens=self.max_batch_tokens, max_out=max_out,
                                          threads=self.threads, n_slots=max_batch, max_seq_len=self.max_seq_len,
                                          block_size=block_size, kv_budget_mb=kv_budget_mb, net=net,
                                          window_chunk=True, kv_spec=kv_types)
        except MemoryError:
            raise InfengError(f"not enough memory for a KV cache of {max_batch} sequences x {self.max_seq_len} "
                              f"positions: lower --max-batch or --ctx") from None
        self.net, self.kv = self.session.net, self.session.kv
        if self.kv.n_blocks < self.kv.seq_blocks:
            raise InfengError(f"KV budget {kv_budget_mb} MB holds {self.kv.n_blocks * block_size} positions, "
                              f"less than one sequence of {self.max_seq_len}: raise it or lower the context")
        self.sched = Scheduler(self.kv, max_batch, max_queue, max_queued_tokens, aging_s, prefix_cache)
        self.packer = BatchPacker(self.session, self.max_batch_tokens)
        self.step_log: list | None = None   # set to a list to record (T, n_out, ctx, seconds) per step
        self.hooks = Hooks()
        V = self.cfg.vocab_size
        self._probs = np.zeros((max_batch, V), np.float32)
        self._idx = np.zeros((max_batch, V), np.int32)
        self._scratch = [(ptr(self.kern, self._probs[i]), ptr(self.kern, self._idx[i], "int32_t *"))
                         for i in range(max_batch)]
        self.stats = StepStats()
        self.adapters = AdapterManager(self.kern, model, adapter_budget_mb)
        self.spec = make_speculator(speculate, self.session, model, self.max_seq_len, self.max_batch_tokens,
                                    max_out, self.clock, self.threads) if speculate else None
        self._arrivals = 0
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
            self.sched.check_room(req.id, len(ids))
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
        text = TextStream(self.tokenizer.stream(ids), params.stop) if (self.detokenize or params.stop) else None
        seq = Seq(req, self._arrivals, list(ids), len(ids), res, text, adapter)
        if self.cfg.rope_past() and len(ids) > self.cfg.rope_past():
            seq.rope_class = f"extent={len(ids)}"     # its prompt's K/V rotate by its length (kv sharing)
        self.sched.waiting.append(seq)

    def cancel(self, request_id: str) -> None:
        """End a request at the next step (finish_reason "cancelled"), freeing its blocks."""
        self._cancel.add(request_id)

    @property
    def occupancy(self) -> tuple[int, int]:
        """(requests waiting, sequences running), for a front end's gauges."""
        return len(self.sched.waiting), len(self.sched.running)

    @property
    def busy(self) -> bool:
        return bool(self.sched.waiting or self.sched.running or self._outbox)

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
        h = self.hooks if self.hooks.subscribers else None
        t0 = self.clock()
        if h:
            h.emit("step", "begin")
        for s, reason in self.sched.expired(t0, self._cancel):
            self._finish(s, reason, t0, events)
        self._cancel.clear()
        if h:
            h.emit("schedule", "begin")
        self._admit(t0)
        if h:
            h.emit("schedule", "end")
        sched, st = self.sched, self.stats
        if not sched.running:
            if h:
                h.emit("step", "end")
            return events
        if self.spec:
            self.spec.propose(sched.running)
        if h:
            h.emit("pack", "begin")
        b = self.packer.pack(sched.running)
        if h:
            h.emit("pack", "end")
            h.emit("forward", "begin")
        tc = self.clock()
        self.session.run(b.T, b.n_out, b.lora, self.packer.by_extent)
        dc = self.clock() - tc
        st.c_s += dc
        if b.drafted:
            self.spec.stats.steps += 1
            self.spec.stats.verify_s += dc
        if h:
            h.emit("forward", "end", {"T": b.T, "n_out": b.n_out})
        # draw each sequence's token(s); speculation rolls back rejected positions here, so
        # only blocks full of accepted tokens get published to the prefix cache below
        drawn = [self._draw(s, b.first[i], h) if not s.draft else self.spec.verify(s, b.first[i], self._draw_one)
                 for i, s in enumerate(b.outs)]
        if self.prefix_cache:
            more = {id(s): t for s, t in zip(b.outs, drawn) if len(t) > 1} if b.drafted else {}
            for s in sched.running:     # accepted drafts are fed but not yet in s.ids
                t = more.get(id(s))
                self.kv.register_full(s.slot, s.ids if t is None else s.ids + [x for x, _ in t], s.n_fed, s.salt)
        if self.kv.window:          # the next token at n_fed reads positions n_fed+1-window on
            for s in sched.running:
                self.kv.drop_before(s.slot, s.n_fed + 1 - self.kv.window)
        for s, toks in zip(b.outs, drawn):
            self._emit(s, toks, events)
        dt = self.clock() - t0
        st.steps += 1
        st.step_s += dt
        if self.step_log is not None:
            self.step_log.append((b.T, b.n_out, b.ctx, dt))
        st.sampled += sum(len(t) for t in drawn)
        st.batch_tokens += b.T
        st.running += b.n_seqs
        st.queued += len(sched.waiting)
        st.prefill_tokens += b.prefill_tokens
        st.max_running = max(st.max_running, len(sched.running))
        st.max_queued = max(st.max_queued, len(sched.waiting))
        st.max_kv_blocks = max(st.max_kv_blocks, self.kv.blocks_used())
        if b.prefill_tokens:
            st.prefill_s += dt
        else:
            st.decode_tokens += sum(len(t) for t in drawn)
            st.decode_s += dt
        if h:
            h.emit("step", "end")
        return events

    def _draw(self, s: Seq, row: int, h) -> list:
        if h:
            h.emit("sample", "begin")
            t = self._draw_one(s, row)
            h.emit("sample", "end")
            return [t]
        return [self._draw_one(s, row)]

    def _draw_one(self, s: Seq, row: int) -> tuple:
        """The sequence's next token from logits row ``row``, and its log-probs if asked."""
        p, logits = s.req.params, self.net.logits
        if p.logits_processor is not None:
            p.logits_processor(s.result.token_ids, logits[row])
        tok = s.sampler(self.net.logit_rows[row])
        return tok, token_logprobs(logits[row], tok, p.logprobs) if p.logprobs is not None else None

    def _emit(self, s: Seq, toks: list, events: list) -> None:
        """Append the drawn tokens, stream them, and finish the sequence at a stop."""
        r = s.result
        for tok, lp in toks:
            now = self.clock()
            s.ids.append(tok)
            r.token_ids.append(tok)
            r.token_times.append(now)
            if r.t_first is None:
                r.t_first = now
            reason = self._stop_reason(s, tok)
            text = ""
            if s.text is not None:
                if reason:
                    s.text.flush()
                text = s.text.delta(final=reason is not None)
            events.append(TokenEvent(r.id, tok, text, lp))
            if reason:
                self._finish(s, reason, now, events)
                return

    def _admit(self, now: float) -> None:
        admitted, empty, preempted = self.sched.admit(now)
        self.stats.preemptions += preempted
        for s in admitted:
            if s.sampler is None:
                s.sampler = Sampler(self.kern, s.req.params, self.cfg.vocab_size, *self._scratch[s.slot])
            else:       # keep the random stream; point at this slot's scratch
                s.sampler.probs, s.sampler.idx = self._scratch[s.slot]
        for s in empty:
            self._finish(s, "length", now, self._outbox)

    def _stop_reason(self, s: Seq, tok: int) -> str | None:
        p = s.req.params
        if (not p.ignore_eos and tok in self.tokenizer.eos_ids) or tok in p.stop_token_ids:
            return "stop"
        if s.text is not None and s.text.push(tok):
            return "stop"
        if len(s.result.token_ids) >= p.max_tokens:
            return "length"
        if len(s.ids) >= self.max_seq_len:
            return "context"
        return None

    def _finish(self, s: Seq, reason: str, now: float, events) -> None:
        r = s.result
        r.finish_reason, r.t_done = reason, now
        if s.text is not None:
            s.text.flush()
            r.text = s.text.text
        elif r.token_ids:           # not streamed: decode once, here, not per token
            toks = r.token_ids[:-1] if r.finish_reason == "stop" else r.token_ids
            r.text = self.tokenizer.completion_text(r.prompt_ids, toks)
        self.sched.remove(s)
        if self.spec:
            self.spec.drafter.forget(s)
        if s.adapter is not None:
            self.adapters.release(s.adapter)
            s.adapter = None
        events.append(FinishEvent(r.id, r))
