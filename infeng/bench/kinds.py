"""The scenario kinds of a bench suite, one class per kind: its name in the YAML, its unit, the
parameters it needs, the label it reports under, and how it runs.

A micro kind times one kernel call on buffers of its own (infeng only); an end-to-end kind runs
the suite's model through a runner (infeng's Engine or a peer) and returns (tokens, seconds).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from typing import Any

import numpy as np

from infeng.bench import micro

DEFAULT_BW_MB = 256


class Kind(ABC):
    name: str
    unit: str
    required: tuple[str, ...] = ()
    e2e = False                 # runs on the suite's model, once per runner
    bound = "memory"            # which of the run's probes its figure is normalised by (probes.py)

    @abstractmethod
    def label(self, p: dict[str, Any]) -> str:
        ...


# ---- micro: one kernel call ---------------------------------------------------------------------
class MicroKind(Kind):
    gflops = False              # also report GFLOP/s beside the unit

    @abstractmethod
    def case(self, kern, p: dict[str, Any], threads: int) -> micro.Case:
        ...

    def figure(self, case: micro.Case, seconds: float) -> float:
        """The call's rate in ``unit``."""
        return case.bytes / seconds / 1e9


class Bandwidth(MicroKind):
    """STREAM-like read of a buffer of ``mb`` MiB (the roofline's denominator)."""
    name, unit = "bandwidth", "GB/s"

    def label(self, p):
        return f"bandwidth {float(p.get('mb', DEFAULT_BW_MB)):g}MiB"

    def case(self, kern, p, threads):
        return micro.bandwidth_case(kern, float(p.get("mb", DEFAULT_BW_MB)), threads)


class Gemv(MicroKind):
    """One matrix-vector product of a ``shape`` (ROWSxCOLS) weight of ``dtype``."""
    name, unit, required, gflops = "gemv", "GB/s", ("shape",), True

    def tokens(self, p) -> str:
        return ""

    def label(self, p):
        return f"{self.name}{self.tokens(p)} {p.get('dtype', 'bf16')} {p['shape']}"

    def case(self, kern, p, threads):
        return micro.matmul_case(kern, p.get("dtype", "bf16"), p["shape"], int(self.tokens(p) or 1), threads)


class Gemm(Gemv):
    """A ``tokens``-row matrix product (prefill's shape)."""
    name, unit, gflops, bound = "gemm", "GFLOP/s", False, "compute"

    def tokens(self, p) -> str:
        return str(p.get("tokens", 128))

    def figure(self, case, seconds):
        return case.flops / seconds / 1e9


class Attention(MicroKind):
    """One decode token's attention over ``depth`` cached positions (``kv``: the cache type)."""
    name, unit, required, gflops = "attention", "GB/s", ("depth",), True

    def label(self, p):
        return f"attention@d{p['depth']}" + (f" {p['kv']}" if p.get("kv", "f32") != "f32" else "")

    def case(self, kern, p, threads):
        return micro.attention_case(kern, int(p["depth"]), int(p.get("n_heads", 32)), int(p.get("n_kv_heads", 4)),
                                    int(p.get("head_dim", 64)), threads=threads, kv=str(p.get("kv", "f32")))


class Peak(MicroKind):
    """The machine's rate of one instruction on every thread, the compute ceiling a gemm's GOP/s is
    a share of. ``op``: a role (int8_dot, bf16_dot, f32_fma: what the kernel build in use runs
    those products on) or an instruction (vpdpbusd_zmm, vdpbf16ps_zmm, vfmadd_zmm, vfmadd_ymm,
    vpmaddubsw_ymm)."""
    name, unit, required, bound = "peak", "GOP/s", ("op",), "compute"

    def label(self, p):
        return f"peak {p['op']}"

    def case(self, kern, p, threads):
        return micro.peak_case(kern, str(p["op"]), threads)

    def figure(self, case, seconds):
        return case.flops / seconds / 1e9


# ---- end to end: the model through a runner -----------------------------------------------------
class E2EKind(Kind):
    """``bf16_act: f32|bf16`` (optional, bf16 models only): how infeng's bf16 matrices multiply their
    input in this scenario (INFENG_BF16_ACT's choice, per scenario); its label says which, so one
    suite measures both forms side by side with the same peers."""
    unit, e2e = "tok/s", True

    @abstractmethod
    def positions(self, p: dict[str, Any]) -> int:
        """KV positions one sequence needs."""
        ...

    @abstractmethod
    def run(self, runner, p: dict[str, Any], vocab: int, seed: int) -> tuple[int, float]:
        ...

    def decode_shape(self, p: dict[str, Any]) -> tuple[int, float] | None:
        """(sequences, mean cached positions) of a decode step, for the bandwidth roofline; None
        for kinds that do not decode."""
        return None


class Prefill(E2EKind):
    """pp``tokens``: one prompt of ``tokens`` tokens."""
    name, required, bound = "prefill", ("tokens",), "compute"

    def label(self, p):
        return f"pp{p['tokens']}" + act_label(p)

    def positions(self, p):
        return p["tokens"]

    def run(self, runner, p, vocab, seed):
        return runner.prefill(prompt(vocab, p["tokens"], seed))


class Decode(E2EKind):
    """tg``tokens`` after a prompt of ``depth`` tokens."""
    name, required = "decode", ("tokens",)

    def label(self, p):
        return f"tg{p['tokens']}@d{p.get('depth', 0)}" + act_label(p)

    def positions(self, p):
        return p.get("depth", 0) + p["tokens"]

    def run(self, runner, p, vocab, seed):
        return runner.decode(prompt(vocab, max(1, p.get("depth", 0)), seed), p["tokens"])

    def decode_shape(self, p):
        return 1, p.get("depth", 0) + p["tokens"] / 2


class BatchDecode(E2EKind):
    """Aggregate tok/s of ``batch`` sequences decoding ``tokens`` each after 16-token prompts."""
    name, required = "batch_decode", ("batch", "tokens")
    PROMPT = 16

    def label(self, p):
        return f"batch{p['batch']} tg{p['tokens']}" + act_label(p)

    def positions(self, p):
        return self.PROMPT + p["tokens"]

    def run(self, runner, p, vocab, seed):
        prompts = [prompt(vocab, self.PROMPT, 100 * seed + i) for i in range(p["batch"])]
        return runner.batch_decode(prompts, p["tokens"])

    def decode_shape(self, p):
        return p["batch"], self.PROMPT + p["tokens"] / 2


def act_label(p: dict[str, Any]) -> str:
    return f" {p['bf16_act']}-act" if "bf16_act" in p else ""


def prompt(vocab: int, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, vocab, max(n, 1) - 1).tolist()


KINDS: dict[str, Kind] = {k.name: k for k in (Bandwidth(), Gemv(), Gemm(), Attention(), Peak(), Prefill(),
                                              Decode(), BatchDecode())}
