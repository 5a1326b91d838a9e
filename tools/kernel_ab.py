"""The kernel library of another git revision against this tree's, in one process: matmul calls
of both alternate call for call (on-CPU time, median of pairs), so the machine's load hits both
alike. The old library is built from ``git show REV:kernels_c/...`` under another module name
(out/kernel_ab/REV/), once per revision.

    python tools/kernel_ab.py REV [--isa avx512] [--threads 2] [--pairs 9] [--cflags=-DX=1] [--dram MB] CASE...

REV "worktree" builds the working tree's kernels_c as the old side: with --cflags (compiled into the
old side only), a tile-size variant against the tree as it is.

CASE is DTYPE:NxK:T, e.g. bf16:2048x5632:1 (a GEMV), bf16_dp:5632x2048:8, f32:2048x2048:512, or
attention:KV:DEPTH, e.g. attention:int4c:4096 (one decode token of one layer over DEPTH cached
positions, TinyLlama's 32/4 heads x 64: micro.attention_case; KV f32, int8c, int4c, int8, bf16, ...).
Prints new/old time per case (< 1: the new library is faster). --dram MB: each call reads the next of
copies of W totalling MB (e.g. 128, 4x a 32 MiB L3), so a GEMV streams from DRAM as in a decode step,
and the read-bandwidth probe (probes.py's) is timed between the pairs for scale (--rotate is the
same option); for attention cases it runs 22 caches (a TinyLlama's layers) in turn instead. T <= 16
prints GB/s (weight-bound), larger T GFLOP/s.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # this tree's infeng (and its built kernels), not an installed one

from infeng import kernels  # noqa: E402
from infeng.bench import micro, probes  # noqa: E402
from infeng.kernels import build  # noqa: E402


def old_library(rev: str, isa: str, cflags: list[str]):
    """The cffi module of ``rev``'s kernels_c (+ cflags), built for ``isa`` under out/kernel_ab/."""
    if rev == "worktree":
        sha = "worktree-" + hashlib.sha1(" ".join(cflags).encode() + b"".join(
            p.read_bytes() for p in sorted((ROOT / "kernels_c").iterdir()))).hexdigest()[:10]
    else:
        sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip() + ("-" + hashlib.sha1(" ".join(cflags).encode()).hexdigest()[:8]
                                                           if cflags else "")
    where = ROOT / "out" / "kernel_ab" / sha
    name = f"_infeng_ab_{isa}"
    built = list(where.glob(f"{name}.*.so"))
    if not built:
        src = where / "kernels_c"
        src.mkdir(parents=True, exist_ok=True)
        if rev == "worktree":
            for p in (ROOT / "kernels_c").iterdir():
                (src / p.name).write_bytes(p.read_bytes())
        else:
            files = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:kernels_c"], cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout.split()
            for f in files:
                (src / f).write_bytes(subprocess.run(["git", "show", f"{rev}:kernels_c/{f}"], cwd=ROOT,
                                                     capture_output=True, check=True).stdout)
        ffi = FFI()
        text = []
        for h in sorted(src.glob("*.h")):   # the cdef blocks, as build.cdef_text reads them
            inside = False
            for line in h.read_text().splitlines():
                if line.strip() in ("// cdef-begin", "// cdef-end"):
                    inside = line.strip() == "// cdef-begin"
                elif inside and not line.lstrip().startswith("#"):
                    text.append(line)
        ffi.cdef("\n".join(text))
        ffi.set_source(name, f"#define IFG_BUILD_ISA \"{isa}\"\n" +
                       "\n".join(f'#include "{c.name}"' for c in sorted(src.glob("*.c"))),
                       include_dirs=[str(src)], extra_compile_args=build.BASE_FLAGS + build.ISA_FLAGS[isa] + cflags,
                       extra_link_args=["-fopenmp"])
        built = [Path(ffi.compile(tmpdir=str(where), verbose=False))]
    spec = importlib.util.spec_from_file_location(name, built[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LAYERS = 22   # attention with --dram: a TinyLlama's caches, one after another, as a decode step reads them


class InTurn:
    """Cases run one after another, a call each: each streams what the others pushed out of cache."""

    def __init__(self, cases):
        self.cases, self.i = cases, 0
        self.bytes, self.flops = cases[0].bytes, cases[0].flops

    def run(self):
        self.cases[self.i].run()
        self.i = (self.i + 1) % len(self.cases)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev")
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--isa", default="avx512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=9)
    ap.add_argument("--cflags", default="", help="extra compiler flags of the old side")
    ap.add_argument("--dram", "--rotate", dest="dram", type=float, default=0, metavar="MB",
                    help="rotate copies of W totalling MB")
    a = ap.parse_args()
    libs = {"old": old_library(a.rev, a.isa, a.cflags.split()), "new": kernels.load(a.isa)}
    clock = time.process_time if a.threads != 1 else time.thread_time
    bw = micro.bandwidth_case(kernels.load("scalar"), probes.PROBE_MB, a.threads) if a.dram else None
    for spec in a.cases:
        dtype, shape, t = spec.split(":")
        if dtype == "attention":   # shape is the KV kind, t the depth; reads its cache: GB/s
            n = LAYERS if a.dram else 1
            cases = {k: InTurn([micro.attention_case(lib, int(t), threads=a.threads, kv=shape) for _ in range(n)])
                     for k, lib in libs.items()}
            t = "1"
        else:
            cases = {k: micro.matmul_case(lib, dtype, shape, int(t), a.threads, a.dram) for k, lib in libs.items()}
        reps = max(1, int(0.05 / max(1e-6, micro.time_both(cases["new"], clock, min_time=0.05)[1])))
        times = {k: [] for k in cases}
        probe = []
        for i in range(a.pairs):
            if a.dram:
                probe.append(bw.bytes / micro.time_both(bw, clock, min_time=0.02)[1] / 1e9)
            for k in (("old", "new") if i % 2 == 0 else ("new", "old")):
                c0 = clock()
                for _ in range(reps):
                    cases[k].run()
                times[k].append((clock() - c0) / reps)
        ratios = [n / o for n, o in zip(times["new"], times["old"])]
        rate = {k: (f"{cases[k].bytes / statistics.median(v) / 1e9:.1f} GB/s" if int(t) <= 16
                    else f"{cases[k].flops / statistics.median(v) / 1e9:.0f} GFLOP/s") for k, v in times.items()}
        us = {k: f"{statistics.median(v) * 1e6:.1f} us" for k, v in times.items()}
        print(f"{spec}: new/old {statistics.median(ratios):.3f} (pairs {min(ratios):.3f}..{max(ratios):.3f}), "
              f"new {us['new']}, old {us['old']}, "
              f"new {rate['new']}, old {rate['old']} on-CPU"
              + (f", probe {statistics.median(probe):.1f} GB/s" if probe else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
