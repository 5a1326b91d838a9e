"""GGUF files written by llama.cpp's own converter (tests/fixtures/gguf, see its README) load in
infeng as the same model as the Hugging Face folder they came from: tensors, config, tokenizer
and greedy output."""
import json
from pathlib import Path

import numpy as np
import pytest

from infeng.cli.main import main
from infeng.converters import gguf_file
from infeng.model.loader import load_gguf, load_model
from infeng.quant import quantize_q8_0
from infeng.runtime.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "gguf"


@pytest.fixture(scope="module")
def hf(data_dir):
    return load_model(data_dir / "stories260K-f32")


@pytest.mark.parametrize("kind", ["q8_0"])
def test_tensors_match_the_hf_weights(hf, kind):
    m, info = load_gguf(FIXTURES / f"stories260K-{kind}.gguf")
    for field in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size",
                  "max_seq_len", "norm_eps", "rope_theta", "tie_embeddings", "bos_id", "eos_ids"):
        assert getattr(m.config, field) == getattr(hf.config, field), field
    for name, (dt, arr) in m.tensors.items():
        want = hf.f32(name)
        if dt == "f32":
            np.testing.assert_array_equal(arr, want, err_msg=name)
        elif dt == "q8_0":           # llama.cpp's Q8_0 blocks are byte for byte infeng's
            np.testing.assert_array_equal(arr, quantize_q8_0(want), err_msg=name)
        else:                        # ffn_down (172 wide): llama.cpp falls back to F16
            assert dt == "f16" and name.endswith("w_down"), (name, dt)
            np.testing.assert_array_equal(arr, want.astype(np.float16), err_msg=name)


def test_tokenizer_encodes_like_the_hf_folder(hf, data_dir):
    m, _ = load_gguf(FIXTURES / "stories260K-q8_0.gguf")
    a = Tokenizer(hf.tokenizer, hf.config.bos_id, hf.config.eos_ids)
    b = Tokenizer(m.tokenizer, m.config.bos_id, m.config.eos_ids)
    text = (data_dir / "text" / "tinystories_sample.txt").read_text()
    # GGUF has no remove_extra_whitespaces flag and llama.cpp keeps runs of spaces, which this
    # model's sentencepiece normalizer collapses: compare on text without such runs
    lines = [" ".join(x.split()) for x in text.splitlines() if x.strip()]
    for line in lines + ["Once upon a time", "héllo wörld ✓ 123 <0x0A>", "Tom said, \"Hi!\""]:
        assert a.encode(line) == b.encode(line), line
        assert b.decode(b.encode(line)[1:]) == a.decode(a.encode(line)[1:])


@pytest.mark.parametrize("kind", ["q8_0"])
def test_greedy_output_identical_to_hf(capsys, tmp_path, data_dir, kind):
    out = tmp_path / "m.infeng"
    assert main(["convert", str(FIXTURES / f"stories260K-{kind}.gguf"), "-o", str(out)]) == 0
    capsys.readouterr()
    runs = []
    for model in (data_dir / "stories260K-f32", out):
        assert main(["generate", str(model), "-p", "Once upon a time", "-n", "60", "-t", "0"]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1]
    ref = json.loads((data_dir / "stories260K-f32" / "reference.json").read_text())["greedy"]["text"]
    assert runs[0] == ref + "\n"                 # and both are transformers' greedy text


@pytest.mark.parametrize("kind", ["q8_0"])
def test_container_matches_gguf_py(kind):
    """Our validating parser sees the same tensor table and metadata as llama.cpp's gguf-py."""
    gguf = pytest.importorskip("gguf")
    path = FIXTURES / f"stories260K-{kind}.gguf"
    ours, ref = gguf_file.GGUFFile(path), gguf.GGUFReader(str(path))
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        o = ours.tensors[t.name]
        assert (o.type_id, list(o.dims), o.offset, o.nbytes) == (int(t.tensor_type), [int(d) for d in t.shape],
                                                                  int(t.data_offset), int(t.n_bytes)), t.name
    assert sorted(ref.fields) == sorted(["GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"] + list(ours.metadata))
    assert ref.fields["llama.attention.head_count_kv"].contents() == ours.metadata["llama.attention.head_count_kv"]
    assert ref.fields["tokenizer.ggml.tokens"].contents() == ours.metadata["tokenizer.ggml.tokens"]
