"""bf16 matrices with f32 activations (exact) against bf16 activations (INFENG_BF16_ACT=bf16),
whole forward steps in one process, the two forms alternating step for step: a prefill of P
tokens and batch-8 decode steps. Two forward sessions share the mapped weights; the speedup is
the ratio of median step times (docs/results.md, "bf16 activations").

    python tools/bf16_ab.py MODEL.infeng THREADS REPEATS [P=512]
"""
from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from infeng import kernels
from infeng.model.loader import load_model
from infeng.runtime.session import ForwardSession


def main(path: str, threads: int, reps: int, P: int = 512) -> None:
    kern = kernels.active()
    m = load_model(path, verify=False)
    fss = {k: ForwardSession(kern, dataclasses.replace(m, bf16_act=k), max_tokens=P, max_out=8, threads=threads,
                             n_slots=8, max_seq_len=P + 64) for k in ("f32", "bf16")}
    times = {(k, w): [] for k in fss for w in ("pp", "b8")}
    last = {}
    for r in range(reps):
        for k in (list(fss) if r % 2 == 0 else list(fss)[::-1]):
            fs = fss[k]
            for s in range(8):
                fs.kv.release(s)
                fs.kv.ensure(s, P + 16)
            fs.tokens[:P] = np.random.default_rng(r).integers(3, m.config.vocab_size, P)
            fs.pos[:P], fs.seq[:P], fs.out_rows[:1] = np.arange(P), 0, P - 1
            t0 = time.perf_counter()
            fs.run(P, 1)
            times[(k, "pp")].append(time.perf_counter() - t0)
            last[k] = fs.logits[0].copy()
            for d in range(4):                       # batch-8 decode steps
                fs.tokens[:8] = np.random.default_rng(100 + d).integers(3, m.config.vocab_size, 8)
                fs.pos[:8], fs.seq[:8], fs.out_rows[:8] = d, np.arange(8), np.arange(8)
                t0 = time.perf_counter()
                fs.run(8, 8)
                times[(k, "b8")].append(time.perf_counter() - t0)
    med = {kw: float(np.median(v)) for kw, v in times.items()}
    for w, n in (("pp", P), ("b8", 8)):
        print(f"{w}{P if w == 'pp' else ''}: f32 x {n / med[('f32', w)]:.1f} tok/s, bf16 x {n / med[('bf16', w)]:.1f} tok/s, "
              f"speedup {med[('f32', w)] / med[('bf16', w)]:.2f}x (median of {len(times[('f32', w)])})")
    print(f"pp{P} last-row logits: max |diff| {np.abs(last['f32'] - last['bf16']).max():.3g} "
          f"of max |logit| {np.abs(last['f32']).max():.3g}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *(int(a) for a in sys.argv[4:5]))
