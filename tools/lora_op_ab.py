"""Where a mixed-LoRA step's extra time goes: one forward step of 8 rows × CHUNK tokens, bare and
with 4 adapters (rows grouped 2 per adapter, all 7 projections), alternating in one process, with
the C pass's per-op clock on (which adds a barrier after every projection). Prints the pair-median
overhead of the whole step and, per op interval, the median excess over bare. The shrinks of a
projection group run in the interval of its first projection (wq, wo, w_gate, w_down).

    python tools/lora_op_ab.py BASE.infeng --rank 32 --dtype int8 --chunk 64 --pairs 6
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from infeng.bench.lora_scenarios import ALL7, adapter_file
from infeng.model.loader import load_model
from infeng.runtime.engine import Engine
from infeng.runtime.session import ForwardSession

OPS = ["embed", "attn_norm", "wq", "wk", "wv", "rope", "kv_store", "attention", "wo", "ffn_norm", "w_gate",
       "w_up", "silu_mul", "w_down"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--dtype", default="int8", choices=["int8", "bf16", "f32"])
    ap.add_argument("--chunk", type=int, default=64, help="tokens per row (1: a decode step)")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    model = load_model(a.base, verify=False)
    cfg, B, C = model.config, 8, a.chunk
    T = B * C
    eng = Engine(model, threads=a.threads, max_batch=B, max_batch_tokens=T, detokenize=False, prefix_cache=False)
    names = [eng.load_adapter(adapter_file(a.base, model, a.rank, a.dtype, seed=100 * a.rank + k, targets=ALL7),
                              f"a{k}").name for k in range(4)]
    tables = [eng.adapters.get(n).table for n in names]
    fs = [ForwardSession(eng.kern, model, max_tokens=T, max_out=B, threads=a.threads, n_slots=B,
                         max_seq_len=C + 2, net=eng.net) for _ in range(2)]
    fs[1].lora.reserve(max(eng.adapters.get(n).kernel_rank for n in names))
    clock = eng.net.record_op_times()
    NO, L = eng.kern.lib.IFG_OP_COUNT, cfg.n_layers
    rng = np.random.default_rng(0)
    ops, tot = ([], []), ([], [])
    for p in range(a.pairs):
        for f in fs:
            for s in range(B):
                f.kv.release(s)
                f.kv.ensure(s, C + 1)
        net = eng.net
        net.tokens[:T] = rng.integers(3, cfg.vocab_size, T)
        net.pos[:T] = np.tile(np.arange(C), B)
        net.seq[:T] = np.repeat(np.arange(B), C)
        net.out_rows[:B] = np.arange(B) * C + C - 1
        for w in ((0, 1) if p % 2 == 0 else (1, 0)):
            lb = fs[1].lora_segments(tables, [0, 2 * C, 4 * C, 6 * C], T) if w else None
            t0 = time.perf_counter()
            fs[w].run(T, B, lb)
            tot[w].append(time.perf_counter() - t0)
            d, prev = np.zeros(len(OPS)), clock[1 + L * NO]       # the embedding's stamp
            for layer in range(L):
                for op in range(1, len(OPS)):
                    v = clock[1 + layer * NO + op]
                    if v:
                        d[op] += v - prev
                        prev = v
            ops[w].append(d)
    bare, mixed = np.array(tot[0]), np.array(tot[1])
    print(f"T={T} rank {a.rank} {a.dtype}: step bare {np.median(bare) * 1e3:.1f} ms, mixed "
          f"{np.median(mixed) * 1e3:.1f} ms, pair-median overhead {(np.median(mixed / bare) - 1) * 100:.2f} %")
    ob, om = np.median(ops[0], 0), np.median(ops[1], 0)
    for op in range(1, len(OPS)):
        print(f"  {OPS[op]:10s} bare {ob[op] * 1e3:9.2f} ms  excess {(om[op] - ob[op]) * 1e3:8.2f} ms "
              f"({(om[op] - ob[op]) / np.median(bare) * 100:6.2f} % of the step)")


if __name__ == "__main__":
    main()
