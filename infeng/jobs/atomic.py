"""A batch output that appears whole or not at all, and stays once it has: streamed line by line
into telemetry.atomic_path's temporary name, fsync'd before the rename and the directory after
it, since the job deletes its journal (the only other copy of the results) right after.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from infeng.telemetry import atomic_path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file; on a clean exit it replaces ``path``, on an exception it is removed."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(Path(path).parent)
