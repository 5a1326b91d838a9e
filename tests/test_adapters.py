"""PEFT LoRA/DoRA adapters: conversion, identity checks, and the reference math against logits
recorded with transformers + PEFT (tools/record_peft_fixtures.py)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from infeng.errors import InfengError
from infeng.model.adapter import convert_peft, load_adapter, reference_with_adapter
from infeng.model.loader import load_model

FIX = Path(__file__).parent / "fixtures" / "peft"
NAMES = sorted(p.name for p in FIX.iterdir())


@pytest.fixture(scope="module")
def base(data_dir):
    return load_model(data_dir / "stories260K-f32")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_reference_with_adapter_matches_peft(tmp_path, base, name, dtype):
    out = convert_peft(FIX / name, tmp_path / f"{name}.infeng-lora", base, dtype=dtype)
    a = load_adapter(out, base)
    rec = json.loads((FIX / name / "logits.json").read_text())
    logits = reference_with_adapter(base, a).forward(rec["input_ids"])
    want = np.array(rec["last_logits"], np.float32)
    if dtype == "f32":
        np.testing.assert_allclose(logits[-1], want, atol=1e-3)
        assert logits.argmax(-1).tolist() == rec["argmax_per_position"]
    else:   # bf16-stored adapter weights: close, and far closer than no adapter at all
        err = np.abs(logits[-1] - want).max()
        none = np.abs(reference_with_adapter(base, None).forward(rec["input_ids"])[-1] - want).max()
        assert err < 0.01 * np.abs(want).max() and err < none / 20, (err, none)


def test_adapter_for_another_base_is_refused(tmp_path, base, data_dir):
    out = convert_peft(FIX / "lora_r4_qv", tmp_path / "a.infeng-lora", base)
    other = load_model(data_dir / "stories260K")      # the bf16 weights: a different model
    with pytest.raises(InfengError, match="made for base model"):
        load_adapter(out, other)


def test_wrong_shape_names_the_tensor(tmp_path, data_dir, base):
    import struct
    src = tmp_path / "bad"
    shutil.copytree(FIX / "lora_r4_qv", src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    from infeng.model.config import from_hf
    small = from_hf({**json.loads((data_dir / "stories260K-f32" / "config.json").read_text()), "num_key_value_heads": 8})
    with pytest.raises(InfengError, match=r"v_proj.lora_B.weight' has shape \[32, 4\], the base model needs \[64, 4\]"):
        from infeng.converters.peft import read_peft
        read_peft(src, small)
    cfg["use_dora"] = True
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InfengError, match="has no dora_m tensor"):
        convert_peft(src, tmp_path / "x.infeng-lora", base)
    assert not (tmp_path / "x.infeng-lora").exists()


@pytest.mark.parametrize("change,message", [
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=True is not supported"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
])
def test_unsupported_config_refused(tmp_path, base, change, message):
    src = tmp_path / "bad"
    shutil.copytree(FIX / "lora_r4_qv", src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(change)
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InfengError, match=message):
        convert_peft(src, tmp_path / "x.infeng-lora", base)


def test_cli_convert_adapter(tmp_path, data_dir, capsys):
    from infeng.cli.main import main
    out = tmp_path / "a.infeng-lora"
    assert main(["convert", "--adapter", str(FIX / "dora_r4_attn_down"), "-o", str(out),
                 "--base", str(data_dir / "stories260K-f32")]) == 0
    a = load_adapter(out, load_model(data_dir / "stories260K-f32"))
    assert a.use_dora and a.rank == 4 and len(a.targets) == 25
    capsys.readouterr()
    assert main(["convert", "--adapter", str(FIX / "dora_r4_attn_down"), "-o", str(tmp_path / "b.infeng-lora")]) == 1
    assert "needs --base MODEL" in capsys.readouterr().err
    assert not (tmp_path / "b.infeng-lora").exists()
