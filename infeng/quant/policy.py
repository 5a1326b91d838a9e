"""Quantize a whole model: a type per tensor from ``--type`` and an optional policy YAML.

Policy file (all keys optional)::

    fallback: f16            # for matrices whose rows are not a multiple of 32 (default bf16)
    tensors:                 # native tensor name patterns (fnmatch), first match wins
      tok_embeddings: bf16
      output: bf16
      "layers.*.w_down": q8_0

Types: ``f32``, ``bf16``, ``f16``, ``q8_0``, ``q4_0``, ``q5_0``, ``q4_1``, ``q5_1``, ``q4_k``, ``fp8``. Norms always stay f32. A
tensor whose row length is not a multiple of its type's block (32; 256 for q4_k) cannot be stored
in that type: a q4_k tensor whose rows are a multiple of 32 falls back to q5_0 (as llama.cpp's
Q4_K_M stores such rows: the 32-block type one size class up, 5.5 bits/weight — on stories260K,
rows of 64, q4_0 there gave mean KLD 0.066 against llama.cpp Q4_K_M's 0.015), anything
else to the policy's ``fallback`` type (e.g. stories260K's w_down, K = 172); the summary reports
every fallback. Under a 4-bit ``--type`` the output head (the embedding table when it is tied)
is stored q8_0 unless a rule names it (``HEAD_TYPE``). The source must not be quantized already (re-quantizing compounds
the rounding): convert from f32/bf16/f16.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from infeng import format as native
from infeng.errors import InfengError
from infeng.format.schema import convert_dtype, is_norm
from infeng.quant import QTYPES, quantize, to_f32

Tensors = dict[str, tuple[str, np.ndarray]]   # native name → (dtype label, storage array)

TYPES = ("f32", "bf16", "f16") + QTYPES
FALLBACKS = ("f32", "bf16", "f16")
BITS = {"f32": 32.0, "bf16": 16.0, "f16": 16.0, "q8_0": 34 * 8 / 32, "q4_0": 18 * 8 / 32,
        "q5_0": 22 * 8 / 32, "q4_k": 144 * 8 / 256, "fp8": 34 * 8 / 32,
        "q4_1": 20 * 8 / 32, "q5_1": 24 * 8 / 32, "q6_k": 210 * 8 / 256}
# A block type whose block does not divide a tensor's rows tries these next (then the policy's
# fallback).
BLOCK_FALLBACK = {"q4_k": "q5_0", "q6_k": "q8_0"}   # q6_k: as llama.cpp's Q6_K files
# The output head under a 4-bit --type, unless a policy rule names it: its rounding error reaches
# the logits directly and it is ~6% of a 1B model's weights. llama.cpp's Q4_0/Q4_K_M files keep it
# in Q6_K (Q8_0 where rows are not a multiple of 256); measured on stories260K, an int4 head alone
# took q4_0's mean KLD from 0.066 to 0.10. llama.cpp's Q5_0 files keep it in Q6_K too.
HEAD_TYPE = {"q4_0": "q8_0", "q5_0": "q8_0", "q4_k": "q8_0", "q4_1": "q8_0", "q5_1": "q8_0"}


def fits(dtype: str, shape) -> bool:
    """Can a tensor of this logical shape be stored as dtype (block types: 2-D, rows a multiple
    of the block)?"""
    if dtype not in QTYPES:
        return True
    return len(shape) == 2 and shape[-1] % native.BLOCKS[dtype][0] == 0


@dataclass
class Policy:
    rules: list[tuple[str, str]] = field(default_factory=list)   # (pattern, type), in file order
    fallback: str = "bf16"
    source: str = ""


def check_type(t: Any, where: str, allowed=TYPES) -> str:
    if not isinstance(t, str) or t not in allowed:
        raise InfengError(f"{where}: unknown type {t!r} (one of {', '.join(allowed)})")
    return t


def load_policy(path: str | Path) -> Policy:
    p = Path(path)
    if not p.is_file():
        raise InfengError(f"{p}: no such policy file")
    try:
        doc = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InfengError(f"{p}: not valid YAML ({first})") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise InfengError(f"{p}: a policy is a mapping with keys 'tensors' and 'fallback'")
    unknown = set(doc) - {"tensors", "fallback"}
    if unknown:
        raise InfengError(f"{p}: unknown policy key(s) {', '.join(sorted(map(str, unknown)))} (expected tensors, fallback)")
    pol = Policy(source=str(p))
    if "fallback" in doc:
        pol.fallback = check_type(doc["fallback"], f"{p}: fallback", FALLBACKS)
    rules = doc.get("tensors") or {}
    if not isinstance(rules, dict):
        raise InfengError(f"{p}: 'tensors' must map name patterns to types")
    for pat, t in rules.items():
        if not isinstance(pat, str) or not pat:
            raise InfengError(f"{p}: tensor pattern {pat!r} is not a string")
        pol.rules.append((pat, check_type(t, f"{p}: tensors.{pat}")))
    return pol


@dataclass
class Item:
    name: str
    shape: tuple[int, ...]
    src: str
    want: str        # type asked for (by --type or a rule)
    dtype: str       # type stored
    rule: str        # "--type", "pattern ...", "norm"
    fallback: bool = False


def plan(tensors: Tensors, qtype: str, policy: Policy | None = None, source: str = "model") -> list[Item]:
    """The stored type of every tensor, before any work is done (so bad input writes nothing)."""
    check_type(qtype, "--type")
    policy = policy or Policy()
    already = sorted({d for d, _ in tensors.values() if d in QTYPES})
    if already:
        raise InfengError(f"{source}: already quantized ({', '.join(already)}); quantize from an f32/bf16/f16 model")
    names = [n for n in tensors if not is_norm(n)]
    for pat, _ in policy.rules:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise InfengError(f"{policy.source}: pattern {pat!r} matches no tensor of the model "
                              f"(names look like {names[0]!r}, 'layers.*.w_down')")
    items = []
    head = "output" if "output" in tensors else "tok_embeddings"       # tied: the table is the head
    for name, (src, arr) in tensors.items():
        shape = native.logical_shape(src, arr.shape)
        if is_norm(name):
            items.append(Item(name, shape, src, "f32", "f32", "norm"))
            continue
        want, rule = qtype, "--type"
        if name == head and qtype in HEAD_TYPE:
            want, rule = HEAD_TYPE[qtype], "output head"
        for pat, t in policy.rules:
            if fnmatch.fnmatchcase(name, pat):
                want, rule = t, f"pattern {pat}"
                break
        dtype, fb = want, False
        while not fits(dtype, shape):
            dtype, fb = BLOCK_FALLBACK.get(dtype, policy.fallback), True
        items.append(Item(name, shape, src, want, dtype, rule, fb))
    return items


def quantize_tensors(tensors: Tensors, items: list[Item],
                     progress: Callable[[str, int], None] | None = None,
                     importance: dict[str, np.ndarray] | None = None) -> Tensors:
    """The tensors stored as ``items`` say (numpy reference quantizers). ``importance``: optional
    per-input-column weights by tensor name (e.g. from calibration), used by the quantizers
    that accept them (``infeng.quant.WEIGHTED``)."""
    out: Tensors = {}
    for it in items:
        src, arr = tensors[it.name]
        if it.dtype == it.src:
            out[it.name] = (src, arr)
        elif it.dtype in QTYPES:
            imp = importance.get(it.name) if importance else None
            out[it.name] = (it.dtype, quantize(np.asarray(to_f32(arr, src), np.float32), it.dtype, weights=imp))
        else:
            out[it.name] = (it.dtype, convert_dtype(to_f32(arr, src), "f32", it.dtype))
        if progress:
            progress(it.name, int(np.prod(it.shape)))
    return out


def summary(items: list[Item]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-type rows (tensors, params, fallbacks) and totals (bits per weight over all tensors
    and over the quantizable matrices)."""
    rows: dict[str, dict[str, Any]] = {}
    params = bits = mparams = mbits = 0.0
    for it in items:
        n = float(np.prod(it.shape))
        r = rows.setdefault(it.dtype, {"type": it.dtype, "tensors": 0, "params": 0, "fallbacks": 0})
        r["tensors"] += 1
        r["params"] += int(n)
        r["fallbacks"] += int(it.fallback)
        params += n
        bits += n * BITS[it.dtype]
        if it.rule != "norm":
            mparams += n
            mbits += n * BITS[it.dtype]
    return list(rows.values()), {"bits_per_weight": bits / params if params else 0.0,
                                 "bits_per_weight_matrices": mbits / mparams if mparams else 0.0}
