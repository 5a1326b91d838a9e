"""A job's figures in constant memory: exact counts, latency percentiles over a uniform sample.

A million-request job cannot keep every Result for its percentiles; a reservoir of
SAMPLE results (Vitter's algorithm R, fixed seed) estimates them, and the counts stay exact.
"""
from __future__ import annotations

import random
import time
from typing import Any

from infeng.runtime.batch import metrics
from infeng.runtime.types import Result
from infeng.telemetry import peak_rss_mb

SAMPLE = 2048


class JobStats:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.worker_cpu_s = 0.0     # CPU time of the Ray workers (reported with their shards)
        self.done = 0               # requests that ran (results journaled this run)
        self.failed = 0             # lines answered with an error
        self.skipped = 0            # found in the journal
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.sample: list[Result] = []
        self._rng = random.Random(0)

    def add(self, r: Result) -> None:
        self.done += 1
        self.prompt_tokens += len(r.prompt_ids)
        self.generated_tokens += len(r.token_ids)
        r.request = None            # the sample keeps timings, not prompts
        if len(self.sample) < SAMPLE:
            self.sample.append(r)
        else:
            j = self._rng.randrange(self.done)
            if j < SAMPLE:
                self.sample[j] = r

    def tok_s(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.generated_tokens / dt if dt > 0 else 0.0

    def metrics(self, engine, wall_s: float) -> dict[str, Any]:
        """The batch metrics of infeng.runtime.batch on the sample, with the exact totals."""
        m = metrics(engine, self.sample, wall_s) if engine is not None else {}
        m.update(requests=self.done, prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
                 wall_s=wall_s, peak_rss_mb=peak_rss_mb(), cpu_s=time.process_time() - self.cpu0,
                 worker_cpu_s=self.worker_cpu_s,
                 aggregate_tok_s=self.generated_tokens / wall_s if wall_s else float("nan"),
                 failed_requests=self.failed, skipped_requests=self.skipped,
                 latency_sample_requests=len(self.sample))
        return m
