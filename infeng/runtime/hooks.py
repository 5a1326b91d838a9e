"""Timing hooks: subscribers called at the edges of the engine's step phases.

    engine.hooks.subscribe(fn)     # fn(phase, edge, info): edge "begin" or "end"

Phases, in the order a step runs them: "step" (the whole step), "schedule" (admission and
preemption), "pack" (laying the batch into the forward buffers), "forward" (the C call; its end
carries info {"T", "n_out"}), "sample" (one sampler call per sequence). With no subscriber the
engine pays one truth test per phase.
"""
from __future__ import annotations

from typing import Callable

Subscriber = Callable[[str, str, dict], None]
PHASES = ("step", "schedule", "pack", "forward", "sample")
_EMPTY: dict = {}


class Hooks:
    def __init__(self):
        self.subscribers: list[Subscriber] = []

    def __bool__(self) -> bool:
        return bool(self.subscribers)

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn`` at every phase edge; returns the function that unsubscribes it."""
        self.subscribers.append(fn)
        return lambda: self.subscribers.remove(fn)

    def emit(self, phase: str, edge: str, info: dict = _EMPTY) -> None:
        for fn in self.subscribers:
            fn(phase, edge, info)
