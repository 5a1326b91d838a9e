"""Run untrusted Python (model-written code + its tests) in a separate, limited process.

What is enforced, per program:

* a separate process: ``python -I -S -B`` (isolated mode: no PYTHONPATH, no site-packages, so not
  the editable install of this repository either, no
  current directory on sys.path), started in a fresh temporary directory that is deleted
  afterwards, with a minimal environment (no PYTHONPATH, HOME = the temp dir);
* CPU time: ``RLIMIT_CPU`` (the kernel sends SIGXCPU/SIGKILL), and wall time: the parent kills
  the whole process group when the timeout passes (a program that sleeps uses no CPU);
* memory: ``RLIMIT_AS`` (allocations beyond it fail with MemoryError); file size written:
  ``RLIMIT_FSIZE``; no core dumps; output captured to files and only a bounded tail read;
* no network: when unprivileged user + network namespaces work on this machine
  (``unshare -rn``), the program runs in an empty network namespace (only a down loopback);
  in every case a prelude replaces ``socket.socket``/``create_connection``/``getaddrinfo`` with
  functions that raise, and removes ``os.system``, ``os.fork``, ``os.kill``, ``subprocess.Popen``
  and file-deleting functions (as OpenAI's human-eval ``reliability_guard`` does).

What is NOT enforced: the prelude is Python-level and can be undone by code that means to (e.g.
``import _socket``); without the namespace the network is reachable through such a route. The
file system is not hidden: the program runs as this user and can read what this user can read
(the repository is not on its path or its working directory, but absolute paths work). No
seccomp filter, no chroot, no process-count limit (RLIMIT_NPROC counts every process of the
user and root ignores it; children are killed with the process group when the program ends). This is a guard against model mistakes, not against an adversary;
run untrusted evaluations inside a container or VM for that.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

PRELUDE = r'''
def _infeng_guard():
    import builtins, os, shutil, socket, subprocess
    def _blocked(*a, **k):
        raise PermissionError("blocked by the infeng eval sandbox")
    class _NoSocket:
        def __init__(self, *a, **k):
            raise PermissionError("network access is blocked by the infeng eval sandbox")
    socket.socket = _NoSocket
    for n in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "socketpair", "fromfd"):
        setattr(socket, n, _blocked)
    for n in ("system", "fork", "forkpty", "kill", "killpg", "putenv", "remove", "unlink", "removedirs",
              "rmdir", "rename", "renames", "replace", "truncate", "setuid", "chmod", "chown", "execv",
              "execve", "execvp", "spawnv", "spawnve", "popen"):
        if hasattr(os, n):
            setattr(os, n, _blocked)
    shutil.rmtree = shutil.move = shutil.chown = _blocked
    subprocess.Popen = _blocked
_infeng_guard()
del _infeng_guard
'''

OUTPUT_TAIL = 4096


@dataclass
class Limits:
    timeout_s: float = 10.0        # wall clock; CPU limit = ceil(timeout_s)
    memory_mb: int = 1024          # address space
    file_mb: int = 16              # largest file the program may write


@dataclass
class Outcome:
    passed: bool
    status: str      # passed | failed | timeout | memory | error
    detail: str = ""
    seconds: float = 0.0


_UNSHARE: list[str] | None = None


def net_isolation() -> list[str]:
    """The command prefix that gives the program an empty network namespace, or [] if this
    machine does not allow it (probed once)."""
    global _UNSHARE
    if _UNSHARE is None:
        _UNSHARE = []
        exe = shutil.which("unshare")
        if exe:
            try:
                r = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10)
                if r.returncode == 0:
                    _UNSHARE = [exe, "-rn", "--"]
            except (OSError, subprocess.SubprocessError):
                pass
    return _UNSHARE


def _limiter(lim: Limits) -> Callable[[], None]:
    cpu = max(1, int(-(-lim.timeout_s // 1)))
    mem = lim.memory_mb * 2**20
    fsz = lim.file_mb * 2**20

    def apply():   # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsz, fsz))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_program(code: str, limits: Limits | None = None) -> Outcome:
    """Run ``code`` (after the guard prelude) in a sandboxed ``python -I``; passed = exit 0."""
    lim = limits or Limits()
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="infeng-eval-")
    try:
        prog = os.path.join(tmp, "program.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(PRELUDE + "\n" + code + "\n")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = net_isolation() + [sys.executable, "-I", "-S", "-B", prog]   # -S: no site-packages (nor the repo)
        with open(os.path.join(tmp, "out"), "wb") as out:
            try:
                p = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, preexec_fn=_limiter(lim), start_new_session=True)
            except OSError as e:
                return Outcome(False, "error", f"cannot start: {e}", time.perf_counter() - t0)
            try:
                rc = p.wait(timeout=lim.timeout_s + 1.0)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(p.pid, signal.SIGKILL)   # the whole group, whatever it spawned
                except (ProcessLookupError, PermissionError):
                    pass
                p.wait()
            rc = p.returncode
        with open(os.path.join(tmp, "out"), "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - OUTPUT_TAIL))
            tail = f.read().decode("utf-8", "replace")
        dt = time.perf_counter() - t0
        if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL):
            return Outcome(False, "timeout", f"killed after {dt:.1f} s (limit {lim.timeout_s} s)", dt)
        if rc == 0:
            return Outcome(True, "passed", "", dt)
        if "MemoryError" in tail:
            return Outcome(False, "memory", f"memory limit {lim.memory_mb} MB", dt)
        last = [ln for ln in tail.strip().splitlines() if ln.strip()]
        return Outcome(False, "failed", last[-1][:300] if last else f"exit code {rc}", dt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_many(codes: list[str], limits: Limits | None = None, workers: int | None = None,
             on_done: Callable[[], None] | None = None) -> list[Outcome]:
    """Run programs in parallel (each in its own sandboxed process), results in input order."""
    workers = workers or max(1, min(len(os.sched_getaffinity(0)), 8))

    def one(c):
        o = run_program(c, limits)
        if on_done:
            on_done()
        return o
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(one, codes))
