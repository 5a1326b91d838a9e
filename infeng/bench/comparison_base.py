"""What every comparison kind of `infeng bench` shares: its parameters, checked against their
defaults' types, and the run that gives records and notes (the kinds: comparisons.py)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

from infeng.errors import InfengError

Log = Callable[[str], None]


class Comparison(ABC):
    name: str
    model_param = "base"                 # the parameter `--model` sets
    required: tuple[str, ...] = ()
    defaults: dict[str, Any] = {}
    may_be_zero: tuple[str, ...] = ()    # integers where 0 means something (seeds)

    def params(self, given: dict[str, Any], where: str, complete: bool = True) -> dict[str, Any]:
        """The defaults updated with ``given``, each checked against its default's type (and,
        when ``complete``, the required ones present)."""
        extra = sorted(set(given) - set(self.defaults) - set(self.required))
        if extra:
            raise InfengError(f"{where}: unknown key(s) {', '.join(extra)} for kind {self.name} "
                              f"(it takes {', '.join(sorted(set(self.defaults) | set(self.required)))})")
        missing = [k for k in self.required if given.get(k) is None]
        if missing and complete:
            raise InfengError(f"{where}: kind {self.name} needs {', '.join(missing)}")
        for k in self.required:
            if given.get(k) is not None and not isinstance(given[k], str):
                raise InfengError(f"{where}: `{k}` must be a path, got {given[k]!r}")
        p = {**self.defaults, **given}
        for k, d in self.defaults.items():
            v = p[k]
            # a YAML `true` is an int to Python: a bool only where the default is one
            if not isinstance(v, type(d)) or isinstance(v, bool) != isinstance(d, bool):
                raise InfengError(f"{where}: `{k}` must be {type(d).__name__}, got {v!r}")
            if isinstance(d, int) and not isinstance(d, bool) and v < (0 if k in self.may_be_zero else 1):
                raise InfengError(f"{where}: `{k}` must be >= {0 if k in self.may_be_zero else 1}, got {v}")
        return p

    @abstractmethod
    def run(self, p: dict[str, Any], log: Log) -> tuple[list[dict[str, Any]], list[str]]:
        """(records, notes)."""
        ...

    def metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        return {}


def positive_ints(v: list, key: str, where: str) -> list[int]:
    if not v or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        raise InfengError(f"{where}: `{key}` must be a list of positive integers, got {v!r}")
    return v


def non_negative(v: float, key: str, where: str) -> float:
    if not v >= 0:
        raise InfengError(f"{where}: `{key}` must be >= 0, got {v!r}")
    return v


def int_range(v, key: str, where: str) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            and 1 <= v[0] <= v[1]):
        raise InfengError(f"{where}: `{key}` must be [LOW, HIGH] with 1 <= LOW <= HIGH, got {v!r}")
    return v[0], v[1]


def adapter_dtype(p: dict[str, Any]) -> None:
    if p["adapter_dtype"] not in ("bf16", "f32", "int8"):
        raise InfengError(f"`adapter_dtype` {p['adapter_dtype']!r}: one of bf16, f32, int8")
