"""Batch input, streamed: lines are read one at a time, never the whole file.

``--batch`` names one file or a glob pattern (several files, each with its own output in a
directory). Only local paths are read; object stores are refused by name (mount them).
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterator

from infeng.errors import InfengError

REMOTE = ("s3://", "gs://", "gcs://", "az://", "abfs://", "http://", "https://", "hdfs://")


def expand_inputs(pattern: str) -> list[Path]:
    """The input files ``pattern`` names, sorted; an error naming it when there are none."""
    if pattern.startswith(REMOTE):
        raise InfengError(f"--batch {pattern}: remote object stores are not read directly; mount the bucket "
                          f"(e.g. s3fs, mountpoint-s3) and give its local path")
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
        if not files:
            raise InfengError(f"--batch {pattern}: no file matches")
        return files
    p = Path(pattern)
    if not p.exists():
        raise InfengError(f"{p}: no such file")
    if not p.is_file():
        raise InfengError(f"{p}: not a file")
    return [p]


def plan_outputs(inputs: list[Path], output: Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs: one input may write to a file or into a directory; several
    inputs write ``DIR/<input name>`` each."""
    if len(inputs) > 1 or output.is_dir() or str(output).endswith("/"):
        if not output.is_dir():
            raise InfengError(f"--output {output}: must be an existing directory when --batch names several files")
        names = [p.name for p in inputs]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise InfengError(f"--batch: two input files are named {dup}; their outputs in {output} would collide")
        pairs = [(p, output / p.name) for p in inputs]
    else:
        if not output.parent.is_dir():
            raise InfengError(f"{output.parent}: no such directory (for {output.name})")
        pairs = [(inputs[0], output)]
    for src, dst in pairs:
        if dst.exists() and dst.resolve() == src.resolve():
            raise InfengError(f"--output {dst}: is the input file itself")
    return pairs


def iter_lines(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text, error) of every non-blank line, read one at a time; a line that is
    not UTF-8 comes with its error (it fails alone, as any other bad line)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InfengError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield n, raw.decode("utf-8").rstrip("\r\n"), None
            except UnicodeDecodeError as e:
                yield n, raw.decode("utf-8", "replace").rstrip("\r\n"), f"{path}:{n}: not UTF-8 text (byte {e.start + 1})"


def count_lines(path: Path) -> int:
    """Non-blank lines, for the progress bar's total (one streaming pass)."""
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())
