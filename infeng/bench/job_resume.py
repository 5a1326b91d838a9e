"""What a kill costs a batch job: an uninterrupted run against one killed (SIGKILL) part way and
rerun with the same command.

    infeng bench --suite bench/job_resume.yaml --model MODEL     (kind: job_resume)

Reports the uninterrupted wall time, the killed run's time until the kill, the rerun's time, and
the time lost in the kill: the part of the killed run whose results were not yet journaled
(``kill time - full time x journaled / requests``). The target: killed + rerun <= full x 1.05 + lost.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from infeng.bench.job_memory import write_requests
from infeng.errors import InfengError
from infeng.jobs.journal import journal_path


def command(model: str, req: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "infeng.cli.main", "generate", model, "--batch", str(req), "-o", str(out),
            "--max-batch", "32", "--threads", "1", "--seed", "1"]


def run(model: str, requests: int, max_tokens: int, kill_at: float, log=print) -> list[dict]:
    if not 0 < kill_at < 1:
        raise InfengError(f"job_resume: `kill_at` must be in (0, 1), got {kill_at}")
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        req, ref, out = d / "r.jsonl", d / "ref.jsonl", d / "o.jsonl"
        write_requests(req, requests, max_tokens)
        t0 = time.perf_counter()
        subprocess.run(command(model, req, ref), check=True, capture_output=True)
        full = time.perf_counter() - t0
        t0 = time.perf_counter()
        p = subprocess.Popen(command(model, req, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * kill_at)
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed = time.perf_counter() - t0
        journaled = max(0, journal_path(out).read_bytes().count(b"\n") - 1) if journal_path(out).exists() else 0
        t0 = time.perf_counter()
        subprocess.run(command(model, req, out), check=True, capture_output=True)
        rerun = time.perf_counter() - t0
        same = out.read_bytes() == ref.read_bytes()
    lost = killed - full * journaled / requests
    rec = {"requests": requests, "full_s": full, "killed_s": killed, "journaled": journaled, "rerun_s": rerun,
           "lost_s": lost, "killed_plus_rerun_s": killed + rerun, "target_s": full * 1.05 + lost,
           "within_target": killed + rerun <= full * 1.05 + lost, "identical_output": same}
    log(f"uninterrupted {full:.2f} s; killed after {killed:.2f} s with {journaled} of {requests} journaled; "
        f"rerun {rerun:.2f} s; lost in the kill {lost:.2f} s; killed + rerun {killed + rerun:.2f} s against "
        f"full x 1.05 + lost {full * 1.05 + lost:.2f} s; output identical: {same}")
    return [rec]
