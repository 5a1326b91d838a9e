"""q4_1, q5_1, q6_k and q5_k in a whole model: a small random Llama whose every matrix, the embedding
table and the output head included, is of the type, run by the C forward pass (prefill GEMM,
decode GEMV, the quantized embedding lookup) against the numpy reference with int8 activations;
native → GGUF → native keeps the bytes (the GGUF reader copies these blocks). The byte layouts and
kernels alone: tests/test_quant_affine.py, tests/test_quant_q6_k.py."""
import numpy as np
import pytest

from conftest import check_c_forward_vs_int8_reference
from infeng import format as native
from infeng.cli.main import main

GGUF_NAME = {"q4_1": "Q4_1", "q5_1": "Q5_1", "q6_k": "Q6_K", "q5_k": "Q5_K"}


def _small_model(path, data_dir, width):
    """A random untied Llama; width 64 / hidden 96 for the 32-block types, 256 / 512 for q6_k / q5_k."""
    from infeng.format.config import ModelConfig
    from infeng.format.schema import expected_shapes, is_norm
    dim, hidden = (64, 96) if width == 32 else (256, 512)
    cfg = ModelConfig(dim=dim, hidden_dim=hidden, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=dim // 4,
                      vocab_size=512, max_seq_len=256, norm_eps=1e-5, rope_theta=10000.0,
                      tie_embeddings=False, bos_id=1, eos_ids=(2,))
    rng = np.random.default_rng(1)
    tensors = []
    for name, shape in expected_shapes(cfg).items():
        if is_norm(name):
            data = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            data = (rng.standard_normal(shape) * (1.5 / np.sqrt(shape[-1])) + 0.02).astype(np.float32)
        tensors.append(native.Tensor(name, "f32", shape, data))
    tok = (data_dir / "stories260K" / "tokenizer.json").read_text()
    native.write(path, {"kind": "model", "config": cfg.to_dict(),
                        "tokenizer": {"json": tok, "add_bos": True, "chat_template": None},
                        "generation": {}, "source": "test:gguf-types"}, tensors)


def _quantized(tmp_path, data_dir, qtype):
    src, out = tmp_path / "f32.infeng", tmp_path / "q.infeng"
    _small_model(src, data_dir, 256 if qtype.endswith("_k") else 32)
    (tmp_path / "p.yaml").write_text(f"tensors: {{output: {qtype}}}\n")      # the head too (default q8_0)
    assert main(["quantize", str(src), "-o", str(out), "--type", qtype, "--policy", str(tmp_path / "p.yaml")]) == 0
    return out


@pytest.mark.parametrize("qtype", list(GGUF_NAME))
def test_c_forward_matches_reference(kern, tmp_path, data_dir, qtype):
    from infeng.model.loader import load_model
    model = load_model(_quantized(tmp_path, data_dir, qtype))
    assert {d for n, (d, _) in model.tensors.items() if not n.endswith("norm")} == {qtype}
    check_c_forward_vs_int8_reference(kern, model)


@pytest.mark.parametrize("qtype", list(GGUF_NAME))
def test_gguf_round_trip_keeps_bytes(tmp_path, data_dir, qtype):
    from infeng.converters import gguf_file
    out, gg, back = _quantized(tmp_path, data_dir, qtype), tmp_path / "m.gguf", tmp_path / "back.infeng"
    assert main(["convert", str(out), "--to", "gguf", "-o", str(gg)]) == 0
    g = gguf_file.GGUFFile(gg)
    assert {g.tensors[n].type_name for n in g.tensors if not n.endswith("norm.weight")} == {GGUF_NAME[qtype]}
    assert main(["convert", str(gg), "-o", str(back)]) == 0
    a, b = native.NativeFile(out), native.NativeFile(back)
    for name in a.dtypes:
        assert b.dtypes[name] == a.dtypes[name], name
        np.testing.assert_array_equal(np.asarray(b.tensors[name]), np.asarray(a.tensors[name]), err_msg=name)


def test_q6_k_falls_back_to_q8_0(tmp_path, data_dir, capsys):
    """Rows that are not a multiple of 256 (dim 64) go to q8_0, as llama.cpp's Q6_K files do."""
    src, out = tmp_path / "f32.infeng", tmp_path / "q.infeng"
    _small_model(src, data_dir, 32)
    assert main(["quantize", str(src), "-o", str(out), "--type", "q6_k"]) == 0
    assert "fallback to q8_0 (q6_k needs rows that are a multiple of 256, these have 64)" in capsys.readouterr().err
    f = native.NativeFile(out)
    assert {d for n, d in f.dtypes.items() if not n.endswith("norm")} == {"q8_0"}
