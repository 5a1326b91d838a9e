"""`infeng profile`: where the time of a real run goes, and where the C forward pass departs from
the numpy reference.

``profile_run`` drives the Engine on one prompt with the C forward pass's timing buffer switched
on (``struct ifg_scratch.op_times``: thread 0 stamps the end of every op of every layer) and
times the Python stages around it through the engine's hooks: tokenize (submit), schedule
(admission), the forward C call, sampling, and the rest of a step (Python overhead between C
calls). ``chrome_trace`` turns that
into a trace JSON for Perfetto / chrome://tracing.

``dump_activations`` runs one forward call over a prompt with the trace buffer switched on
(``struct ifg_scratch.trace``: every layer's op outputs); ``diff_reference`` compares them with
the numpy reference model: per layer (the residual after the layer, ReferenceModel's ``trace``)
and, in the first layer that departs, op by op, each op recomputed in numpy from the C pass's
own inputs to that op, so the first op that disagrees is the one that is wrong.
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
from infeng.runtime.engine import Engine, FinishEvent, Request
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.session import ForwardSession

# the kernel family of each op
FAMILY = {"embed": "embed", "attn_norm": "norm", "ffn_norm": "norm", "final_norm": "norm",
          "rope": "rope", "kv_store": "attention", "attention": "attention", "silu_mul": "act",
          **{m: "matmul" for m in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "output")}}
LAYER_OPS = OPS[1:14]
GLOBAL_OPS = ("embed", "final_norm", "output")
# ops whose outputs the trace buffer holds, with the buffer each copies
TRACED = ("attn_norm", "wq", "wk", "wv", "attention", "wo", "ffn_norm", "w_gate", "w_up", "silu_mul", "w_down")


def check_ops(kern) -> None:
    """The C library's op names must be the ones this module lays out."""
    names = tuple(kern.ffi.string(kern.lib.ifg_op_name(i)).decode() for i in range(kern.lib.IFG_OP_COUNT))
    if names != OPS:  # pragma: no cover - a C/Python mismatch is a build bug
        raise InfengError(f"kernel op table {names} does not match infeng.bench.profile.OPS")


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
    check_ops(eng.kern)
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
    from infeng.telemetry import write_text_atomic
    write_text_atomic(Path(path), json.dumps(obj) + "\n")


# ---- activations ----------------------------------------------------------------------------------
def widths(cfg) -> dict[str, int]:
    return {"attn_norm": cfg.dim, "wq": cfg.q_dim, "wk": cfg.kv_dim, "wv": cfg.kv_dim, "attention": cfg.q_dim,
            "wo": cfg.dim, "ffn_norm": cfg.dim, "w_gate": cfg.hidden_dim, "w_up": cfg.hidden_dim,
            "silu_mul": cfg.hidden_dim, "w_down": cfg.dim}


@dataclass
class Activations:
    tokens: list[int]
    layers: list[dict[str, np.ndarray]]     # per layer: op → [T, width] (op outputs as the C pass left them)
    logits: np.ndarray                       # [vocab] of the last token

    def save(self, out_dir: str | Path) -> list[Path]:
        """One .npy per layer and op (``layer03.w_up.npy``), ``tokens.npy``, ``logits.npy`` and an
        ``index.json`` saying what each holds. No pickle."""
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        written = []

        def put(name, arr):
            p = d / name
            tmp = d / f".{name}.tmp.npy"
            np.save(tmp, np.ascontiguousarray(arr), allow_pickle=False)
            os.replace(tmp, p)
            written.append(p)
        put("tokens.npy", np.asarray(self.tokens, np.int32))
        for l, ops in enumerate(self.layers):
            for op, a in ops.items():
                put(f"layer{l:02d}.{op}.npy", a)
        put("logits.npy", self.logits)
        index = {"tokens": len(self.tokens), "layers": len(self.layers), "ops": list(TRACED),
                 "files": "layerNN.OP.npy: [tokens, width] f32, the output of OP in layer NN "
                          "(wq/wk before RoPE; wo and w_down: the residual stream after the add)"}
        from infeng.telemetry import write_text_atomic
        write_text_atomic(d / "index.json", json.dumps(index, indent=1) + "\n")
        return written


def dump_activations(model, ids: list[int], threads: int | None = None, isa: str | None = None) -> Activations:
    """One forward call of the C pass over ``ids`` (positions 0..T-1) with the trace buffer on."""
    kern = kernels.load(isa) if isa else kernels.active()
    check_ops(kern)
    c = model.config
    T = len(ids)
    if T < 1 or T > c.max_seq_len:
        raise InfengError(f"the prompt has {T} tokens; the model takes 1..{c.max_seq_len}")
    fs = ForwardSession(kern, model, max_tokens=T, max_out=1, threads=threads or default_threads(), n_slots=1,
                        max_seq_len=T)
    if not fs.kv.ensure(0, T):  # pragma: no cover - the pool is sized for it
        raise InfengError("no KV blocks for the prompt")
    per_tok = kern.lib.ifg_trace_floats_per_token(fs.net.m)
    trace = fs.net.record_trace(T)
    fs.tokens[:T] = ids
    fs.pos[:T] = np.arange(T)
    fs.seq[:T] = 0
    fs.out_rows[0] = T - 1
    fs.run(T, 1)
    fs.net.record_trace(0)
    w = widths(c)
    layers = []
    for l in range(c.n_layers):
        block = trace[l * per_tok * T:(l + 1) * per_tok * T]
        off, ops = 0, {}
        for op in TRACED:
            ops[op] = block[off * T:(off + w[op]) * T].reshape(T, w[op]).copy()
            off += w[op]
        layers.append(ops)
    return Activations(list(ids), layers, fs.logits[0].copy())


@dataclass
class Diff:
    tol: float
    layers: list[dict[str, float]]            # per layer: rel error of the residual vs the reference
    first_layer: int | None                   # first layer beyond tol (None: agreement)
    first_op: str | None                      # the op in that layer that departs first
    ops: dict[str, float]                     # that layer's per-op errors (each op from C's own inputs)
    logits_err: float

    @property
    def agree(self) -> bool:
        return self.first_layer is None and self.logits_err <= self.tol

    def message(self) -> str:
        if self.agree:
            worst = max((d["rel_err"] for d in self.layers), default=0.0)
            return (f"C forward pass and numpy reference agree: {len(self.layers)} layers, worst residual "
                    f"error {worst:.2e}, logits {self.logits_err:.2e} (tolerance {self.tol:g})")
        if self.first_layer is None:
            return f"the layers agree but the logits part: error {self.logits_err:.2e} > {self.tol:g} (final norm / output)"
        e = self.layers[self.first_layer]["rel_err"]
        where = f"op {self.first_op}" if self.first_op else "no single op (accumulated drift)"
        return (f"first disagreement: layer {self.first_layer}, {where} "
                f"(residual error {e:.2e} > {self.tol:g}; op error {self.ops.get(self.first_op, float('nan')):.2e})")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the reference's largest magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) if b.size else 0.0


def diff_reference(acts: Activations, ref_model, tol: float = 1e-3) -> Diff:
    """Compare a C activation dump with the numpy reference on the same tokens. ``ref_model``
    is the Model the reference runs (normally the same one the C pass ran)."""
    from infeng.model import reference as R
    ref = R.ReferenceModel(ref_model)
    trace: list[np.ndarray] = []
    logits = ref.forward(acts.tokens, trace=trace)
    layers = [{"layer": l, "rel_err": rel_err(acts.layers[l]["w_down"], trace[l])} for l in range(len(trace))]
    first = next((d["layer"] for d in layers if d["rel_err"] > tol), None)
    ops: dict[str, float] = {}
    first_op = None
    if first is not None:
        ops = op_errors(acts, ref, first)
        first_op = next((op for op in TRACED if ops.get(op, 0.0) > tol), None)
    return Diff(tol, layers, first, first_op, ops, rel_err(acts.logits, logits[-1]))


def op_errors(acts: Activations, ref, l: int) -> dict[str, float]:
    """Each op of layer l recomputed in numpy (the reference's functions and weights) from the C
    pass's own inputs to that op; error of the C output against it."""
    from infeng.model import reference as R
    c, w = ref.cfg, ref.w
    L = f"layers.{l}."
    A = acts.layers[l]
    T = len(acts.tokens)
    x_in = acts.layers[l - 1]["w_down"] if l > 0 else w["tok_embeddings"][np.asarray(acts.tokens)].astype(np.float32)
    pos = np.arange(T)
    e = {}
    e["attn_norm"] = rel_err(A["attn_norm"], R.rmsnorm(x_in, w[L + "attn_norm"], c.norm_eps))
    for m in ("wq", "wk", "wv"):
        e[m] = rel_err(A[m], ref.mm(A["attn_norm"], L + m))
    q = R.rope(A["wq"].reshape(T, c.n_heads, c.head_dim), pos, ref.inv_freq)
    k = R.rope(A["wk"].reshape(T, c.n_kv_heads, c.head_dim), pos, ref.inv_freq)
    v = A["wv"].reshape(T, c.n_kv_heads, c.head_dim)
    g = c.n_heads // c.n_kv_heads
    K, V = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    att = np.einsum("thd,shd->hts", q, K) / np.sqrt(c.head_dim)
    att = np.where((np.arange(T)[None, :] > pos[:, None])[None], -np.inf, att)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    e["attention"] = rel_err(A["attention"], np.einsum("hts,shd->thd", att, V).reshape(T, c.q_dim))
    e["wo"] = rel_err(A["wo"], x_in + ref.mm(A["attention"], L + "wo"))
    e["ffn_norm"] = rel_err(A["ffn_norm"], R.rmsnorm(A["wo"], w[L + "ffn_norm"], c.norm_eps))
    for m in ("w_gate", "w_up"):
        e[m] = rel_err(A[m], ref.mm(A["ffn_norm"], L + m))
    e["silu_mul"] = rel_err(A["silu_mul"], R.silu(A["w_gate"]) * A["w_up"])
    e["w_down"] = rel_err(A["w_down"], A["wo"] + ref.mm(A["silu_mul"], L + "w_down"))
    return e
