"""`infeng profile`: where the time of a real run goes, and where the C forward pass departs from
the numpy reference.

``profile_run`` drives the Engine on one prompt with the C forward pass's timing buffer switched
on (``struct ifg_scratch.op_times``: thread 0 stamps the end of every op of every layer) and
times the Python stages around it: tokenize (submit), schedule (admission), the forward C call,
sampling, and the rest of a step (Python overhead between C calls). ``chrome_trace`` turns that
into a trace JSON for Perfetto / chrome://tracing.

``dump_activations`` sets up a C forward pass for one prompt and records every layer's op
outputs (``infeng.model.activations``, which also holds the diff against the numpy reference).
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infeng import kernels
from infeng.errors import InfengError
from infeng.model.activations import Activations, OPS, check_ops, trace_forward
from infeng.model.llama import LlamaC
from infeng.runtime import engine as eng_mod
from infeng.runtime.engine import Engine, FinishEvent, Request, default_threads
from infeng.runtime.kv import KVCache
from infeng.runtime.sampler import SamplingParams
from infeng.telemetry import write_text_atomic

# the kernel family of each op
FAMILY = {"embed": "embed", "attn_norm": "norm", "ffn_norm": "norm", "final_norm": "norm",
          "rope": "rope", "kv_store": "attention", "attention": "attention", "silu_mul": "act",
          **{m: "matmul" for m in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "output")}}
LAYER_OPS = OPS[1:14]
GLOBAL_OPS = ("embed", "final_norm", "output")


# ---- timing a run -------------------------------------------------------------------------------
@dataclass
class StepRecord:
    t_start: float               # perf_counter at the step's start
    t_c0: float                  # ... just before the forward C call
    t_c1: float                  # ... just after it
    t_end: float
    cpu_step: float              # process CPU seconds of the whole step
    cpu_c: float                 # ... of the C call
    T: int
    n_out: int
    schedule_s: float
    sample_s: float
    op_times: np.ndarray          # the C stamps (omp_get_wtime seconds)
    schedule_cpu_s: float = 0.0


@dataclass
class Profile:
    model: str
    threads: int
    isa: str
    n_layers: int
    prompt_tokens: int
    generated: int
    tokenize_s: float
    tokenize_cpu_s: float
    wall_s: float
    cpu_s: float
    steps: list[StepRecord] = field(default_factory=list)
    thread_cpu_s: dict[int, float] = field(default_factory=dict)
    text: str = ""

    # per-op seconds summed over steps and layers
    def op_seconds(self) -> dict[str, float]:
        tot = {op: 0.0 for op in OPS}
        for st in self.steps:
            for layer, op, t0, t1 in op_spans(st.op_times, self.n_layers):
                tot[op] += t1 - t0
        return tot

    def stages(self) -> dict[str, tuple[float, float]]:
        """stage → (wall s, CPU s)."""
        fwd = sum(s.t_c1 - s.t_c0 for s in self.steps)
        fwd_cpu = sum(s.cpu_c for s in self.steps)
        sched = sum(s.schedule_s for s in self.steps)
        sched_cpu = sum(s.schedule_cpu_s for s in self.steps)
        samp = sum(s.sample_s for s in self.steps)
        step = sum(s.t_end - s.t_start for s in self.steps)
        step_cpu = sum(s.cpu_step for s in self.steps)
        other = step - fwd - sched - samp
        return {"tokenize": (self.tokenize_s, self.tokenize_cpu_s), "schedule": (sched, sched_cpu),
                "forward (C)": (fwd, fwd_cpu), "sampling": (samp, samp),
                "python overhead": (other, max(0.0, step_cpu - fwd_cpu - sched_cpu - samp))}

    def metrics(self) -> dict[str, float]:
        st = self.stages()
        decode = [s for s in self.steps if s.T == 1]
        fwd = st["forward (C)"]
        m = {"wall_s": self.wall_s, "cpu_s": self.cpu_s,
             "cpu_utilisation": self.cpu_s / self.wall_s / self.threads if self.wall_s else float("nan"),
             "forward_cpu_utilisation": fwd[1] / fwd[0] / self.threads if fwd[0] else float("nan"),
             "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated, "steps": len(self.steps)}
        for k, (w, c) in st.items():
            key = k.split(" ")[0].replace("(", "")
            m[f"{key}_s" if k != "python overhead" else "python_overhead_s"] = w
            m[f"{key}_cpu_s" if k != "python overhead" else "python_overhead_cpu_s"] = c
        if decode:
            m["python_overhead_us_per_decode_token"] = 1e6 * sum(
                (s.t_end - s.t_start) - (s.t_c1 - s.t_c0) - s.sample_s for s in decode) / len(decode)
        for op, s in self.op_seconds().items():
            m[f"op_{op}_s"] = s
        for tid, s in sorted(self.thread_cpu_s.items()):
            m[f"thread_{tid}_cpu_s"] = s
        return m


def op_spans(op_times: np.ndarray, n_layers: int):
    """(layer, op, start, end) in C clock seconds, in execution order; layer -1 for the ops
    outside the layer loop."""
    K = len(OPS)
    end = lambda layer, i: op_times[1 + layer * K + i]    # noqa: E731
    prev = op_times[0]
    out = []
    seq = [(n_layers, 0)] + [(l, i) for l in range(n_layers) for i in range(1, 14)] + [(n_layers, 14), (n_layers, 15)]
    for layer, i in seq:
        t = end(layer, i)
        out.append((-1 if layer == n_layers else layer, OPS[i], prev, t))
        prev = t
    return out


def _thread_cpu() -> dict[int, float]:
    """CPU seconds per thread of this process (Linux /proc; empty elsewhere)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(parts[11]) + int(parts[12])) / tick
    except OSError:
        return {}
    return out


@contextmanager
def _timed_sampler(acc: list[float]):
    """Time every Sampler call made by the engine (the class is swapped back afterwards)."""

    base = eng_mod.Sampler

    class TimedSampler(base):
        def __call__(self, logits_ptr):
            t0 = time.perf_counter()
            try:
                return super().__call__(logits_ptr)
            finally:
                acc[0] += time.perf_counter() - t0
    eng_mod.Sampler = TimedSampler
    try:
        yield
    finally:
        eng_mod.Sampler = base


def profile_run(model, prompt: str, n: int, threads: int | None = None, isa: str | None = None,
                label: str = "", on_token=None) -> Profile:
    """Generate ``n`` greedy tokens after ``prompt`` through the Engine, with every stage timed."""
    eng = Engine(model, threads=threads, max_batch=1, isa=isa, prefix_cache=False)
    check_ops(eng.kern)
    net = eng.net
    c = model.config
    buf = np.zeros(1 + (c.n_layers + 1) * len(OPS), np.float64)
    net.s.op_times = eng.kern.ffi.cast("double *", eng.kern.ffi.from_buffer(buf))
    net._profile_buf = buf                            # keep it alive with the struct
    steps: list[StepRecord] = []
    cur: dict[str, Any] = {}
    sample_acc = [0.0]

    orig_step, orig_admit, orig_engine_step = net.step, eng._admit, eng.step

    def c_step(kv, T, n_out, *rest):      # rest: whatever else the engine passes (adapters)
        cur["t_c0"], cur["cpu_c0"] = time.perf_counter(), time.process_time()
        orig_step(kv, T, n_out, *rest)
        cur["t_c1"], cur["cpu_c1"] = time.perf_counter(), time.process_time()
        cur["T"], cur["n_out"] = T, n_out
        cur["ops"] = buf.copy()

    def admit(now):
        t0, c0 = time.perf_counter(), time.process_time()
        orig_admit(now)
        cur["sched"] = cur.get("sched", 0.0) + time.perf_counter() - t0
        cur["sched_cpu"] = cur.get("sched_cpu", 0.0) + time.process_time() - c0

    def engine_step():
        cur.clear()
        sample_acc[0] = 0.0
        t0, cpu0 = time.perf_counter(), time.process_time()
        ev = orig_engine_step()
        t1, cpu1 = time.perf_counter(), time.process_time()
        if "t_c0" in cur:
            steps.append(StepRecord(t0, cur["t_c0"], cur["t_c1"], t1, cpu1 - cpu0, cur["cpu_c1"] - cur["cpu_c0"],
                                    cur["T"], cur["n_out"], cur.get("sched", 0.0), sample_acc[0], cur["ops"],
                                    cur.get("sched_cpu", 0.0)))
        return ev

    net.step, eng._admit, eng.step = c_step, admit, engine_step
    req = Request(id="profile", prompt=prompt, params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    thr0 = _thread_cpu()
    with _timed_sampler(sample_acc):
        t0, cpu0 = time.perf_counter(), time.process_time()
        t_tok = time.perf_counter()
        ids = eng.tokenizer.encode(prompt)
        tok_s, tok_cpu = time.perf_counter() - t_tok, time.process_time() - cpu0
        req.prompt_ids = ids
        text, result = [], None
        for ev in eng.stream([req]):
            if isinstance(ev, FinishEvent):
                result = ev.result
            elif ev.text:
                text.append(ev.text)
                if on_token:
                    on_token()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    thr1 = _thread_cpu()
    if result is None or result.finish_reason == "rejected":
        raise InfengError(f"profile run failed: {result.error if result else 'no result'}")
    prof = Profile(label or model.source, eng.threads, eng.isa, c.n_layers, len(ids), len(result.token_ids),
                   tok_s, tok_cpu, wall, cpu, steps, text="".join(text))
    prof.thread_cpu_s = {tid: thr1[tid] - thr0.get(tid, 0.0) for tid in thr1 if thr1[tid] - thr0.get(tid, 0.0) > 0}
    return prof


def chrome_trace(prof: Profile) -> dict[str, Any]:
    """Trace Event Format (Perfetto / chrome://tracing): complete events (ph "X"), µs.
    Thread 1 carries the Python stages of each step, thread 2 the C ops, per layer."""
    if not prof.steps:
        return {"traceEvents": [], "displayTimeUnit": "ms"}
    t_base = min(s.t_start for s in prof.steps) - prof.tokenize_s
    us = lambda t: round((t - t_base) * 1e6, 3)   # noqa: E731
    ev: list[dict[str, Any]] = [
        {"ph": "M", "pid": 1, "tid": 1, "name": "thread_name", "args": {"name": "python (engine step)"}},
        {"ph": "M", "pid": 1, "tid": 2, "name": "thread_name", "args": {"name": "C forward (ops)"}},
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": f"infeng {prof.model}"}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "tokenize", "cat": "stage", "ts": 0.0,
         "dur": round(prof.tokenize_s * 1e6, 3)},
    ]
    for i, s in enumerate(prof.steps):
        kind = "decode" if s.T == s.n_out else "prefill"
        ev.append({"ph": "X", "pid": 1, "tid": 1, "name": f"step {i} ({kind}, T={s.T})", "cat": "step",
                   "ts": us(s.t_start), "dur": round((s.t_end - s.t_start) * 1e6, 3),
                   "args": {"T": s.T, "n_out": s.n_out, "cpu_ms": s.cpu_step * 1e3}})
        ev.append({"ph": "X", "pid": 1, "tid": 1, "name": "forward (C)", "cat": "stage", "ts": us(s.t_c0),
                   "dur": round((s.t_c1 - s.t_c0) * 1e6, 3)})
        if s.sample_s:
            ev.append({"ph": "X", "pid": 1, "tid": 1, "name": "sampling", "cat": "stage", "ts": us(s.t_c1),
                       "dur": round(s.sample_s * 1e6, 3)})
        c0 = s.op_times[0]
        for layer, op, a, b in op_spans(s.op_times, prof.n_layers):
            ev.append({"ph": "X", "pid": 1, "tid": 2, "name": op, "cat": FAMILY[op],
                       "ts": us(s.t_c0 + (a - c0)), "dur": round(max(0.0, b - a) * 1e6, 3),
                       "args": {"layer": layer, "step": i}})
    return {"traceEvents": ev, "displayTimeUnit": "ms",
            "otherData": {"model": prof.model, "threads": prof.threads, "isa": prof.isa}}


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(Path(path), json.dumps(obj) + "\n")


# ---- activations of a model (the dump and the diff are model/activations.py) -----------------------
def dump_activations(model, ids: list[int], threads: int | None = None, isa: str | None = None) -> Activations:
    """One traced forward call of the C pass over ``ids`` (positions 0..T-1)."""
    kern = kernels.load(isa) if isa else kernels.active()
    check_ops(kern)
    c = model.config
    T = len(ids)
    if T < 1 or T > c.max_seq_len:
        raise InfengError(f"the prompt has {T} tokens; the model takes 1..{c.max_seq_len}")
    net = LlamaC(kern, model, T, 1, threads or default_threads())
    kv = KVCache(kern, c, 1, T, 16)
    if not kv.ensure(0, T):  # pragma: no cover - the pool is sized for it
        raise InfengError("no KV blocks for the prompt")
    return trace_forward(net, kv, ids)
