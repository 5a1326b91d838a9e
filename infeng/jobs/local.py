"""Requests of a batch file through one Engine, a bounded window at a time.

Only ``window`` requests are parsed and queued at once (the engine's admission limit), however
long the file: memory does not grow with it. Each result is journaled as it finishes; the
journal, not this loop, knows what is done.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from infeng.jobs.journal import Journal, encode_result, line_key
from infeng.jobs.reader import iter_lines
from infeng.jobs.stats import JobStats
from infeng.runtime.batch import BatchItem, parse_line, record
from infeng.runtime.engine import Engine
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.tokenizer import Tokenizer
from infeng.runtime.types import FinishEvent


@dataclass
class Todo:
    k: bytes                # journal key (id + line hash)
    item: BatchItem         # item.request is None for a line that failed to parse


@dataclass
class LineParser:
    """Turns input lines into requests as ``generate --batch`` reads them."""
    where: str
    defaults: SamplingParams
    tok: Tokenizer
    adapters: frozenset = frozenset()       # loaded adapter names (an OpenAI body's model may name one)
    default_adapter: str | None = None      # --adapter: for lines that name none

    def __call__(self, lineno: int, line: str, error: str | None = None, k: bytes | None = None) -> Todo:
        if error is not None:
            item = BatchItem(lineno, "infeng", f"line-{lineno}", error=error)
        else:
            item = parse_line(line, lineno, self.where, self.defaults, self.tok)
        req = item.request
        if req is not None and req.adapter is None:
            if self.default_adapter is not None:
                req.adapter = self.default_adapter
            elif item.kind != "infeng" and item.model in self.adapters:
                req.adapter = item.model
        return Todo(k if k is not None else line_key(lineno, line), item)


def pending(path: Path, parse: LineParser, journal: Journal, stats: JobStats,
            on_skip: Callable[[], None] = lambda: None) -> Iterator[Todo]:
    """The requests of ``path`` not yet in the journal, in input order, parsed one at a time."""
    for n, line, err in iter_lines(path):
        k = line_key(n, line)
        if journal.done(k):
            stats.skipped += 1
            on_skip()
            continue
        yield parse(n, line, err, k)


class Collect:
    """A sink that keeps the records (a Ray worker's shard, a Ray Data batch) instead of a journal;
    ``encoded``: as their journal lines (what the driver appends), else as dicts."""

    def __init__(self, encoded: bool = False) -> None:
        self.encoded = encoded
        self.records: list[tuple[bytes, Any]] = []

    def append(self, k: bytes, record: dict) -> None:
        self.records.append((k, encode_result(k, record) if self.encoded else record))

    def tick(self) -> None:
        pass


def run_local(engine: Engine, todo: Iterable[Todo], journal: Journal | Collect, stats: JobStats, model_name: str,
              window: int, on_done: Callable[[], None] = lambda: None) -> None:
    """Run ``todo`` through ``engine`` with at most ``window`` requests queued or running; each
    finished request's record goes to ``journal`` (or any sink with append and tick)."""
    todo = iter(todo)
    inflight: dict[int, Todo] = {}
    more = True
    while True:
        while more and len(inflight) < window:
            t = next(todo, None)
            if t is None:
                more = False
            elif t.item.request is None:            # a bad line: its error is its result
                journal.append(t.k, record(t.item, None, t.item.error, model_name))
                stats.failed += 1
                on_done()
            else:
                inflight[id(t.item.request)] = t
                engine.submit(t.item.request)
        if not engine.busy:
            if not more:
                break
            continue
        for ev in engine.step():
            if isinstance(ev, FinishEvent):
                r = ev.result
                t = inflight.pop(id(r.request))
                if r.finish_reason == "rejected":
                    journal.append(t.k, record(t.item, None, r.error, model_name))
                    stats.failed += 1
                else:
                    journal.append(t.k, record(t.item, r, None, model_name))
                    stats.add(r)
                on_done()
        journal.tick()
