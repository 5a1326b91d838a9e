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
from infeng.telemetry import peak_rss_mb, percentile

SAMPLE = 2048
LATENCIES = ("latency_ms", "ttft_ms", "tpot_ms", "queue_ms")     # per request, from submit


def latencies(r: Result) -> tuple[float | None, ...]:
    """A request's LATENCIES in ms (None where it has none: no token, one token, not admitted)."""
    ms = lambda s: None if s is None else s * 1e3      # noqa: E731
    done = None if r.t_done is None else r.t_done - r.t_submit
    return ms(done), ms(r.ttft_s), ms(r.tpot_s), ms(r.queue_s)


class JobStats:
    def __init__(self, sample: int = SAMPLE) -> None:
        """``sample``: results kept for the percentiles (a Ray worker keeps its whole shard)."""
        self.size = sample
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.worker_cpu_s = 0.0     # CPU time of the Ray workers (reported with their shards)
        self.done = 0               # requests that ran (results journaled this run)
        self.failed = 0             # lines answered with an error
        self.skipped = 0            # found in the journal
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.sample: list[Result] = []
        self.lat_sample: list[tuple] = []     # LATENCIES of requests run on Ray workers
        self.lat_seen = 0
        self._rng = random.Random(0)

    def add(self, r: Result) -> None:
        self.done += 1
        self.prompt_tokens += len(r.prompt_ids)
        self.generated_tokens += len(r.token_ids)
        r.request = None            # the sample keeps timings, not prompts
        self._keep(self.sample, self.done, r)

    def add_latencies(self, rows: list[tuple]) -> None:
        """LATENCIES of requests that ran elsewhere (a Ray worker's shard, every one of them)."""
        for row in rows:
            self.lat_seen += 1
            self._keep(self.lat_sample, self.lat_seen, tuple(row))

    def _keep(self, sample: list, seen: int, x) -> None:
        """Algorithm R: after ``seen`` items, each is in ``sample`` with the same chance."""
        if len(sample) < self.size:
            sample.append(x)
        else:
            j = self._rng.randrange(seen)
            if j < self.size:
                sample[j] = x

    def tok_s(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.generated_tokens / dt if dt > 0 else 0.0

    def metrics(self, engine, wall_s: float) -> dict[str, Any]:
        """The batch metrics of infeng.runtime.batch on the sample, with the exact totals."""
        m = metrics(engine, self.sample, wall_s) if engine is not None else {}
        rows = self.lat_sample + [latencies(r) for r in self.sample]
        for i, name in enumerate(LATENCIES):
            vals = [row[i] for row in rows if row[i] is not None]
            m[f"{name}_p50"], m[f"{name}_p99"] = percentile(vals, 50), percentile(vals, 99)
        m.update(requests=self.done, prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
                 wall_s=wall_s, peak_rss_mb=peak_rss_mb(), cpu_s=time.process_time() - self.cpu0,
                 worker_cpu_s=self.worker_cpu_s,
                 aggregate_tok_s=self.generated_tokens / wall_s if wall_s else float("nan"),
                 failed_requests=self.failed, skipped_requests=self.skipped,
                 latency_sample_requests=len(self.sample) + len(self.lat_sample))
        return m
