"""What a kill costs a batch job: an uninterrupted run against one killed (SIGKILL) part way and
rerun with the same command.

    python -m infeng.bench.job_resume MODEL [--requests 20000] [--kill-at 0.5]

Reports the uninterrupted wall time, the killed run's time until the kill, the rerun's time, and
the time lost in the kill: the part of the killed run whose results were not yet journaled
(``kill time - full time x journaled / requests``). The target: killed + rerun <= full x 1.05 + lost.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from infeng.bench.job_memory import write_requests
from infeng.jobs.journal import journal_path


def command(model: str, req: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "infeng.cli.main", "generate", model, "--batch", str(req), "-o", str(out),
            "--max-batch", "32", "--threads", "1", "--seed", "1"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--kill-at", type=float, default=0.5, help="fraction of the uninterrupted wall time")
    a = ap.parse_args(argv)
    if not Path(a.model).exists() or a.requests < 1 or not 0 < a.kill_at < 1:
        print("job_resume: give an existing MODEL, --requests >= 1, --kill-at in (0, 1)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        req, ref, out = d / "r.jsonl", d / "ref.jsonl", d / "o.jsonl"
        write_requests(req, a.requests, a.max_tokens)
        t0 = time.perf_counter()
        subprocess.run(command(a.model, req, ref), check=True, capture_output=True)
        full = time.perf_counter() - t0
        t0 = time.perf_counter()
        p = subprocess.Popen(command(a.model, req, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * a.kill_at)
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed = time.perf_counter() - t0
        journaled = max(0, journal_path(out).read_bytes().count(b"\n") - 1)
        t0 = time.perf_counter()
        subprocess.run(command(a.model, req, out), check=True, capture_output=True)
        rerun = time.perf_counter() - t0
        same = out.read_bytes() == ref.read_bytes()
    lost = killed - full * journaled / a.requests
    print(f"uninterrupted {full:.2f} s; killed after {killed:.2f} s with {journaled} of {a.requests} journaled; "
          f"rerun {rerun:.2f} s; lost in the kill {lost:.2f} s")
    print(f"killed + rerun = {killed + rerun:.2f} s  vs  full x 1.05 + lost = {full * 1.05 + lost:.2f} s  "
          f"({'within' if killed + rerun <= full * 1.05 + lost else 'OVER'}); output identical: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
