"""The run's own yardsticks, timed beside every repeat of a scenario: read bandwidth and scalar
compute. They run the scalar kernel build, so forcing a vector ISA (``INFENG_ISA``) or breaking a
vector path moves the scenario's figure but not its probe: figure ÷ probe tracks the build, not
the machine (``baseline.py``).

Both sides of that ratio are taken in on-CPU time (``cpu_clock``): the time the work ran, not the
time the scheduler kept it waiting, which on a shared machine is most of the wall time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from infeng import kernels
from infeng.bench import micro

PROBE_MB = 64            # read-bandwidth buffer: well past the last-level cache
PROBE_SHAPE = "256x256"  # f32 weights of the compute probe (256 KiB: in L2)
PROBE_TOKENS = 16


def cpu_clock(threads: int):
    """On-CPU seconds of the work: this thread's when it runs alone (one kernel thread runs in the
    caller), the process's otherwise (the kernel's worker threads too)."""
    return time.thread_time if threads == 1 else time.process_time


@dataclass
class Probes:
    bandwidth: micro.Case
    compute: micro.Case
    clock: object

    def gb_s(self) -> float:
        return self.bandwidth.bytes / micro.time_both(self.bandwidth, self.clock, min_time=0.02)[1] / 1e9

    def gflop_s(self) -> float:
        return self.compute.flops / micro.time_both(self.compute, self.clock, min_time=0.02)[1] / 1e9


def make_probes(threads: int) -> Probes:
    scalar = kernels.load("scalar")
    return Probes(micro.bandwidth_case(scalar, PROBE_MB, threads),
                  micro.matmul_case(scalar, "f32", PROBE_SHAPE, PROBE_TOKENS, threads), cpu_clock(threads))
