"""Per-op time of a model's first forward calls (the C op clock), with the call's wall and CPU
time and page faults: what a first request pays that later ones do not.

    python tools/first_forward.py MODEL [--threads 1] [--tokens 37] [--calls 3]
"""
from __future__ import annotations

import argparse
import resource
import time
from collections import defaultdict

import numpy as np

from infeng import kernels
from infeng.bench.profile import op_spans
from infeng.model.loader import load_model
from infeng.runtime.session import ForwardSession


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=37)
    ap.add_argument("--calls", type=int, default=3)
    a = ap.parse_args()
    m = load_model(a.model)
    T = a.tokens
    # the engine's default shapes: 8 sequences of 4096 positions, 512 tokens a step
    fs = ForwardSession(kernels.active(), m, max_tokens=512, max_out=8, threads=a.threads, n_slots=8,
                        max_seq_len=min(4096, m.config.max_seq_len))
    net = fs.net
    clock = net.record_op_times()
    per_call = []
    for i in range(a.calls):
        fs.kv.release(0)
        fs.kv.ensure(0, T)
        net.tokens[:T] = np.arange(100, 100 + T) % m.config.vocab_size
        net.pos[:T], net.seq[:T], net.out_rows[0] = np.arange(T), 0, T - 1
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fs.run(T, 1)
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        print(f"call {i + 1}: {T} tokens, wall {wall * 1e3:.1f} ms, cpu {cpu * 1e3:.1f} ms, "
              f"minor faults {r1.ru_minflt - r0.ru_minflt}, major {r1.ru_majflt - r0.ru_majflt}")
        ops: dict[str, float] = defaultdict(float)
        for _, op, s, e in op_spans(clock, m.config.n_layers):
            ops[op] += e - s
        per_call.append(ops)
    print("op ms, per call: " + " ".join(f"{i + 1:>8d}" for i in range(a.calls)))
    for op in per_call[0]:
        print(f"  {op:14s}" + " ".join(f"{c[op] * 1e3:8.2f}" for c in per_call))


if __name__ == "__main__":
    main()
