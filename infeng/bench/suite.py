"""`infeng bench`: scenario suites (YAML under bench/), run side by side with peers, A B A B.

A suite file:

    model: tinyllama-1.1b     # a synthetic architecture (infeng.bench.synthetic) or a model path
    dtype: bf16               # weight dtype of a synthetic model
    threads: 2
    repeats: 3                # each scenario runs this often per runner; the median is reported
    peers: [llama.cpp, torch] # optional; a missing peer is skipped with a note
    scenarios:
      - {kind: bandwidth, mb: 256}                     # STREAM-like read test (GB/s)
      - {kind: gemv, dtype: bf16, shape: 2048x5632}    # one kernel call (GB/s of weights, GFLOP/s)
      - {kind: gemm, dtype: bf16, shape: 2048x5632, tokens: 128}
      - {kind: attention, depth: 1024}                 # one decode token over depth positions
      - {kind: prefill, tokens: 512}                   # pp512 (tok/s)
      - {kind: decode, tokens: 128, depth: 1024}       # tg128 after a 1024-token prompt (tok/s)
      - {kind: batch_decode, batch: 8, tokens: 32}     # aggregate tok/s of 8 sequences
      - {kind: prefill, tokens: 512, bf16_act: bf16}   # bf16 weights × x rounded to bf16 (default f32)

Each kind is a class in ``infeng.bench.kinds`` (unit, required parameters, label, how it runs); a
file with a top-level ``kind`` instead runs one comparison of ``infeng.bench.comparisons``.

Every repeat runs infeng, then each peer, then infeng again (A B A B): drift on a shared machine
hits all runners alike. Decode figures are also given as a percentage of the bandwidth roofline:
bytes read per step (weights + the KV cache at the mean depth) ÷ step time ÷ the read bandwidth
measured in the same run (a bandwidth scenario is added when the suite has none).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from infeng import kernels
from infeng.bench import micro, synthetic
from infeng.bench import comparisons   # a module import: comparisons' gguf_types kind runs suites
from infeng.bench.probes import make_probes
from infeng.bench.roofline import decode_step_bytes, weight_bytes
from infeng.bench.kinds import DEFAULT_BW_MB, KINDS, Bandwidth, Kind
from infeng.bench.peers import PeerSkip, make_peer
from infeng.errors import InfengError
from infeng.model.loader import load_model
from infeng.runtime.engine import Engine, Request, StepStats
from infeng.runtime.sampler import SamplingParams


@dataclass
class Scenario:
    kind: str
    params: dict[str, Any]

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]

    @property
    def name(self) -> str:
        return self.spec.label(self.params)

    @property
    def unit(self) -> str:
        return self.spec.unit

    @property
    def e2e(self) -> bool:
        return self.spec.e2e

    @property
    def decodes(self) -> bool:
        return self.e2e and self.spec.decode_shape(self.params) is not None


@dataclass
class Suite:
    model: str = "tinyllama-1.1b"
    dtype: str = "bf16"
    threads: int = 2
    repeats: int = 3
    peers: list[str] = field(default_factory=list)
    gguf: str | None = None
    scenarios: list[Scenario] = field(default_factory=list)


def load_suite(path: str | Path) -> Suite | comparisons.ComparisonSuite:
    """A scenario suite, or a comparison suite (a file with a top-level ``kind``)."""
    p = Path(path)
    if not p.is_file():
        raise InfengError(f"{p}: no such suite file")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise InfengError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(d, dict) and "kind" in d:
        return comparisons.load_comparison(d, p)
    if not isinstance(d, dict) or not isinstance(d.get("scenarios"), list):
        raise InfengError(f"{p}: a suite is a mapping with a `scenarios` list")
    known = {"model", "dtype", "threads", "repeats", "peers", "gguf", "scenarios", "name"}
    extra = set(d) - known
    if extra:
        raise InfengError(f"{p}: unknown key(s) {', '.join(sorted(extra))}")
    s = Suite(**{k: v for k, v in d.items() if k in known - {"scenarios", "name"}})
    s.peers = list(s.peers or [])
    for i, sc in enumerate(d["scenarios"]):
        if not isinstance(sc, dict) or sc.get("kind") not in KINDS:
            raise InfengError(f"{p}: scenario {i + 1}: `kind` must be one of {', '.join(KINDS)}")
        kind = sc["kind"]
        params = {k: v for k, v in sc.items() if k != "kind"}
        missing = [k for k in KINDS[kind].required if k not in params]
        if missing:
            raise InfengError(f"{p}: scenario {i + 1} ({kind}) needs {', '.join(missing)}")
        if "bf16_act" in params and (not KINDS[kind].e2e or params["bf16_act"] not in kernels.BF16_ACT):
            raise InfengError(f"{p}: scenario {i + 1} ({kind}): `bf16_act` is one of "
                              f"{', '.join(kernels.BF16_ACT)}, for the end-to-end kinds only")
        s.scenarios.append(Scenario(kind, params))
    return s


def resolve_model(model: str, dtype: str):
    """A synthetic architecture name → its cached file; anything else is a path."""
    if model in synthetic.ARCHS:
        path = synthetic.make(model, dtype)
        return load_model(path, verify=False), f"synthetic:{model}:{dtype}", path
    if not Path(model).exists():
        raise InfengError(f"model {model!r} is neither a file/folder nor a synthetic architecture "
                          f"({', '.join(sorted(synthetic.ARCHS))})")
    return load_model(model, verify=False), str(model), Path(model)


# ---- infeng as a runner ----------------------------------------------------------------------------
class InfengRunner:
    """The same three questions the peers answer, through the Engine (prefix cache off, so a
    repeat never reuses an earlier repeat's K/V)."""
    name = "infeng"
    note = ""

    def __init__(self, model, threads: int, isa: str | None = None):
        self.model, self.threads, self.isa = model, threads, isa
        self._engines: dict[tuple[int, int, str | None], Any] = {}
        self.last_overhead_us: float | None = None
        self.bf16_act: str | None = None               # the scenario's, else the model's / INFENG_BF16_ACT

    def engine(self, batch: int, ctx: int):
        ctx = min(self.model.config.max_seq_len, max(16, -(-ctx // 16) * 16))
        key = (batch, ctx, self.bf16_act)
        if key not in self._engines:
            self._engines.clear()                       # one KV pool at a time
            model = dataclasses.replace(self.model, bf16_act=self.bf16_act) if self.bf16_act else self.model
            self._engines[key] = Engine(model, threads=self.threads, max_batch=batch,
                                        max_batch_tokens=max(512, batch), max_seq_len=ctx, isa=self.isa,
                                        detokenize=False, prefix_cache=False)
        return self._engines[key]

    def _run(self, prompts, n):
        eng = self.engine(len(prompts), max(len(p) for p in prompts) + n)
        eng.stats = StepStats()
        reqs = [Request(id=str(i), prompt_ids=list(p),
                        params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
                for i, p in enumerate(prompts)]
        for r in eng.generate(reqs):
            if isinstance(r, tuple):
                raise InfengError(str(r[1]))
        return eng.stats

    def prefill(self, ids):
        st = self._run([ids], 1)
        return st.prefill_tokens, st.prefill_s

    def batch_decode(self, prompts, n):
        st = self._run(prompts, n)
        self.last_overhead_us = (st.step_s - st.c_s) / max(st.decode_tokens, 1) * 1e6
        return st.decode_tokens, st.decode_s

    def decode(self, ids, n):
        return self.batch_decode([ids], n)

    def close(self):
        self._engines.clear()


# ---- the run ------------------------------------------------------------------------------------------
@dataclass
class Result:
    scenario: Scenario
    runner: str
    values: list[float] = field(default_factory=list)      # one figure per repeat (unit: scenario.unit)
    seconds: list[float] = field(default_factory=list)
    skipped: str | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


def run_suite(suite: Suite, *, isa: str | None = None, on_step: Callable[[str], None] | None = None,
              notes: list[str] | None = None, peer_factory=make_peer) -> tuple[list[Result], dict[str, Any]]:
    """Run every scenario ``suite.repeats`` times per runner, alternating runners. Returns the
    results and meta (model, threads, ISA, bandwidth, notes)."""
    notes = notes if notes is not None else []
    kern = kernels.load(isa) if isa else kernels.active()
    isa_name = kern.ffi.string(kern.lib.ifg_isa()).decode()
    threads = suite.threads
    e2e = [s for s in suite.scenarios if s.e2e]
    model, model_label, model_path = (resolve_model(suite.model, suite.dtype) if e2e else (None, "-", None))
    scenarios = with_bandwidth(suite.scenarios)
    vocab = model.config.vocab_size if model is not None else 0
    max_ctx = 0
    acts = [s.name for s in e2e if "bf16_act" in s.params]
    if acts and not any(dt == "bf16" for dt, _ in model.tensors.values()):
        raise InfengError(f"scenario {acts[0]}: `bf16_act` applies to bf16 matrices; the model has none "
                          f"(its layers are {model.weight_dtype})")
    for s in e2e:
        need = s.spec.positions(s.params)
        if need > model.config.max_seq_len:
            raise InfengError(f"scenario {s.name} needs {need} positions; the model has {model.config.max_seq_len}")
        max_ctx = max(max_ctx, need + 1)

    runners: list[Any] = []
    if model is not None:
        runners.append(InfengRunner(model, threads, isa))
        for name in suite.peers:
            try:
                runners.append(peer_factory(name, model, threads, max_ctx, suite.gguf, model_path))
            except PeerSkip as e:
                notes.append(f"peer {name} skipped: {e}")
                continue
            if runners[-1].note:
                notes.append(f"peer {name}: {runners[-1].note}")
    results: list[Result] = []
    probes = make_probes(threads)
    probed = {"memory": [], "compute": []}

    def probe(kind: Kind) -> float:
        """The probe of the kind's bound, timed now (the figure of this repeat is divided by it)."""
        v = probes.gb_s() if kind.bound == "memory" else probes.gflop_s()
        probed[kind.bound].append(v)
        return v

    for s in scenarios:
        p = s.params
        if not s.e2e:
            r = Result(s, "infeng")
            case = s.spec.case(kern, p, threads)
            yards, on_cpu = [], []
            for _ in range(suite.repeats):
                yards.append(probe(s.spec))
                dt, cpu = micro.time_both(case, probes.clock, min_time=float(p.get("min_time", 0.2)))
                r.seconds.append(dt)
                r.values.append(s.spec.figure(case, dt))
                on_cpu.append(s.spec.figure(case, cpu))
                if s.spec.gflops:
                    r.extra.setdefault("gflop_s", []).append(case.flops / dt / 1e9)
                if on_step:
                    on_step(s.name)
            r.extra["norm"] = [normalised(on_cpu, yards)]
            r.extra = {k: statistics.median(v) for k, v in r.extra.items()}
            results.append(r)
            continue
        rs = {id(x): Result(s, x.name) for x in runners}
        yards, on_cpu = [], []
        for rep in range(suite.repeats):
            yards.append(probe(s.spec))
            for x in runners:
                res = rs[id(x)]
                if res.skipped:
                    continue
                if isinstance(x, InfengRunner):
                    x.bf16_act = p.get("bf16_act")
                try:
                    w0, c0, k0 = time.perf_counter(), time.process_time(), probes.clock()
                    tokens, dt = s.spec.run(x, p, vocab, seed=rep)
                    cpu = probes.clock() - k0
                    res.extra.setdefault("cpu_utilisation", []).append(
                        (time.process_time() - c0) / max(time.perf_counter() - w0, 1e-9) / threads)
                except PeerSkip as e:
                    res.skipped = str(e)
                    notes.append(f"{x.name} skipped {s.name}: {e}")
                    continue
                res.values.append(tokens / dt)
                res.seconds.append(dt)
                if x.name == "infeng":   # tok per on-CPU second of the whole run call
                    on_cpu.append(tokens / max(cpu, 1e-9))
                if x.name == "infeng" and s.decodes and x.last_overhead_us is not None:
                    res.extra.setdefault("py_overhead_us_per_tok", []).append(x.last_overhead_us)
                if on_step:
                    on_step(s.name)
        for x in runners:
            res = rs[id(x)]
            if x.name == "infeng" and on_cpu:
                res.extra["norm"] = [normalised(on_cpu, yards)]
            res.extra = {k: statistics.median(v) for k, v in res.extra.items()}
            results.append(res)
    for x in runners:
        x.close()
    busy = [r for r in results if r.runner == "infeng" and r.extra.get("cpu_utilisation", 1.0) < 0.6]
    if busy:
        notes.append(f"CPU utilisation was {min(r.extra['cpu_utilisation'] for r in busy):.0%} of {threads} threads "
                     f"in {', '.join(r.scenario.name for r in busy)}: the cores are shared with other work, "
                     f"so absolute figures are noise (ratios of the same run less so)")
    bw = next((r.median for r in results if r.scenario.kind == Bandwidth.name), None)
    if model is not None and bw:
        for r in results:
            if r.scenario.decodes and r.values:
                batch, mean_ctx = r.scenario.spec.decode_shape(r.scenario.params)
                step_s = batch / r.median
                r.extra["roofline_pct"] = 100.0 * decode_step_bytes(model, batch, mean_ctx) / step_s / (bw * 1e9)
    meta = {"model": model_label, "threads": threads, "isa": isa_name, "repeats": suite.repeats,
            "peers": [x.name for x in runners[1:]], "bandwidth_gb_s": bw, "notes": notes,
            "probe_gb_s": statistics.median(probed["memory"]) if probed["memory"] else None,
            "probe_gflop_s": statistics.median(probed["compute"]) if probed["compute"] else None}
    if model is not None:
        meta["weight_dtype"] = model.weight_dtype
        meta["weight_bytes"] = weight_bytes(model)
    return results, meta


def normalised(on_cpu: list[float], yards: list[float]) -> float:
    """The scenario's best on-CPU rate over its repeats ÷ the best of its probe's: interference
    from other work only ever lowers a rate, so the best of several is the steadiest estimate of
    each (baseline.py compares these)."""
    return max(on_cpu) / max(yards)


def steps_total(suite: Suite) -> int:
    """Progress-bar length: runs per scenario (peers counted as if they all run)."""
    n = 0
    e2e_runners = 1 + len(suite.peers)
    for s in with_bandwidth(suite.scenarios):
        n += suite.repeats * (e2e_runners if s.e2e else 1)
    return n


def with_bandwidth(scenarios: list[Scenario]) -> list[Scenario]:
    """The scenarios, with a bandwidth one first when some decode and none measures it (the
    roofline's denominator)."""
    if any(s.decodes for s in scenarios) and not any(s.kind == Bandwidth.name for s in scenarios):
        return [Scenario(Bandwidth.name, {"mb": DEFAULT_BW_MB})] + list(scenarios)
    return list(scenarios)
