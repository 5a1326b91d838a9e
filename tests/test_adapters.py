"""PEFT LoRA/DoRA adapters: conversion, identity checks, and the reference math against logits
recorded with transformers + PEFT (tools/record_peft_fixtures.py)."""
import dataclasses
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
@pytest.mark.parametrize("dtype", ["f32", "bf16", "bf16-kernel", "int8", "int8-kernel"])
def test_reference_with_adapter_matches_peft(tmp_path, base, name, dtype):
    """int8-kernel: int8 storage computed as the C kernels do (activations rounded to int8);
    bf16-kernel: bf16 storage as the kernels compute it under bf16_act=bf16 (x and h rounded to
    bf16 for vdpbf16ps)."""
    out = convert_peft(FIX / name, tmp_path / f"{name}.infeng-lora", base, dtype=dtype.removesuffix("-kernel"))
    a = load_adapter(out, base)
    rec = json.loads((FIX / name / "logits.json").read_text())
    model = dataclasses.replace(base, bf16_act="bf16") if dtype == "bf16-kernel" else base
    logits = reference_with_adapter(model, a, kernel_rounding=dtype.endswith("-kernel")).forward(rec["input_ids"])
    want = np.array(rec["last_logits"], np.float32)
    if dtype == "f32":
        np.testing.assert_allclose(logits[-1], want, atol=1e-3)
        assert logits.argmax(-1).tolist() == rec["argmax_per_position"]
    else:   # rounded adapter weights: close, and far closer than no adapter at all
        err = np.abs(logits[-1] - want).max()
        none = np.abs(reference_with_adapter(base, None).forward(rec["input_ids"])[-1] - want).max()
        # measured max |Δlogit| / max |logit|: bf16 ≤ 0.71 %, bf16 with bf16 activations ≤ 1.35 %,
        # int8 (per-row A, per-column B) ≤ 1.74 %, int8 with the kernels' int8 activations ≤ 2.41 %
        # (all on lora_r8_all_rslora, whose random adapter moves the logits by 146 %; ≤ 0.47 % on
        # the other fixtures)
        tol = {"bf16": 0.01, "bf16-kernel": 0.02, "int8": 0.025, "int8-kernel": 0.03}[dtype]
        assert err < tol * np.abs(want).max() and err < none / 20, (err, none)


def test_int8_storage_is_versioned(tmp_path, base):
    from infeng import format as native
    from infeng.model.adapter import requantize
    out = convert_peft(FIX / "lora_r8_all_rslora", tmp_path / "a.infeng-lora", base, dtype="int8")
    f = native.NativeFile(out)
    assert f.manifest["adapter"]["storage"] == "int8" and f.manifest["adapter"]["storage_version"] == 1
    assert f.dtypes["layers.0.wq.lora_a"] == "i8" and f.dtypes["layers.0.wq.lora_bt"] == "i8"
    a = load_adapter(out, base)
    f32 = load_adapter(convert_peft(FIX / "lora_r8_all_rslora", tmp_path / "f.infeng-lora", base, dtype="f32"), base)
    for t in a.targets:     # each int8 value is within half a step of the f32 weight
        for part, key in (("lora_a", "lora_a"), ("lora_b", "lora_bt")):
            step = a.tensors[f"{t}.{key}_scale"][1]
            err = np.abs(a.f32(f"{t}.{part}") - f32.f32(f"{t}.{part}"))
            assert (err <= 0.5001 * (step[:, None] if part == "lora_a" else step[None, :])).all()
    # the same adapter requantized from the f32 file gives the same bytes' worth of weights
    again = load_adapter(requantize(tmp_path / "f.infeng-lora", tmp_path / "b.infeng-lora", base, "int8"), base)
    assert all(np.array_equal(again.f32(k), a.f32(k)) for k in (f"{a.targets[0]}.lora_a", f"{a.targets[0]}.lora_b"))
    # a storage this build does not know is refused with one line naming it
    man = dict(f.manifest)
    man["adapter"] = dict(man["adapter"], storage_version=2)
    tensors = [native.Tensor(n, f.dtypes[n], tuple(f.tensors[n].shape), np.ascontiguousarray(f.tensors[n]))
               for n in f.tensors]
    native.write(tmp_path / "v2.infeng-lora", {k: v for k, v in man.items() if k not in ("tensors", "format", "version")}, tensors)
    with pytest.raises(InfengError, match="adapter storage 'int8' version 2 is not one this infeng reads"):
        load_adapter(tmp_path / "v2.infeng-lora", base)


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
    from infeng.converters.hf_config import from_hf
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
    out8 = tmp_path / "c.infeng-lora"
    assert main(["convert", "--adapter", str(FIX / "dora_r4_attn_down"), "-o", str(out8), "--dtype", "int8",
                 "--base", str(data_dir / "stories260K-f32")]) == 0
    a8 = load_adapter(out8, load_model(data_dir / "stories260K-f32"))
    assert a8.storage == "int8" and a8.use_dora and out8.stat().st_size < out.stat().st_size
    capsys.readouterr()
    assert main(["convert", "--adapter", str(FIX / "dora_r4_attn_down"), "-o", str(tmp_path / "d.infeng-lora"),
                 "--dtype", "int4", "--base", str(data_dir / "stories260K-f32")]) == 1
    err = capsys.readouterr().err
    assert "infeng: error: --dtype 'int4': adapters are stored as f32 or bf16 or int8" in err and "Traceback" not in err
    assert not (tmp_path / "d.infeng-lora").exists()


def test_gguf_lora_export(tmp_path, base):
    """The GGUF LoRA adapter holds, per matrix, A [in, r] and B [r, out] (GGML dims) whose
    alpha / r · B·A is the adapter's delta in the GGUF base's row order (wq / wk permuted)."""
    from infeng.converters.gguf_lora import write_gguf_lora
    from infeng.converters.gguf_write import _permute_rope, read_gguf_header
    a = load_adapter(convert_peft(FIX / "lora_r8_all_rslora", tmp_path / "a.infeng-lora", base, dtype="int8"), base)
    out = write_gguf_lora(a, base, tmp_path / "a.gguf")
    meta, tensors = read_gguf_header(out)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama"
    alpha = meta["adapter.lora.alpha"]
    assert abs(alpha / a.rank - a.scale) < 1e-6 * a.scale          # rsLoRA scale as an equivalent alpha
    assert len(tensors) == 2 * len(a.targets)
    raw = out.read_bytes()
    cfg = base.config

    def arr(name):
        t, dims, off = tensors[name]
        assert t == 0                                                # f32
        return np.frombuffer(raw, np.float32, int(np.prod(dims)), off).reshape(list(reversed(dims)))
    for t, gname, heads in (("layers.3.wq", "blk.3.attn_q.weight", cfg.n_heads),
                            ("layers.0.wk", "blk.0.attn_k.weight", cfg.n_kv_heads),
                            ("layers.4.w_down", "blk.4.ffn_down.weight", None)):
        A, B = arr(gname + ".lora_a"), arr(gname + ".lora_b")
        assert A.shape == (a.rank, base.f32(t).shape[1]) and B.shape == (base.f32(t).shape[0], a.rank)
        want = a.delta(t) if heads is None else _permute_rope(a.delta(t), heads)
        np.testing.assert_allclose(np.float32(alpha / a.rank) * (B @ A), want, rtol=1e-5, atol=1e-6)
    dora = load_adapter(convert_peft(FIX / "dora_r4_attn_down", tmp_path / "d.infeng-lora", base), base)
    with pytest.raises(InfengError, match="is DoRA"):
        write_gguf_lora(dora, base, tmp_path / "d.gguf")
    assert not (tmp_path / "d.gguf").exists()
