"""The journal of a batch job: every finished request's output record, appended as it finishes.

It lives beside the output (``OUT.journal``). Each record is one line, ``CRC32 JSON\\n``: the
newline delimits it and the checksum tells a torn or corrupted line, which is dropped (its
request is simply computed again). Records are handed to the OS in groups of WRITE_RECORDS (or
WRITE_SECONDS after the first), so killing the process loses at most one group, and fsync'd
every SYNC_SECONDS, so a machine that goes down loses at most that much work (an fsync per group
cost a fast model a tenth of its time on a busy disk). The first record is a header with the
job's settings (model identity, sampling defaults, context, adapters): a rerun with other
settings is refused rather than mixing outputs of two setups in one file.

A request is known by its key, a hash of its id and its input line, so a rerun skips exactly the
lines that are unchanged and recomputes an edited one. Finding a key among millions must not hold
them all in memory: the keys and their records' offsets go to an index on disk (sqlite, a cache
rebuilt from the journal each time a job opens it; never trusted across runs).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import time
import zlib
from pathlib import Path
from typing import Any

from infeng.errors import InfengError
from infeng.jobs.atomic import fsync_dir

FORMAT = "infeng.journal/2"     # /2: results keep the output's JSON ("o"); /1 (an object, "r") still read
READS = ("infeng.journal/1", FORMAT)
WRITE_RECORDS = 64       # records handed to the OS together ...
WRITE_SECONDS = 0.25     # ... or this long after the oldest of them
SYNC_SECONDS = 1.0       # fsync this long after the oldest record not yet on disk


def line_key(lineno: int, line: str) -> bytes:
    """Identity of a request: its id (the id or custom_id the line gives, as the batch reader
    takes it, else its line number) and a hash of the exact text of its line."""
    key = f"line-{lineno}"
    try:
        d = json.loads(line)
    except ValueError:
        d = None
    if isinstance(d, dict):
        v = d.get("custom_id") if ("custom_id" in d or "body" in d) else d.get("id")
        if isinstance(v, (str, int)) and not isinstance(v, bool):
            key = str(v)
    return hashlib.blake2b(f"{key}\0{line}".encode(), digest_size=16).digest()


def encode(obj: dict[str, Any]) -> bytes:
    payload = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def encode_result(k: bytes, record: dict[str, Any]) -> bytes:
    """A result's journal line. Its record is kept in the output's own JSON form (field "o"), so
    the output is assembled by slicing it out, not by parsing and re-serializing it; whoever
    produced the record encodes it (a Ray worker, not the driver)."""
    payload = b'{"k":"%s","o":%s}' % (k.hex().encode(), json.dumps(record, ensure_ascii=False).encode())
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


OUT_AT = len('{"k":"') + 32 + len('","o":')      # where the output record starts in the payload


def decode(line: bytes) -> dict[str, Any] | None:
    """The record of one complete journal line, or None when it is torn or corrupted."""
    if len(line) < 10 or line[8:9] != b" " or not line.endswith(b"\n"):
        return None
    payload = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
        obj = json.loads(payload)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _torn_header(fragment: bytes) -> bool:
    """Is this unterminated first line the start of a header (a crash while creating it)?"""
    start = b'{"journal":'
    body = fragment[9:]
    return all(c in b"0123456789abcdef" for c in fragment[:8]) and fragment[8:9] in (b"", b" ") and \
        (start.startswith(body) or body.startswith(start))


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + ".journal")


class Journal:
    """Open (or resume) the journal of ``output``; ``settings`` must match a resumed journal's.

    ``seed`` is the job's default seed (None: the resumed journal's, else a fresh one), so a
    resumed job samples unseeded requests exactly as the interrupted run would have."""

    def __init__(self, output: Path, settings: dict[str, Any], seed: int | None = None, restart: bool = False):
        self.path = journal_path(output)
        self._index_path = output.with_name(f".{output.name}.journal-index")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise InfengError(f"{self.path}: another infeng run is writing {output.name} right now") from None
        try:
            self._open_index()
            if restart:
                os.ftruncate(self.fd, 0)
            self.resumed = 0            # results found in the journal
            self.dropped = 0            # torn or corrupted lines skipped
            header, end = self._scan()
            os.ftruncate(self.fd, end)  # cut a torn tail so appends start on a line boundary
            self.end = end
            self._buf: list[bytes] = []
            self._buffered = 0
            self._t_unwritten: float | None = None
            self._t_unsynced: float | None = None
            if header is None:
                self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
                self.settings = dict(settings)
                self._append_raw(encode({"journal": FORMAT, "settings": settings, "seed": self.seed}))
                self.sync()
                fsync_dir(self.path.parent)
            else:
                self._check(header, settings, seed)
                self.seed = header["seed"]
        except BaseException:
            self.close()
            raise

    # ---- reading what a previous run left --------------------------------------------------
    def _open_index(self) -> None:
        self._index_path.unlink(missing_ok=True)
        self.db = sqlite3.connect(self._index_path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE idx (k BLOB PRIMARY KEY, off INTEGER, len INTEGER) WITHOUT ROWID")
        self.db.execute("BEGIN")

    def _scan(self) -> tuple[dict[str, Any] | None, int]:
        """Index every intact result; return the header and the end of the last whole line."""
        header, off, end = None, 0, 0
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    if off == 0 and not _torn_header(line):
                        raise InfengError(f"{self.path}: not an infeng journal (give --restart to replace it)")
                    self.dropped += off > 0               # torn last line: cut below
                    break
                rec = decode(line)
                if off == 0:
                    if rec is None or rec.get("journal") not in READS:
                        raise InfengError(f"{self.path}: not an infeng journal (give --restart to replace it)")
                    header = rec
                elif rec is None or not isinstance(rec.get("k"), str):
                    self.dropped += 1
                else:
                    self._index(bytes.fromhex(rec["k"]), off, len(line))
                    self.resumed += 1
                off += len(line)
                end = off
        return header, end

    def _check(self, header: dict[str, Any], settings: dict[str, Any], seed: int | None) -> None:
        old = header.get("settings", {})
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if seed is not None and seed != header.get("seed"):
            differ.append("seed")
        if differ:
            raise InfengError(f"{self.path}: was written by a run with other {', '.join(differ)}; rerun with "
                              f"those settings to continue it, or give --restart to start over")

    def _index(self, k: bytes, off: int, length: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO idx VALUES (?, ?, ?)", (k, off, length))

    # ---- the job's side ---------------------------------------------------------------------
    def done(self, k: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM idx WHERE k=?", (k,)).fetchone() is not None

    def append(self, k: bytes, record: dict[str, Any]) -> None:
        """Journal a finished request (written with its group, on disk at the next sync)."""
        self.append_lines([(k, encode_result(k, record))])

    def append_lines(self, lines: list[tuple[bytes, bytes]]) -> None:
        """Journal finished requests already encoded (``encode_result``), in one index insert."""
        rows = []
        for k, line in lines:
            rows.append((k, self.end + self._buffered, len(line)))
            self._append_raw(line)
        self.db.executemany("INSERT OR REPLACE INTO idx VALUES (?, ?, ?)", rows)
        if len(self._buf) >= WRITE_RECORDS:
            self._write()

    def tick(self) -> None:
        """Write a group that has waited WRITE_SECONDS, fsync after SYNC_SECONDS (call often)."""
        now = time.monotonic()
        if self._t_unsynced is not None and now - self._t_unsynced >= SYNC_SECONDS:
            self.sync()
        elif self._t_unwritten is not None and now - self._t_unwritten >= WRITE_SECONDS:
            self._write()

    def _append_raw(self, line: bytes) -> None:
        if self._t_unwritten is None:
            self._t_unwritten = time.monotonic()
        self._buf.append(line)
        self._buffered += len(line)

    def _write(self) -> None:
        """Hand the buffered group to the OS in one write (the process may die after this)."""
        if not self._buf:
            return
        data = b"".join(self._buf)
        os.lseek(self.fd, self.end, os.SEEK_SET)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.end += len(data)
        self._buf.clear()
        self._buffered = 0
        self._t_unwritten = None
        if self._t_unsynced is None:
            self._t_unsynced = time.monotonic()

    def sync(self) -> None:
        """Everything appended so far on disk (and in the index)."""
        self._write()
        os.fsync(self.fd)
        self._t_unsynced = None
        self.db.execute("COMMIT")
        self.db.execute("BEGIN")

    def record(self, k: bytes) -> bytes | None:
        """The output line (JSON + newline) journaled for ``k``, or None. Call after sync()."""
        row = self.db.execute("SELECT off, len FROM idx WHERE k=?", (k,)).fetchone()
        if row is None:
            return None
        line = os.pread(self.fd, row[1], row[0])
        payload = line[9:-1]
        if payload[OUT_AT - 4:OUT_AT] == b'"o":' and line[8:9] == b" " and line.endswith(b"\n") \
                and line[:8] == b"%08x" % zlib.crc32(payload):
            return payload[OUT_AT:-1] + b"\n"
        rec = decode(line)           # a journal of an older infeng: the record as an object
        if rec is None or "r" not in rec:
            raise InfengError(f"{self.path}: record at byte {row[0]} changed on disk during the job")
        return json.dumps(rec["r"], ensure_ascii=False).encode() + b"\n"

    def close(self) -> None:
        """Sync what is buffered (whole records: always safe to keep) and release the journal."""
        if self.fd >= 0 and getattr(self, "_buf", None):
            self.sync()
        if getattr(self, "db", None) is not None:
            self.db.close()
            self.db = None
            self._index_path.unlink(missing_ok=True)
        if self.fd >= 0:
            os.close(self.fd)       # releases the lock
            self.fd = -1

    def remove(self) -> None:
        """The job is complete and its output in place: the journal has served."""
        self.close()
        self.path.unlink(missing_ok=True)
