"""The kernel library of another git revision against this tree's, in one process: matmul calls
of both alternate call for call (on-CPU time, median of pairs), so the machine's load hits both
alike. The old library is built from ``git show REV:kernels_c/...`` under another module name
(out/kernel_ab/REV/), once per revision.

    python tools/kernel_ab.py REV [--isa avx512] [--threads 2] [--pairs 9] [--cflags=-DX=1] [--rotate MB] CASE...

REV "worktree" builds the working tree's kernels_c as the old side: with --cflags (compiled into the
old side only), a tile-size variant against the tree as it is.

CASE is DTYPE:NxK:T, e.g. bf16:2048x5632:1 (a GEMV), bf16_dp:5632x2048:8, f32:2048x2048:512.
Prints new/old time per case (< 1: the new library is faster).

--rotate MB: each side's calls go round copies of the weights totalling at least MB MiB (say 3× the
L3), so a GEMV streams them from DRAM as a decode step does, instead of from the L3 where one matrix
timed in a loop stays; the read-bandwidth probe over as many MiB is printed beside it.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cffi import FFI

from infeng import kernels
from infeng.bench import micro
from infeng.kernels import build

ROOT = Path(__file__).resolve().parents[1]


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


def rotated(make, mb: float) -> micro.Case:
    """A case whose run() goes round copies of make()'s weights totalling at least ``mb`` MiB."""
    first = make()
    copies = [first] + [make() for _ in range(max(0, math.ceil(mb * 2**20 / first.keep[0].nbytes) - 1))]
    turn = itertools.cycle(copies)

    def run():
        next(turn).run()
    return micro.Case(first.name, run, bytes=first.bytes, flops=first.flops, keep=tuple(copies))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev")
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--isa", default="avx512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=9)
    ap.add_argument("--cflags", default="", help="extra compiler flags of the old side")
    ap.add_argument("--rotate", type=float, default=0.0, help="MiB of weight copies to go round (0: one copy)")
    a = ap.parse_args()
    libs = {"old": old_library(a.rev, a.isa, a.cflags.split()), "new": kernels.load(a.isa)}
    clock = time.process_time if a.threads != 1 else time.thread_time
    if a.rotate:
        probe = micro.bandwidth_case(kernels.load("scalar"), a.rotate, a.threads)
        print(f"read-bandwidth probe over {a.rotate:g} MiB: "
              f"{probe.bytes / micro.time_both(probe, clock, min_time=0.2)[1] / 1e9:.1f} GB/s on-CPU", flush=True)
    for spec in a.cases:
        dtype, shape, t = spec.split(":")
        cases = {k: rotated(lambda lib=lib: micro.matmul_case(lib, dtype, shape, int(t), a.threads), a.rotate)
                 for k, lib in libs.items()}
        reps = max(1, int(0.05 / max(1e-6, micro.time_both(cases["new"], clock, min_time=0.05)[1])))
        times = {k: [] for k in cases}
        for i in range(a.pairs):
            for k in (("old", "new") if i % 2 == 0 else ("new", "old")):
                c0 = clock()
                for _ in range(reps):
                    cases[k].run()
                times[k].append((clock() - c0) / reps)
        ratios = [n / o for n, o in zip(times["new"], times["old"])]
        new = statistics.median(times["new"])
        rate = (f"{cases['new'].bytes / new / 1e9:.1f} GB/s" if int(t) <= 16
                else f"{cases['new'].flops / new / 1e9:.0f} GFLOP/s")
        print(f"{spec}: new/old {statistics.median(ratios):.3f} (pairs {min(ratios):.3f}..{max(ratios):.3f}), "
              f"new {rate} on-CPU", flush=True)


if __name__ == "__main__":
    sys.exit(main())
