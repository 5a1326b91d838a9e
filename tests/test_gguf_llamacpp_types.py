"""Our quantizers against llama.cpp's own (llama_model_quantize, no importance matrix): the same
bytes for q4_1 / q5_1 on every matrix of stories260K, and for q6_k / q5_k on a random model whose rows
are multiples of 256 (read back through the GGUF reader, which copies the blocks and undoes the
Q/K row permutation). Skipped without llama-cpp-python."""
import numpy as np
import pytest

from infeng.cli.main import main

pytest.importorskip("llama_cpp")


def _compare(tmp_path, f32, qtype, ftype, n_mats, heads=("tok_embeddings",)):
    from infeng.bench.llamacpp_kld import quantize_gguf
    from infeng.converters import gguf_write
    from infeng.model.loader import load_gguf, load_model
    ours = tmp_path / f"{qtype}.infeng"
    (tmp_path / "p.yaml").write_text("tensors: {" + ", ".join(f"{h}: {qtype}" for h in heads) + "}\n")
    assert main(["quantize", str(f32), "-o", str(ours), "--type", qtype, "--policy", str(tmp_path / "p.yaml")]) == 0
    theirs, _ = load_gguf(quantize_gguf(gguf_write.write_gguf(load_model(f32), tmp_path / "f32.gguf"), ftype, 1))
    mats = [(n, a) for n, (d, a) in load_model(ours).tensors.items() if d == qtype]
    compared = 0
    for name, a in mats:
        dt, b = theirs.tensors[name]
        if dt != qtype:          # llama.cpp's own mix (e.g. a Q6_K head in a Q4_1 file)
            continue
        assert np.array_equal(a, b), name
        compared += 1
    assert compared >= n_mats, compared


@pytest.mark.parametrize("qtype,ftype", [("q4_1", "Q4_1"), ("q5_1", "Q5_1")])
def test_affine_bytes_equal_llama_cpp(tmp_path, data_dir, qtype, ftype):
    f32 = tmp_path / "f32.infeng"
    assert main(["convert", str(data_dir / "stories260K-f32"), "-o", str(f32), "--dtype", "f32"]) == 0
    _compare(tmp_path, f32, qtype, ftype, 30)


@pytest.mark.parametrize("qtype,ftype,n", [("q6_k", "Q6_K", 14), ("q5_k", "Q5_K_S", 14)])
def test_k_quant_bytes_equal_llama_cpp(tmp_path, data_dir, qtype, ftype, n):
    """Q5_K_S: every matrix Q5_K but the head (Q6_K), which the comparison skips."""
    from test_quant_gguf_types import _small_model
    f32 = tmp_path / "f32.infeng"
    _small_model(f32, data_dir, 256)
    _compare(tmp_path, f32, qtype, ftype, n, heads=("tok_embeddings", "output"))
