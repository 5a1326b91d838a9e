"""Native file format: round trip, and every kind of corruption rejected with one clear line."""
import json
import re
import struct

import numpy as np
import pytest

from infeng import format as native
from infeng.errors import InfengError

from conftest import patch_manifest


def _write(path, tensors=None):
    tensors = tensors or [
        native.Tensor("a", "f32", (3, 5), np.arange(15, dtype=np.float32).reshape(3, 5)),
        native.Tensor("b", "bf16", (7,), np.arange(7, dtype=np.uint16)),
        native.Tensor("c", "f16", (2, 2), np.ones((2, 2), np.float16)),
    ]
    native.write(path, {"kind": "test", "config": {"x": 1}, "note": "room for edits" * 4}, tensors)
    return tensors


def test_round_trip_is_aligned_and_zero_copy(tmp_path):
    p = tmp_path / "m.infeng"
    ts = _write(p)
    f = native.NativeFile(p)
    assert f.manifest["version"] == native.VERSION and f.manifest["config"] == {"x": 1}
    for t in ts:
        a = f.tensors[t.name]
        np.testing.assert_array_equal(a, t.data)
        assert f.dtypes[t.name] == t.dtype
        assert not a.flags.writeable and not a.flags.owndata      # a view of the mapping
        assert a.ctypes.data % native.ALIGN == 0
    assert [x.name for x in tmp_path.iterdir()] == ["m.infeng"]   # no temporary left


def _header(p):
    raw = bytearray(p.read_bytes())
    _, _, _, mlen = native.HEADER.unpack_from(raw, 0)
    man = json.loads(raw[24:24 + mlen])
    return raw, man, mlen


def _rewrite_manifest(p, mutate):
    patch_manifest(p, p, mutate)


@pytest.mark.parametrize("case,message", [
    ("magic", "bad magic"),
    ("version", "format version 99 is not supported"),
    ("short", "not an infeng file (only 5 bytes)"),
    ("manifest_len", "manifest length"),
    ("offset", "runs past the end of the file"),
    ("length", "does not match shape"),
    ("misaligned", "is not 64-byte aligned"),
    ("checksum", "checksum mismatch"),
    ("truncated", "runs past the end of the file"),
    ("json", "manifest is not valid JSON"),
])
def test_corrupt_file_is_rejected(tmp_path, case, message):
    p = tmp_path / "m.infeng"
    _write(p)
    raw = bytearray(p.read_bytes())
    if case == "magic":
        raw[0:6] = b"GGUF\0\0"
    elif case == "version":
        struct.pack_into("<I", raw, 8, 99)
    elif case == "short":
        raw = raw[:5]
    elif case == "manifest_len":
        struct.pack_into("<Q", raw, 16, len(raw) * 2)
    elif case == "json":
        raw[24] = ord("#")
    elif case == "truncated":
        raw = raw[:-10]
    if case in ("magic", "version", "short", "manifest_len", "json", "truncated"):
        p.write_bytes(bytes(raw))
    elif case == "offset":
        _rewrite_manifest(p, lambda m: m["tensors"][1].update(offset=1 << 40))
    elif case == "length":
        _rewrite_manifest(p, lambda m: m["tensors"][0].update(nbytes=4))
    elif case == "misaligned":
        _rewrite_manifest(p, lambda m: m["tensors"][1].update(offset=m["tensors"][1]["offset"] + 2))
    elif case == "checksum":
        _, man, mlen = _header(p)
        start = native.align(24 + mlen)
        raw = bytearray(p.read_bytes())
        raw[start + man["tensors"][0]["offset"]] ^= 0xFF
        p.write_bytes(bytes(raw))
    with pytest.raises(InfengError, match=re.escape(message)) as e:
        native.NativeFile(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(InfengError, match="no such file"):
        native.NativeFile(tmp_path / "nope.infeng")


def test_failed_write_leaves_nothing(tmp_path):
    p = tmp_path / "m.infeng"
    bad = native.Tensor("a", "f32", (4,), np.zeros(3, np.float32))   # wrong length
    with pytest.raises(InfengError, match="bytes of data"):
        native.write(p, {}, [bad])
    assert list(tmp_path.iterdir()) == []
