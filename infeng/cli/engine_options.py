"""Engine options several subcommands share: speculative decoding and the KV cache's types.

Each command declares them with these Option objects (one help text, one spelling) and turns
the values into Engine keywords with ``engine_kwargs``, so `generate`, `serve` and `chat` parse
and check them the same way.
"""
from __future__ import annotations

from pathlib import Path

import typer

from infeng.errors import InfengError
from infeng.model.loader import load_model
from infeng.runtime.kvspec import ROTATE_MODES, kv_options, parse_dtype
from infeng.runtime.speculate import SpecConfig, parse_speculate

SPECULATE = typer.Option(None, "--speculate", help="speculative decoding: lookup (prompt lookup), auto (adaptive; "
                                                   "the --draft model if given) or a draft length N")
DRAFT = typer.Option(None, "--draft", help="a draft model with the same tokenizer (e.g. a lower-bit copy) for "
                                           "--speculate auto|N")
KV_DTYPE = typer.Option("f32", "--kv-dtype", help="KV cache type: f32, bf16, f16, int8, fp8, int4, or k=TYPE,v=TYPE")
KV_POLICY = typer.Option(None, "--kv-policy", help="per-layer KV types, e.g. 'layers 0,1,-1: bf16'")
KV_ROTATE = typer.Option("auto", "--kv-rotate", help="Hadamard rotation: auto (int8/fp8/int4 keys and values, "
                                                     "power-of-two head_dim), on, keys (keys only), off")


def check_speculate(speculate: str | None, draft: Path | None) -> None:
    """What can be said before any model loads (so a bad option fails at once)."""
    if draft is not None and speculate is None:
        raise InfengError("--draft goes with --speculate auto|N")
    if draft is not None and not draft.exists():
        raise InfengError(f"{draft}: no such file or directory (--draft)")
    if speculate is not None:
        parse_speculate(speculate, _Placeholder() if draft is not None else None)


class _Placeholder:
    """Stands for the draft model while only the option's spelling is checked."""


def check_kv(kv_dtype: str, kv_rotate: str) -> None:
    """The KV options' spelling, before any model loads (--kv-policy needs the model's layers)."""
    parse_dtype(kv_dtype)
    if kv_rotate not in ROTATE_MODES:
        raise InfengError(f"--kv-rotate {kv_rotate!r}: must be one of {', '.join(ROTATE_MODES)}")


def speculation(speculate: str | None, draft: Path | None, verify: bool = True) -> SpecConfig | None:
    """The SpecConfig of ``--speculate``/``--draft`` (loading the draft model), or None."""
    check_speculate(speculate, draft)
    if speculate is None:
        return None
    return parse_speculate(speculate, load_model(draft, verify=verify) if draft is not None else None)


def engine_kwargs(speculate: str | None, draft: Path | None, kv_dtype: str, kv_policy: str | None,
                  kv_rotate: str, verify: bool = True) -> dict:
    """Engine keywords for these options: ``speculate`` (when given) and the kv_* ones."""
    check_kv(kv_dtype, kv_rotate)
    out = kv_options(kv_dtype, kv_policy, kv_rotate)
    spec = speculation(speculate, draft, verify)
    if spec is not None:
        out["speculate"] = spec
    return out
