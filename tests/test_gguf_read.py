"""GGUF in: round trip HF → native → GGUF → native (tensors, config, tokenizer, greedy text),
and corrupt headers each rejected with one clear line, nothing written."""
import struct

import numpy as np
import pytest

from infeng.cli.main import main
from infeng.converters import gguf_file
from infeng.model.loader import load_gguf, load_model
from infeng.runtime.tokenizer import Tokenizer

from gguf_build import ARR, STR, U32, U64, gguf, kv, rewrite, tensor_info


def _generate(capsys, model):
    assert main(["generate", str(model), "-p", "Once upon a time", "-n", "60", "-t", "0"]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def native_models(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("rt")
    f32 = d / "s.infeng"
    assert main(["convert", str(data_dir / "stories260K"), "-o", str(f32), "--dtype", "f32"]) == 0
    q8 = d / "s-q8.infeng"
    assert main(["quantize", str(f32), "-o", str(q8), "--type", "q8_0"]) == 0
    q4 = d / "s-q4.infeng"
    assert main(["quantize", str(f32), "-o", str(q4), "--type", "q4_0"]) == 0
    q5 = d / "s-q5.infeng"
    assert main(["quantize", str(f32), "-o", str(q5), "--type", "q5_0"]) == 0
    bf = d / "s-bf16.infeng"
    assert main(["convert", str(data_dir / "stories260K"), "-o", str(bf)]) == 0
    return {"f32": f32, "q8_0": q8, "q4_0": q4, "q5_0": q5, "bf16": bf}


@pytest.mark.parametrize("dtype", ["f32", "bf16", "q8_0", "q4_0", "q5_0"])
def test_round_trip_native_gguf_native(capsys, tmp_path, native_models, data_dir, dtype):
    src = native_models[dtype]
    g, back = tmp_path / "m.gguf", tmp_path / "back.infeng"
    assert main(["convert", str(src), "--to", "gguf", "-o", str(g)]) == 0
    assert main(["convert", str(g), "-o", str(back)]) == 0
    capsys.readouterr()
    a, b = load_model(src), load_model(back)
    assert a.config == b.config
    assert a.tokenizer == b.tokenizer
    assert sorted(a.tensors) == sorted(b.tensors)
    for name, (dt, arr) in a.tensors.items():
        dt2, arr2 = b.tensors[name]
        assert dt == dt2 and arr.shape == arr2.shape and np.array_equal(arr, arr2), name
    assert _generate(capsys, src) == _generate(capsys, back)
    # the tokenizer built from tokenizer.ggml.* alone (no embedded tokenizer.json) encodes the same
    meta = gguf_file.GGUFFile(g)
    del meta.metadata["tokenizer.huggingface.json"]
    from infeng.converters.gguf_tokenizer import build
    spec, bos, eos = build(meta, str(g))
    t1 = Tokenizer(a.tokenizer, a.config.bos_id, a.config.eos_ids)
    t2 = Tokenizer(spec, bos, eos)
    text = (data_dir / "text" / "tinystories_sample.txt").read_text()
    lines = [" ".join(x.split()) for x in text.splitlines() if x.strip()]   # no runs of spaces (see README)
    for line in lines + ["Once upon a time", "héllo wörld ✓ 123", "\n"]:
        assert t1.encode(line) == t2.encode(line), line


def test_gguf_to_gguf_refused(capsys, tmp_path, native_models):
    g = tmp_path / "m.gguf"
    assert main(["convert", str(native_models["f32"]), "--to", "gguf", "-o", str(g)]) == 0
    capsys.readouterr()
    assert main(["convert", str(g), "--to", "gguf", "-o", str(tmp_path / "x.gguf")]) != 0
    assert "needs a native .infeng model file" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


# ---- corrupt files ---------------------------------------------------------------------------

GOOD_KV = [kv("general.architecture", STR, "llama")]


def _one_tensor(dims=(32, 2), ggml_type=0, offset=0, name="token_embd.weight"):
    return tensor_info(name, dims, ggml_type, offset)


CASES = {
    "bad magic": (lambda: gguf(GOOD_KV, [], magic=b"GGUX"), "not a GGUF file"),
    "bad version": (lambda: gguf(GOOD_KV, [], version=7), "GGUF version 7 is not supported"),
    "version 1": (lambda: gguf(GOOD_KV, [], version=1), "GGUF version 1 is not supported"),
    "big-endian": (lambda: gguf(GOOD_KV, [], version=3 << 24), "big-endian"),
    "tensor count -1": (lambda: gguf(GOOD_KV, [], n_tensors=-1), "negative count: -1 tensors"),
    "kv count absurd": (lambda: gguf(GOOD_KV, [], n_kv=1 << 40), "cannot fit"),
    "string past end": (lambda: gguf([struct.pack("<Q", 1 << 40) + b"key"], []), "only"),
    "bad utf-8 key": (lambda: gguf([struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<II", U32, 1)], []), "not valid UTF-8"),
    "array past end": (lambda: gguf([kv("a", STR, "x")[:0] + b"\x01\0\0\0\0\0\0\0a" + struct.pack("<IIQ", ARR, U32, 1 << 50)], []),
                       "array of 1125899906842624 elements"),
    "array element type": (lambda: gguf([b"\x01\0\0\0\0\0\0\0a" + struct.pack("<IIQ", ARR, 99, 1)], []), "array element type 99"),
    "nested array": (lambda: gguf([b"\x01\0\0\0\0\0\0\0a" + struct.pack("<IIQ", ARR, ARR, 1) + struct.pack("<IQ", U32, 0)], []),
                     "arrays of arrays"),
    "value type": (lambda: gguf([b"\x01\0\0\0\0\0\0\0a" + struct.pack("<I", 42)], []), "value type 42"),
    "duplicate key": (lambda: gguf(GOOD_KV * 2, []), "duplicate metadata key"),
    "alignment not power of two": (lambda: gguf(GOOD_KV + [kv("general.alignment", U32, 48)], []), "not a power of two"),
    "alignment wrong type": (lambda: gguf(GOOD_KV + [kv("general.alignment", U64, 32)], []), "must be a u32"),
    "n_dims 5": (lambda: gguf(GOOD_KV, [_one_tensor(dims=(32, 1, 1, 1, 1))]), "5 dimensions"),
    "dims overflow": (lambda: gguf(GOOD_KV, [_one_tensor(dims=(1 << 32, 1 << 32, 1 << 31))], b"\0" * 256),
                      "more elements than the file could hold"),       # 2^95: wraps to 0 in u64 arithmetic
    "dim negative as i64": (lambda: gguf(GOOD_KV, [_one_tensor(dims=(32, 1 << 63))], b"\0" * 256), "not positive"),
    "dims product absurd": (lambda: gguf(GOOD_KV, [_one_tensor(dims=(1 << 30, 1 << 30))], b"\0" * 256),
                            "more elements than the file could hold"),
    "zero dim": (lambda: gguf(GOOD_KV, [_one_tensor(dims=(32, 0))], b"\0" * 256), "not positive"),
    "unknown type": (lambda: gguf(GOOD_KV, [_one_tensor(ggml_type=31)], b"\0" * 256), "unknown GGML type 31"),
    "block divisibility": (lambda: gguf(GOOD_KV, [_one_tensor(dims=(33, 2), ggml_type=8)], b"\0" * 256),
                           "not a multiple of the Q8_0 block"),
    "offset past end": (lambda: gguf(GOOD_KV, [_one_tensor(offset=1 << 20)], b"\0" * 256), "runs past the end of the data"),
    "truncated data": (lambda: gguf(GOOD_KV, [_one_tensor()], b"\0" * 100), "runs past the end of the data"),
    "misaligned offset": (lambda: gguf(GOOD_KV, [_one_tensor(offset=4)], b"\0" * 512), "not a multiple of the alignment 32"),
    "duplicate names": (lambda: gguf(GOOD_KV, [_one_tensor(), _one_tensor(offset=256)], b"\0" * 512),
                        "duplicate tensor name"),
    "overlapping tensors": (lambda: gguf(GOOD_KV, [_one_tensor(), _one_tensor(name="output_norm.weight", offset=224, dims=(32,))],
                                         b"\0" * 512), "overlap"),
    "long name": (lambda: gguf(GOOD_KV, [_one_tensor(name="x" * 64)], b"\0" * 256), "longer than 63 bytes"),
    "missing architecture": (lambda: gguf([kv("general.name", STR, "x")], []), "missing required metadata 'general.architecture'"),
    "wrong architecture": (lambda: gguf([kv("general.architecture", STR, "gpt2")], []), "architecture 'gpt2' is not supported"),
    "missing hyper-parameter": (lambda: gguf(GOOD_KV, []), "missing required metadata 'llama.embedding_length'"),
    "metadata wrong kind": (lambda: gguf(GOOD_KV + [kv("llama.embedding_length", STR, "64")], []),
                            "'llama.embedding_length' should be int"),
    "truncated header": (lambda: gguf(GOOD_KV, [_one_tensor()])[:80], "truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_gguf_rejected(capsys, tmp_path, case):
    make, message = CASES[case]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(make())
    out = tmp_path / "out.infeng"
    rc = main(["convert", str(bad), "-o", str(out)])
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"infeng: error: {bad}: ") and message in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def _model_file(tmp_path, native_models, mutate):
    """Our own f32 export, re-assembled with ``mutate(metadata dict, tensor list)`` applied."""
    g = tmp_path / "m.gguf"
    assert main(["convert", str(native_models["f32"]), "--to", "gguf", "-o", str(g)]) == 0
    bad = tmp_path / "bad.gguf"
    rewrite(g, bad, mutate)
    return bad


@pytest.mark.parametrize("case,message", [
    ("drop output_norm", "missing tensor 'output_norm.weight'"),
    ("wrong shape", "has shape"),
    ("extra tensor", "is not part of a llama model"),
    ("vocab mismatch", "llama.vocab_size 600 != 512"),
    ("bos out of range", "bos_token_id 9999 is outside the vocabulary"),
    ("heads", "must be a positive integer"),
    ("rope scaling", "rope.scaling.type 'su' is not supported"),
    ("unknown key", "metadata key 'llama.attention.logit_softcapping' is not understood for architecture 'llama'"),
    ("experts", "llama.expert_count=8 is not supported"),
    ("q8_1 tensor", "has type Q8_1, which cannot be converted"),
    ("absurd piece", "is a 5000-character normal piece"),
    ("gpt2 bad merge", "tokenizer.ggml.merges[0] 'nospace' is not two tokens"),
    ("unknown pre", "tokenizer.ggml.pre 'mystery' is not supported"),
])
def test_model_level_errors(capsys, tmp_path, native_models, case, message):
    def mutate(meta, tensors):
        if case == "drop output_norm":
            tensors[:] = [t for t in tensors if t[0] != "output_norm.weight"]
        elif case == "wrong shape":
            n, dims, t, raw = tensors[-1]
            tensors[-1] = (n, dims[::-1], t, raw)
        elif case == "extra tensor":
            tensors.append(("blk.0.attn_q.bias", [64], 0, b"\0" * 256))
        elif case == "vocab mismatch":
            meta["llama.vocab_size"] = (U32, 600)
        elif case == "bos out of range":
            meta["tokenizer.ggml.bos_token_id"] = (U32, 9999)
        elif case == "heads":
            meta["llama.attention.head_count_kv"] = (U32, 0)
        elif case == "rope scaling":
            meta["llama.rope.scaling.type"] = (STR, "su")
        elif case == "unknown key":
            meta["llama.attention.logit_softcapping"] = (U32, 30)
        elif case == "experts":
            meta["llama.expert_count"] = (U32, 8)
        elif case == "absurd piece":
            del meta["tokenizer.huggingface.json"]
            meta["tokenizer.ggml.tokens"][1][300] = "a" * 5000
        elif case in ("gpt2 bad merge", "unknown pre"):
            del meta["tokenizer.huggingface.json"]
            meta["tokenizer.ggml.model"] = (STR, "gpt2")
            meta["tokenizer.ggml.merges"] = (ARR, ["nospace"] if case == "gpt2 bad merge" else ["a b"])
            if case == "unknown pre":
                meta["tokenizer.ggml.pre"] = (STR, "mystery")
        elif case == "q8_1 tensor":           # (Q5_0, Q4_1, Q5_1 are copies now; Q8_1 is ggml's activation type)
            i = next(i for i, t in enumerate(tensors) if t[0] == "blk.0.ffn_up.weight")
            n, dims, t, raw = tensors[i]
            tensors[i] = (n, dims, 9, raw[:dims[0] * dims[1] // 32 * 36])
    bad = _model_file(tmp_path, native_models, mutate)
    capsys.readouterr()
    out = tmp_path / "out.infeng"
    rc = main(["convert", str(bad), "-o", str(out)])
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc != 0 and len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_version_2_reads_the_same(capsys, tmp_path, native_models):
    g = tmp_path / "m.gguf"
    assert main(["convert", str(native_models["q8_0"]), "--to", "gguf", "-o", str(g)]) == 0
    v2 = tmp_path / "v2.gguf"
    rewrite(g, v2, lambda meta, tensors: None, version=2)
    a, _ = load_gguf(g)
    b, info = load_gguf(v2)
    assert info["gguf_version"] == 2 and a.config == b.config and a.tokenizer == b.tokenizer
    for name, (dt, arr) in a.tensors.items():
        assert b.tensors[name][0] == dt and np.array_equal(b.tensors[name][1], arr), name
