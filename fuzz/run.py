"""Time-boxed fuzzing of infeng's file readers (``make fuzz``; not part of ``make test``).

    python -m fuzz.run gguf --seconds 60          # one target, coverage-guided with atheris
    python -m fuzz.run --all --seconds 60         # every target, one subprocess each, a summary

Targets (fuzz/harness.py): native, safetensors, gguf, config. Inputs that crash (any exception
other than InfengError), hang (> --timeout s) or blow up memory are saved under
out/fuzz/artifacts/; the new corpus entries under out/fuzz/corpus/. Without atheris the same
harnesses run under a plain mutation fuzzer (--engine mutate; no coverage feedback).
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "out" / "fuzz"
TARGETS = ("native", "safetensors", "gguf", "config")
DICTS = {"native": "json.dict", "safetensors": "json.dict", "gguf": "gguf.dict", "config": "json.dict"}


def run_atheris(target: str, seconds: int, timeout: int, corpus: Path, artifacts: Path) -> int:
    import atheris
    with atheris.instrument_imports(include=["infeng"]):
        import infeng.converters.gguf_file, infeng.converters.gguf_read  # noqa: F401  (instrumented before the harness imports them)
        import infeng.converters.gguf_tokenizer  # noqa: F401
        import infeng.converters.safetensors_io  # noqa: F401
        import infeng.converters.peft  # noqa: F401
        import infeng.converters.hf  # noqa: F401
        import infeng.format  # noqa: F401
        import infeng.converters.hf_config  # noqa: F401
        import infeng.format.config  # noqa: F401
        import infeng.model.loader  # noqa: F401
    from fuzz.harness import TARGETS as FNS
    fn = FNS[target]
    argv = [sys.argv[0], str(corpus), f"-max_total_time={seconds}", f"-timeout={timeout}", "-rss_limit_mb=3072",
            "-print_final_stats=1", f"-artifact_prefix={artifacts}/{target}-", "-max_len=2000000",
            f"-dict={ROOT / 'fuzz' / 'dicts' / DICTS[target]}"]
    atheris.Setup(argv, fn)
    atheris.Fuzz()                   # exits the process
    return 0


def _mutate(data: bytearray, rng: random.Random) -> bytearray:
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if not data:
            data = bytearray(rng.randbytes(8))
        i = rng.randrange(len(data))
        if op == 0:
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[i] = rng.randrange(256)
        elif op == 2:                           # an interesting integer over 1/2/4/8 bytes
            w = rng.choice((1, 2, 4, 8))
            v = rng.choice((0, 1, 255, 0x7F, 0x80, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1, -1 & 0xFFFFFFFF))
            data[i:i + w] = (v & ((1 << 8 * w) - 1)).to_bytes(w, "little")
        elif op == 3:
            del data[i:]
        elif op == 4:
            data[i:i] = rng.randbytes(rng.randint(1, 16))
        else:
            j = rng.randrange(len(data))
            data[i:i + 8] = data[j:j + 8]
    return data


def run_mutate(target: str, seconds: int, timeout: int, corpus: Path, artifacts: Path) -> int:
    """Random mutations of the seeds (no coverage feedback): the fallback when atheris is absent."""
    from fuzz.harness import TARGETS as FNS
    fn, rng = FNS[target], random.Random(0)
    seeds = [p.read_bytes() for p in sorted(corpus.iterdir()) if p.is_file()]
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("hang")))
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        data = bytes(_mutate(bytearray(rng.choice(seeds)), rng))
        signal.alarm(timeout)
        try:
            fn(data)
        except BaseException:
            signal.alarm(0)
            path = artifacts / f"{target}-crash-{n}"
            path.write_bytes(data)
            traceback.print_exc()
            print(f"stat::number_of_executed_units: {n + 1}\ncrash input saved to {path}", file=sys.stderr)
            return 1
        signal.alarm(0)
        n += 1
    print(f"stat::number_of_executed_units: {n}", file=sys.stderr)
    return 0


def one(args) -> int:
    from fuzz import seeds
    data = Path(args.data)
    corpus = seeds.make(args.target, WORK / "corpus" / args.target, data)
    artifacts = WORK / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError as e:
            print(f"fuzz: atheris unavailable ({e}); using the mutation fuzzer", file=sys.stderr)
            engine = "mutate"
    run = run_atheris if engine == "atheris" else run_mutate
    return run(args.target, args.seconds, args.timeout, corpus, artifacts)


def all_targets(args) -> int:
    rows, bad = [], 0
    for t in args.targets or TARGETS:
        cmd = [sys.executable, "-m", "fuzz.run", t, "--seconds", str(args.seconds), "--timeout", str(args.timeout),
               "--engine", args.engine, "--data", args.data]
        t0 = time.monotonic()
        scratch = tempfile.mkdtemp(prefix=f"infeng-fuzz-{t}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                               env=dict(os.environ, INFENG_FUZZ_SCRATCH=scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log = WORK / f"{t}.log"
        log.write_text(p.stderr + p.stdout)
        m = re.findall(r"stat::number_of_executed_units: (\d+)", p.stderr)
        execs = int(m[-1]) if m else 0
        status = "ok" if p.returncode == 0 else f"FAILED (exit {p.returncode}, see {log})"
        bad += p.returncode != 0
        rows.append((t, execs, time.monotonic() - t0, status))
        print(f"{t:12s} {execs:9d} execs  {rows[-1][2]:6.1f} s  {status}", flush=True)
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description="fuzz infeng's readers")
    ap.add_argument("target", nargs="?", choices=TARGETS)
    ap.add_argument("--all", action="store_true", help="every target in its own process, then a summary")
    ap.add_argument("--targets", nargs="*", choices=TARGETS, help="with --all: only these")
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", 60)))
    ap.add_argument("--timeout", type=int, default=10, help="seconds one input may take before it counts as a hang")
    ap.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
    ap.add_argument("--data", default=os.environ.get("INFENG_TEST_DATA", str(ROOT.parent / "shared" / "data")))
    args = ap.parse_args()
    (WORK / "artifacts").mkdir(parents=True, exist_ok=True)
    if args.all:
        return all_targets(args)
    if not args.target:
        ap.error("give a target or --all")
    return one(args)


if __name__ == "__main__":
    sys.exit(main())
