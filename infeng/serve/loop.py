"""The engine on a thread of its own; the asyncio side reaches it only through a thread-safe queue.

Commands (submit, cancel, a function to run against the engine) go into ``inbox``; the thread
runs them between steps, steps while the engine has work and sleeps on the queue when it has
none. Each step's events go back to the asyncio loop in one ``call_soon_threadsafe`` call, where
they are routed to the queue of the request they belong to. The Engine object is touched by this
thread alone.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from infeng.runtime.engine import Engine, FinishEvent, Request

log = logging.getLogger("infeng.serve")


class EngineLoop:
    def __init__(self, engine: Engine, aloop: asyncio.AbstractEventLoop, on_step: Callable[[Engine, float], None] | None = None):
        self.engine = engine
        self.aloop = aloop
        self.on_step = on_step             # called on the engine thread after each step (metrics)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.routes: dict[str, asyncio.Queue] = {}   # request id → its events (asyncio side only)
        self.failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="infeng-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failed is None

    def stop(self, timeout: float = 10.0) -> None:
        self.inbox.put(("stop",))
        self._thread.join(timeout)

    # ---- asyncio side -------------------------------------------------------------------------
    def submit(self, req: Request, q: asyncio.Queue) -> None:
        """Queue ``req``; its TokenEvents and FinishEvent arrive on ``q`` (several requests may
        share one queue: events carry their request's id)."""
        self.routes[req.id] = q
        self.inbox.put(("submit", req))

    def cancel(self, request_id: str) -> None:
        """End a request at the next step (its KV blocks are freed there); its FinishEvent still
        arrives, but nobody needs to wait for it."""
        self.inbox.put(("cancel", request_id))

    def forget(self, request_id: str) -> None:
        self.routes.pop(request_id, None)

    def call(self, fn: Callable[[Engine], Any]) -> "asyncio.Future":
        """Run ``fn(engine)`` on the engine thread between steps; await its result."""
        fut: Future = Future()
        self.inbox.put(("call", fn, fut))
        return asyncio.wrap_future(fut)

    def _deliver(self, events: list) -> None:
        for ev in events:
            q = self.routes.get(ev.id)
            if q is not None:
                q.put_nowait(ev)
                if isinstance(ev, FinishEvent):
                    del self.routes[ev.id]

    # ---- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        try:
            while True:
                try:
                    cmd = self.inbox.get() if not eng.busy else self.inbox.get_nowait()
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if cmd[0] == "stop":
                        return
                    self._do(cmd)
                    try:
                        cmd = self.inbox.get_nowait()
                    except queue.Empty:
                        cmd = None
                if eng.busy:
                    t0 = time.perf_counter()
                    events = eng.step()
                    if self.on_step is not None:
                        self.on_step(eng, time.perf_counter() - t0)
                    if events:
                        self.aloop.call_soon_threadsafe(self._deliver, events)
        except BaseException as e:   # the server answers 503 from here on; the cause is logged once
            self.failed = e
            log.exception("engine thread stopped")
            self.aloop.call_soon_threadsafe(self._fail_all)

    def _fail_all(self) -> None:
        """Wake every waiting request with None: the engine is gone (they answer 503)."""
        for q in self.routes.values():
            q.put_nowait(None)
        self.routes.clear()

    def _do(self, cmd) -> None:
        if cmd[0] == "submit":
            self.engine.submit(cmd[1])
        elif cmd[0] == "cancel":
            self.engine.cancel(cmd[1])
        elif cmd[0] == "call":
            _, fn, fut = cmd
            try:
                fut.set_result(fn(self.engine))
            except Exception as e:
                fut.set_exception(e)


async def on_own_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` (loading the engine) on a thread that ends when it returns. Loading runs OpenMP
    regions, and libgomp keeps the team of every thread that led one for as long as that thread
    lives; a pooled executor thread would keep its team, and with more OpenMP threads than CPUs
    libgomp spins only briefly at barriers before sleeping — the engine thread's team too, which
    then decodes ~20 % slower than `infeng generate` on an idle machine."""
    aloop = asyncio.get_running_loop()
    fut = aloop.create_future()

    def work():
        try:
            r, e = fn(), None
        except BaseException as err:
            r, e = None, err
        aloop.call_soon_threadsafe(lambda: fut.done() or (fut.set_exception(e) if e is not None else fut.set_result(r)))
    th = threading.Thread(target=work, name="infeng-load", daemon=True)
    th.start()
    out = await fut
    while th.is_alive():        # its OpenMP team is gone before the engine's first step
        await asyncio.sleep(0.001)
    return out
