"""The C kernel library, one build per ISA, chosen once at import.

Each variant is scored by what it needs from the CPU (ggml's idea): the best variant whose
requirements the CPU meets wins. ``INFENG_ISA=scalar|avx2|avx512`` forces one and fails
clearly when the CPU cannot run it. ``INFENG_BF16_ACT=f32|bf16`` chooses how bf16 weight
matrices multiply their inputs (``bf16_activations``). ``INFENG_PREFETCH=l1|l2`` overrides which
cache the decode GEMVs prefetch weights into (the library picks per CPU: ``prefetch_level``).
"""
from __future__ import annotations

import importlib
import os

from infeng.errors import InfengError

ISAS = ("scalar", "avx2", "avx512")  # in increasing order of preference
REQUIRES = {
    "scalar": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
               "avx512bf16", "avx512vnni"),
}


def _module(isa: str):
    try:
        return importlib.import_module(f"infeng.kernels._infeng_{isa}")
    except ImportError as e:  # pragma: no cover - only on a broken install
        raise InfengError(f"kernel library for {isa} is not built ({e}); run `pip install -e .`") from e


def cpu_features() -> dict[str, bool]:
    m = _module("scalar")
    c = m.ffi.new("struct ifg_cpu *")
    m.lib.ifg_cpu_detect(c)
    return {name: bool(getattr(c, name)) for name, _ in m.ffi.typeof(c[0]).fields}


def supported_isas() -> list[str]:
    feats = cpu_features()
    return [isa for isa in ISAS if all(feats[f] for f in REQUIRES[isa])]


def _choose(forced: str | None) -> str:
    ok = supported_isas()
    if forced:
        if forced not in ISAS:
            raise InfengError(f"INFENG_ISA={forced!r} is not one of {', '.join(ISAS)}")
        if forced not in ok:
            missing = [f for f in REQUIRES[forced] if not cpu_features()[f]]
            raise InfengError(f"INFENG_ISA={forced} needs CPU features this machine lacks: {', '.join(missing)}")
        return forced
    return ok[-1]


def load(isa: str | None = None):
    """The cffi module (``.ffi``, ``.lib``) of one variant: the forced or the best one."""
    mod = _module(_choose(isa or os.environ.get("INFENG_ISA") or None))
    prefetch_level(mod, os.environ.get("INFENG_PREFETCH") or None)
    return mod


PREFETCH = {"l1": 1, "l2": 2}


def prefetch_level(mod, choice: str | None = None) -> str:
    """Which cache ``mod``'s decode GEMVs prefetch weights into: ``choice`` ("l1" or "l2") sets it,
    None leaves the library's per-CPU default. Returns the level in force."""
    if choice is not None:
        if choice not in PREFETCH:
            raise InfengError(f"INFENG_PREFETCH={choice!r} is not one of {', '.join(PREFETCH)}")
        mod.lib.ifg_set_prefetch_level(PREFETCH[choice])
    return {v: k for k, v in PREFETCH.items()}[mod.lib.ifg_prefetch_level()]


_active = None


def active():
    """The variant chosen for this process (cached)."""
    global _active
    if _active is None:
        _active = load()
    return _active


BF16_ACT = ("f32", "bf16")


def bf16_activations(choice: str | None = None) -> str:
    """How bf16 matrices take their input: "f32" (exact products, the default) or "bf16" (the
    input rounded to bf16 too: vdpbf16ps on AVX-512 BF16, about twice the batch and prefill
    speed; docs/kernels.md has its KLD). ``choice`` or else ``INFENG_BF16_ACT``."""
    v = choice or os.environ.get("INFENG_BF16_ACT") or "f32"
    if v not in BF16_ACT:
        raise InfengError(f"INFENG_BF16_ACT={v!r} is not one of {', '.join(BF16_ACT)}")
    return v


def ptr(mod, arr, ctype: str = "float *"):
    """A C pointer to a numpy array's buffer (no copy; read-only buffers are accepted)."""
    return mod.ffi.cast(ctype, mod.ffi.from_buffer(arr))


def default_threads() -> int:
    """Physical cores available to this process (hyperthreads share the FMA units)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        n = os.cpu_count() or 1
    try:
        siblings = open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read().strip()
        per_core = len([x for part in siblings.split(",") for x in
                        (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))])
        return max(1, n // max(per_core, 1))
    except (OSError, ValueError):
        return max(1, n)
