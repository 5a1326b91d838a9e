"""One decode token's attention over a paged compressed KV cache, per layer: in cache (one case
run over and over) and streaming (22 cases, a TinyLlama's layers, in turn) — whether decode at
depth is bound by the cache's bytes or by the kernel's arithmetic.

    PYTHONPATH=. python tools/attention_stream.py [DEPTH ...]
"""
import statistics as st
import sys
import time

from infeng import kernels
from infeng.bench import micro


def per_layer(cases, rounds: int = 7, reps: int = 50) -> float:
    """Median seconds per case run; with one case, `reps` runs of it in a row."""
    ts = []
    for _ in range(rounds):
        n = reps if len(cases) == 1 else len(cases)
        t = time.perf_counter()
        for i in range(n):
            cases[i % len(cases)].run()
        ts.append((time.perf_counter() - t) / n)
    return st.median(ts)


def main() -> None:
    k = kernels.active()
    for d in [int(a) for a in sys.argv[1:]] or [1024, 4096]:
        for th in (1, 2):
            for kv in ("int8c", "int4c"):
                one = micro.attention_case(k, d, threads=th, kv=kv)
                many = [micro.attention_case(k, d, threads=th, kv=kv) for _ in range(22)]
                print(f"depth {d} {th} thread(s) {kv}: in cache {1e6 * per_layer([one]):.1f} µs a layer, "
                      f"22 caches in turn {1e6 * per_layer(many):.1f} µs ({one.bytes / 1e6:.2f} MB a layer)")


if __name__ == "__main__":
    main()
