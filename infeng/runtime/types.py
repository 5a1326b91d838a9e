"""What goes into the Engine and what comes out: requests, results, stream events, step stats."""
from __future__ import annotations

from dataclasses import dataclass, field

from infeng.runtime.sampler import SamplingParams


@dataclass
class Request:
    id: str
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0                  # higher runs sooner
    deadline_s: float | None = None    # seconds after submission; then it ends with "deadline"
    adapter: str | None = None         # name of a loaded LoRA/DoRA adapter


@dataclass
class Result:
    id: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str      # length | stop | context | cancelled | rejected | deadline
    seed: int | None
    t_submit: float
    t_admit: float | None = None
    t_first: float | None = None
    t_done: float | None = None
    token_times: list[float] = field(default_factory=list)
    request: Request | None = field(default=None, repr=False)
    text: str = ""                     # the completion (stop string excluded)
    error: str | None = None           # why it was rejected
    cached_tokens: int = 0             # prompt tokens served from the prefix cache
    preemptions: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_submit

    @property
    def queue_s(self) -> float | None:
        return None if self.t_admit is None else self.t_admit - self.t_submit

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None


@dataclass
class TokenEvent:
    id: str
    token_id: int
    text: str          # the text this token completed ("" while held back)


@dataclass
class FinishEvent:
    id: str
    result: Result


@dataclass
class StepStats:
    steps: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0      # wall time of steps that carried prefill tokens
    decode_tokens: int = 0
    decode_s: float = 0.0       # wall time of decode-only steps
    c_s: float = 0.0            # time inside the C forward call
    step_s: float = 0.0         # whole-step wall time: packing, C call, sampling, bookkeeping
                                # (step_s - c_s is the Python-side overhead, sampling included)
    sampled: int = 0
    batch_tokens: int = 0       # sums over steps, for means
    running: int = 0            # sequences in the batch
    queued: int = 0             # requests waiting
    max_running: int = 0
    max_queued: int = 0
    max_kv_blocks: int = 0
    preemptions: int = 0
    rejected: int = 0
