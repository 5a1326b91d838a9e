"""CPU time the driver of a Ray batch job spends per input line (and the job's latency
percentiles): a local 2-CPU Ray cluster, 2 single-core workers, one warm-up job, then ``--runs``
jobs timed with time.process_time() around run_batch_job. CPU time, because wall time on a shared
machine follows the number of busy processes.

    python tools/job_driver_cpu.py MODEL [--requests 8000] [--tokens 8] [--runs 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray

from infeng.bench.job_memory import write_requests
from infeng.jobs import BatchJob, run_batch_job
from infeng.runtime.sampler import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--requests", type=int, default=8000)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    with tempfile.TemporaryDirectory() as td:
        req, out = Path(td) / "r.jsonl", Path(td) / "o.jsonl"
        write_requests(req, a.requests, a.tokens)
        for i in range(a.runs + 1):
            job = BatchJob(a.model, str(req), out, SamplingParams(temperature=0.0, seed=1).validated(), max_batch=8,
                           progress=False, shard_size=250, ray="auto", ray_cpus=1, ray_workers=2)
            c0 = time.process_time()
            _, m = run_batch_job(job)
            cpu = time.process_time() - c0
            out.unlink()
            if i:           # the first run warms up (imports, Ray's worker processes)
                print(f"driver cpu {cpu / a.requests * 1e6:.1f} us/line, workers "
                      f"{m['worker_cpu_s'] / a.requests * 1e6:.1f} us/line, wall {m['wall_s']:.2f} s, "
                      + ", ".join(f"{k} {m[k]:.1f}" for k in ("latency_ms_p50", "latency_ms_p99", "ttft_ms_p50",
                                                              "ttft_ms_p99") if k in m))
    ray.shutdown()


if __name__ == "__main__":
    main()
