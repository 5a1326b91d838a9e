"""HF folder reading: strict safetensors header checks and config refusals."""
import json
import shutil
import struct

import numpy as np
import pytest

from infeng.converters.hf import load_folder
from infeng.converters.safetensors_io import SafetensorsFile
from infeng.errors import InfengError
from infeng.converters.hf_config import from_hf


def _st(path, header: dict, data: bytes = b"", hlen=None):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if hlen is None else hlen) + blob + data)
    return path


def test_reads_valid_file(tmp_path):
    p = _st(tmp_path / "a.safetensors", {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}},
            np.arange(4, dtype=np.float32).tobytes())
    label, arr = SafetensorsFile(p).tensors["w"]
    assert label == "f32" and arr.tolist() == [[0, 1], [2, 3]]


@pytest.mark.parametrize("header,data,hlen,message", [
    ({}, b"", 1 << 50, "header length"),
    ({"x": {}}, b"", 3, "not valid JSON"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "past the end of the data"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, None, "12 expected"),
    ({"w": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16, None, "not supported"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "bad shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
])
def test_corrupt_safetensors_rejected(tmp_path, header, data, hlen, message):
    p = _st(tmp_path / "bad.safetensors", header, data, hlen)
    with pytest.raises(InfengError, match=message) as e:
        SafetensorsFile(p)
    assert str(p) in str(e.value)


def test_truncated_file(tmp_path):
    p = tmp_path / "t.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(InfengError, match="only 2 bytes"):
        SafetensorsFile(p)


BASE = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 172,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512}


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["Qwen2ForCausalLM"]}, "architecture Qwen2ForCausalLM is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"num_key_value_heads": 3}, "not a multiple of"),
    ({"hidden_size": None}, "hidden_size must be a positive integer"),
])
def test_config_refusals(change, message):
    with pytest.raises(InfengError, match=message):
        from_hf({**BASE, **change})


def test_config_missing_field():
    cfg = dict(BASE)
    del cfg["vocab_size"]
    with pytest.raises(InfengError, match="missing required field 'vocab_size'"):
        from_hf(cfg)


def test_llama3_rope_scaling_slows_long_wavelengths():
    big = {**BASE, "hidden_size": 512, "rope_theta": 500000.0}   # head_dim 64, Llama 3 theta
    c = from_hf({**big, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    plain = from_hf(big)
    a, b = c.inv_freq(), plain.inv_freq()
    assert a[0] == b[0]                       # highest frequency untouched
    assert a[-1] == pytest.approx(b[-1] / 8)  # lowest slowed by factor


def test_wrong_tensor_shape_names_the_tensor(tmp_path, data_dir):
    src = data_dir / "stories260K-f32"
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = 170
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InfengError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \[172, 64\], config says \[170, 64\]"):
        load_folder(dst)


def test_dtype_conversion_keeps_norms_f32(data_dir):
    cfg, tensors, _, _ = load_folder(data_dir / "stories260K-f32", dtype="bf16")
    assert tensors["layers.0.wq"][0] == "bf16" and tensors["layers.0.attn_norm"][0] == "f32"
    # f32 → bf16 by round-to-nearest-even equals the recorded bf16 checkpoint
    _, bf, _, _ = load_folder(data_dir / "stories260K")
    np.testing.assert_array_equal(tensors["layers.3.w_down"][1], bf["layers.3.w_down"][1])


def test_sharded_checkpoint_equals_single(tmp_path, data_dir):
    """model.safetensors.index.json + shards reads the same tensors as one file."""
    src = data_dir / "stories260K-f32"
    dst = tmp_path / "sharded"
    dst.mkdir()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    tensors = SafetensorsFile(src / "model.safetensors").tensors
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, part in shards.items():
        header, blobs, off = {}, [], 0
        for n in part:
            a = np.ascontiguousarray(tensors[n][1])
            header[n] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
            blobs.append(a.tobytes())
            off += a.nbytes
            weight_map[n] = shard
        _st(dst / shard, header, b"".join(blobs))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, one, _, _ = load_folder(src)
    _, two, _, _ = load_folder(dst)
    assert one.keys() == two.keys()
    for k in one:
        np.testing.assert_array_equal(one[k][1], two[k][1])
