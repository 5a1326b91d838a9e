"""Discrete-event simulator: the Engine's own scheduler on virtual time and a fitted cost model.

A trace (arrival times, prompt and output lengths, priorities, Zipf-distributed adapter ids) is
replayed either against the real engine (``replay(engine, trace)``, submitting each request when
its arrival time has passed) or against the same ``Engine`` class whose forward pass is replaced
by ``SimNet``: it charges each step the time the cost model predicts and advances a virtual
clock. Everything else — admission, priorities and aging, chunked prefill, KV blocks, preemption,
prefix sharing — is the engine's code, so policies can be compared in seconds.

Real against simulated on one trace: ``infeng bench --suite bench/sim.yaml --model MODEL`` (kind
``sim``, infeng/bench/sim_compare.py; the runtime does not import bench).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infeng import kernels
from infeng.kernels import ptr
from infeng.model.loader import Model
from infeng.runtime.engine import Engine, FinishEvent, Request, Result
from infeng.runtime.sampler import SamplingParams
from infeng.telemetry import percentile


@dataclass(frozen=True)
class TraceRequest:
    id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    priority: int = 0
    adapter: int | None = None     # Zipf-popular adapter index (used once adapters exist)


def make_trace(n: int, rate_per_s: float, prompt_len: tuple[int, int], output_len: tuple[int, int],
               seed: int = 0, priorities: tuple[int, ...] = (0,), n_adapters: int = 0,
               zipf_alpha: float = 1.0) -> list[TraceRequest]:
    """Poisson arrivals at ``rate_per_s`` (0 = all at once), uniform lengths in the given
    inclusive ranges, priorities drawn uniformly, adapter ids Zipf(alpha) over n_adapters."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_per_s, n) if rate_per_s > 0 else np.zeros(n)
    arrivals = np.cumsum(gaps) - (gaps[0] if n else 0)
    weights = None
    if n_adapters:
        w = 1.0 / np.arange(1, n_adapters + 1) ** zipf_alpha
        weights = w / w.sum()
    out = []
    for i in range(n):
        out.append(TraceRequest(
            id=f"r{i}", arrival_s=float(arrivals[i]),
            prompt_len=int(rng.integers(prompt_len[0], prompt_len[1] + 1)),
            output_len=int(rng.integers(output_len[0], output_len[1] + 1)),
            priority=int(rng.choice(priorities)),
            adapter=int(rng.choice(n_adapters, p=weights)) if n_adapters else None))
    return out


@dataclass
class CostModel:
    """Step time = base + per_token·T + per_ctx·(positions attended) + per_out·(logits rows)."""
    base_s: float
    per_token_s: float
    per_ctx_s: float
    per_out_s: float

    def __call__(self, T: int, n_out: int, ctx: int) -> float:
        return self.base_s + self.per_token_s * T + self.per_ctx_s * ctx + self.per_out_s * n_out

    @classmethod
    def fit(cls, steps: list[tuple[int, int, int, float]]) -> "CostModel":
        """Least squares over (T, n_out, ctx, seconds) step records, coefficients kept >= 0."""
        a = np.array([[1.0, T, ctx, n_out] for T, n_out, ctx, _ in steps])
        y = np.array([dt for *_, dt in steps])
        keep = list(range(4))
        while True:     # non-negative least squares by dropping the most negative term
            coef, *_ = np.linalg.lstsq(a[:, keep], y, rcond=None)
            if (coef >= 0).all() or len(keep) == 1:
                break
            keep.pop(int(np.argmin(coef)))
        full = np.zeros(4)
        full[keep] = np.maximum(coef, 0.0)
        return cls(*map(float, full))

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class VirtualClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class SimNet:
    """Stands in for LlamaC: same step buffers, no compute; each step advances the clock by the
    cost model's prediction. Logits are one zero per row, so greedy sampling picks token 0."""

    def __init__(self, kern, max_tokens: int, max_out: int, cost: CostModel, clock: VirtualClock):
        self.cost, self.clock = cost, clock
        self.tokens = np.zeros(max_tokens, np.int32)
        self.pos = np.zeros(max_tokens, np.int32)
        self.seq = np.zeros(max_tokens, np.int32)
        self.out_rows = np.zeros(max_out, np.int32)
        self.logits = np.zeros((max_out, 1), np.float32)
        self.logit_rows = [ptr(kern, self.logits[i]) for i in range(max_out)]

    def step(self, kv, T: int, n_out: int, lora=None) -> None:
        p = self.pos[:T].astype(np.int64)
        self.clock.t += self.cost(T, n_out, int((p + 1).sum()))


class _SimTokenizer:
    eos_ids: frozenset = frozenset()

    def decode(self, ids):
        return ""

    def completion_text(self, context, ids):
        return ""


def sim_engine(model: Model, cost: CostModel, **engine_kw) -> Engine:
    """An Engine on virtual time whose forward pass is the cost model."""
    clock = VirtualClock()
    kw = dict(max_batch=8, max_batch_tokens=512)
    kw.update(engine_kw)
    net = SimNet(kernels.active(), max(kw["max_batch_tokens"], kw["max_batch"]), kw["max_batch"], cost, clock)
    return Engine(model, net=net, clock=clock, tokenizer=_SimTokenizer(), detokenize=False, **kw)


def trace_requests(trace: list[TraceRequest], vocab: int, seed: int = 0) -> list[Request]:
    """Requests of the trace's shapes: random prompt ids, exactly output_len greedy tokens."""
    rng = np.random.default_rng(seed)
    return [Request(id=t.id, prompt_ids=[1] + rng.integers(3, vocab, t.prompt_len - 1).tolist(),
                    params=SamplingParams(max_tokens=t.output_len, temperature=0, ignore_eos=True, seed=0),
                    priority=t.priority) for t in trace]


@dataclass
class Report:
    results: list[Result]
    makespan_s: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput_tok_s(self) -> float:
        return sum(len(r.token_ids) for r in self.results) / self.makespan_s if self.makespan_s else float("nan")

    def ttft(self, q: float) -> float:
        return percentile([r.ttft_s for r in self.results if r.ttft_s is not None], q)

    def summary(self) -> dict[str, float]:
        return {"requests": len(self.results), "makespan_s": self.makespan_s,
                "throughput_tok_s": self.throughput_tok_s, "ttft_s_p50": self.ttft(50), "ttft_s_p99": self.ttft(99),
                "finished": sum(r.finish_reason in ("length", "stop") for r in self.results)}


def replay(engine: Engine, trace: list[TraceRequest], requests: list[Request], sleep=None) -> Report:
    """Submit each request when its arrival time has passed on the engine's clock; step until
    all have finished. With a virtual clock, idle time is skipped instead of slept."""
    import time
    by_id = {r.id: r for r in requests}
    pending = sorted(trace, key=lambda t: t.arrival_s)
    clock = engine.clock
    virtual = isinstance(clock, VirtualClock)
    start = clock()
    results = []
    i = 0
    while i < len(pending) or engine.busy:
        now = clock() - start
        while i < len(pending) and pending[i].arrival_s <= now:
            engine.submit(by_id[pending[i].id])
            i += 1
        if engine.busy:
            results += [ev.result for ev in engine.step() if isinstance(ev, FinishEvent)]
        elif i < len(pending):
            wait = pending[i].arrival_s - now
            if virtual:
                clock.t += wait
            else:
                (sleep or time.sleep)(wait)
    # submit times are on the engine clock; make TTFT relative to the trace arrival
    return Report(results, clock() - start)
