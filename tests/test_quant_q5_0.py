"""q5_0 (GGUF Q5_0) in a whole model: a small random Llama whose every matrix, the embedding
table and the output head included, is q5_0 (rows of 64 and 96: multiples of 32, not of 256),
run by the C forward pass (prefill GEMM, decode GEMV, the q5_0 embedding lookup) against the
numpy reference with int8 activations; and native → GGUF → native keeps the q5_0 bytes.
The byte layout and the kernels alone: tests/test_quant.py."""
import numpy as np
import pytest

from conftest import check_c_forward_vs_int8_reference
from infeng import format as native
from infeng.cli.main import main


def _small_model(path, data_dir):
    """A random untied Llama with dim 64, hidden 96 (q4_k would fall back to q5_0 everywhere)."""
    from infeng.format.schema import expected_shapes, is_norm
    from infeng.format.config import ModelConfig
    cfg = ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      vocab_size=512, max_seq_len=256, norm_eps=1e-5, rope_theta=10000.0,
                      tie_embeddings=False, bos_id=1, eos_ids=(2,))
    rng = np.random.default_rng(1)
    tensors = []
    for name, shape in expected_shapes(cfg).items():
        if is_norm(name):
            data = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            data = (rng.standard_normal(shape) * (1.5 / np.sqrt(shape[-1]))).astype(np.float32)
        tensors.append(native.Tensor(name, "f32", shape, data))
    tok = (data_dir / "stories260K" / "tokenizer.json").read_text()
    native.write(path, {"kind": "model", "config": cfg.to_dict(),
                        "tokenizer": {"json": tok, "add_bos": True, "chat_template": None},
                        "generation": {}, "source": "test:q5_0"}, tensors)


def _quantized(tmp_path, data_dir, qtype="q5_0"):
    src, out = tmp_path / "f32.infeng", tmp_path / "q.infeng"
    _small_model(src, data_dir)
    (tmp_path / "p.yaml").write_text("tensors: {output: q5_0}\n")        # the head too (default q8_0)
    assert main(["quantize", str(src), "-o", str(out), "--type", qtype, "--policy", str(tmp_path / "p.yaml")]) == 0
    return out


def test_c_forward_matches_q5_0_reference(kern, tmp_path, data_dir):
    from infeng.model.loader import load_model
    model = load_model(_quantized(tmp_path, data_dir))
    assert {d for n, (d, _) in model.tensors.items() if not n.endswith("norm")} == {"q5_0"}
    check_c_forward_vs_int8_reference(kern, model)


def test_q4_k_falls_back_to_q5_0(tmp_path, data_dir, capsys):
    out = _quantized(tmp_path, data_dir, "q4_k")
    assert "fallback to q5_0 (q4_k needs rows that are a multiple of 256, these have 64)" in capsys.readouterr().err
    f = native.NativeFile(out)
    assert {d for n, d in f.dtypes.items() if not n.endswith("norm")} == {"q5_0"}


def test_gguf_round_trip_keeps_q5_0_bytes(tmp_path, data_dir):
    from infeng.converters import gguf_file
    out, gg, back = _quantized(tmp_path, data_dir), tmp_path / "m.gguf", tmp_path / "back.infeng"
    assert main(["convert", str(out), "--to", "gguf", "-o", str(gg)]) == 0
    g = gguf_file.GGUFFile(gg)
    assert {g.tensors[n].type_name for n in g.tensors if not n.endswith("norm.weight")} == {"Q5_0"}
    assert main(["convert", str(gg), "-o", str(back)]) == 0
    a, b = native.NativeFile(out), native.NativeFile(back)
    for name in a.dtypes:
        assert b.dtypes[name] == a.dtypes[name], name
        np.testing.assert_array_equal(np.asarray(b.tensors[name]), np.asarray(a.tensors[name]), err_msg=name)


def test_quantizer_bytes_equal_llama_cpp_q5_0(tmp_path, data_dir):
    """Our numpy quantizer and llama.cpp's own (llama_model_quantize to Q5_0) give the same
    bytes for every q5_0 matrix of stories260K (read back through the GGUF reader, which
    copies Q5_0 blocks and undoes the Q/K row permutation)."""
    pytest.importorskip("llama_cpp")
    from infeng.bench.llamacpp_kld import quantize_gguf
    from infeng.converters import gguf_write
    from infeng.model.loader import load_gguf, load_model
    f32, ours = tmp_path / "f32.infeng", tmp_path / "q5.infeng"
    assert main(["convert", str(data_dir / "stories260K-f32"), "-o", str(f32), "--dtype", "f32"]) == 0
    assert main(["quantize", str(f32), "-o", str(ours), "--type", "q5_0"]) == 0
    theirs, _ = load_gguf(quantize_gguf(gguf_write.write_gguf(load_model(f32), tmp_path / "f32.gguf"), "Q5_0", 1))
    mats = [(n, a) for n, (d, a) in load_model(ours).tensors.items() if d == "q5_0"]
    assert len(mats) == 30
    for name, a in mats:
        dt, b = theirs.tensors[name]
        assert dt == "q5_0" and np.array_equal(a, b), name
