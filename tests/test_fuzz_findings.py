"""Inputs the fuzzers (fuzz/, `make fuzz`) showed crashing a reader with something other than a
clear InfengError; each now gets one line. They run through the fuzz harnesses themselves, so
the harness contract (InfengError or success, nothing else) is what is checked."""
import json
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fuzz import harness  # noqa: E402

from conftest import patch_manifest  # noqa: E402

SEED = json.loads(harness.CONFIG_SEED)
MANIFEST_CONFIG = {"dim": 64, "hidden_dim": 172, "n_layers": 5, "n_heads": 8, "n_kv_heads": 4, "head_dim": 8,
                   "vocab_size": 512, "max_seq_len": 512, "norm_eps": 1e-5, "rope_theta": 1e4, "tie_embeddings": True}


def _st(header, data=b""):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("data", [
    json.dumps({**SEED, "rms_norm_eps": "x"}),                  # HF config: float('x') ValueError
    json.dumps({**SEED, "rope_theta": {}}),                     # TypeError
    json.dumps({**MANIFEST_CONFIG, "norm_eps": "x"}),           # manifest config: '>' on str
    json.dumps({**MANIFEST_CONFIG, "rope_theta": None}),
    json.dumps({**MANIFEST_CONFIG, "rope_scaling": {"rope_type": "linear"}}),   # KeyError 'factor' in inv_freq
    json.dumps({**MANIFEST_CONFIG, "bos_id": "a"}),
    '{"architectures":4}',                                      # atheris: 'int' object is not iterable
    '{"architectures":[[1]]}',                                  # unhashable in the architecture lookup
], ids=["hf-eps-str", "hf-theta-obj", "manifest-eps-str", "manifest-theta-null", "manifest-scaling-nofactor",
        "manifest-bos-str", "hf-architectures-int", "hf-architectures-list"])
def test_config_json(data):
    harness.config_json(data.encode())


@pytest.mark.parametrize("header", [
    {"a": {"dtype": "F32", "shape": [0, 10 ** 19], "data_offsets": [0, 0]}},       # numpy: dimension exceeded
    {"a": {"dtype": "F32", "shape": [0, 2 ** 40, 2 ** 40], "data_offsets": [0, 0]}},  # numpy: array is too big
    {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},              # reshape([True]) TypeError
])
def test_safetensors_shapes(header):
    harness.safetensors(_st(header, b"\0" * 4))


@pytest.mark.parametrize("case", ["empty-huge-shape", "bool-dim", "scaling-no-factor"])
def test_native_manifest(tmp_path, data_dir, case):
    from infeng.cli.main import main
    src = tmp_path / "s.infeng"
    assert main(["convert", str(data_dir / "stories260K"), "-o", str(src)]) == 0

    def mutate(m):
        if case == "empty-huge-shape":
            m["tensors"][0].update(shape=[0, 2 ** 40, 2 ** 40], nbytes=0)
        elif case == "bool-dim":
            m["tensors"][0]["shape"] = [True, 64]
        else:
            m["config"]["rope_scaling"] = {"rope_type": "linear"}
    bad = tmp_path / "bad.infeng"
    patch_manifest(src, bad, mutate)
    harness.native(bad.read_bytes())
