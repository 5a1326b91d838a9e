"""`infeng profile`: where the time of a real run goes, and where the C forward pass departs from
the numpy reference.

``profile_run`` drives the Engine on one prompt with the C forward pass's timing buffer switched
on (``struct ifg_scratch.op_times``: thread 0 stamps the end of every op of every layer) and
times the Python stages around it through the engine's hooks: tokenize (submit), schedule
(admission), the forward C call, sampling, and the rest of a step (Python overhead between C
calls). ``chrome_trace`` turns that
into a trace JSON for Perfetto / chrome://tracing.

``dump_activations`` sets up a C forward pass for one prompt and records every layer's op
outputs (``infeng.model.activations``, which also holds the diff against the numpy reference).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infeng import kernels
from infeng.errors import InfengError
from infeng.kernels import default_threads
from infeng.kernels.abi import OPS     # op names in ifg_op order (kernels_c/forward.h)
from infeng.model.activations import Activations, trace_forward
from infeng.runtime.engine import Engine, FinishEvent, Request
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.session import ForwardSession
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


class StepTimer:
    """An engine hooks subscriber: wall and CPU time of each step's phases, one StepRecord per
    step that ran the forward pass (with a copy of the C op clock ``op_times``)."""

    def __init__(self, op_times: np.ndarray):
        self.op_times, self.steps = op_times, []
        self.cur: dict[str, Any] = {}

    def __call__(self, phase: str, edge: str, info: dict) -> None:
        t, cpu, cur = time.perf_counter(), time.process_time(), self.cur
        if phase == "step":
            if edge == "begin":
                cur.clear()
                cur.update(t0=t, cpu0=cpu, sched=0.0, sched_cpu=0.0, sample=0.0)
            elif "t_c0" in cur:
                self.steps.append(StepRecord(cur["t0"], cur["t_c0"], cur["t_c1"], t, cpu - cur["cpu0"],
                                             cur["cpu_c1"] - cur["cpu_c0"], cur["T"], cur["n_out"], cur["sched"],
                                             cur["sample"], cur["ops"], cur["sched_cpu"]))
        elif phase == "schedule":
            sign = -1 if edge == "begin" else 1
            cur["sched"] += sign * t
            cur["sched_cpu"] += sign * cpu
        elif phase == "forward":
            if edge == "begin":
                cur["t_c0"], cur["cpu_c0"] = t, cpu
            else:
                cur["t_c1"], cur["cpu_c1"] = t, cpu
                cur["T"], cur["n_out"] = info["T"], info["n_out"]
                cur["ops"] = self.op_times.copy()
        elif phase == "sample":
            cur["sample"] += -t if edge == "begin" else t


def profile_run(model, prompt: str, n: int, threads: int | None = None, isa: str | None = None,
                label: str = "", on_token=None) -> Profile:
    """Generate ``n`` greedy tokens after ``prompt`` through the Engine, with every stage timed."""
    eng = Engine(model, threads=threads, max_batch=1, isa=isa, prefix_cache=False)
    c = model.config
    timer = StepTimer(eng.net.record_op_times())
    unsubscribe = eng.hooks.subscribe(timer)
    req = Request(id="profile", prompt=prompt, params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    thr0 = _thread_cpu()
    try:
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
    finally:
        unsubscribe()
    steps = timer.steps
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
    c = model.config
    T = len(ids)
    if T < 1 or T > c.max_seq_len:
        raise InfengError(f"the prompt has {T} tokens; the model takes 1..{c.max_seq_len}")
    fs = ForwardSession(kern, model, max_tokens=T, max_out=1, threads=threads or default_threads(), n_slots=1,
                        max_seq_len=T)
    if not fs.kv.ensure(0, T):  # pragma: no cover - the pool is sized for it
        raise InfengError("no KV blocks for the prompt")
    return trace_forward(fs.net, fs.kv, ids)
