"""Bad input: one line naming what and where, exit code != 0, no traceback, nothing written."""
import json
import shutil

import pytest

from infeng.cli.main import main

from conftest import patch_manifest


@pytest.fixture(scope="module")
def model(tmp_path_factory, data_dir):
    p = tmp_path_factory.mktemp("m") / "s.infeng"
    assert main(["convert", str(data_dir / "stories260K"), "-o", str(p)]) == 0
    return p


def _fails(capsys, argv, message, code=None):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0 and (code is None or rc == code)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and message in lines[0], err
    return lines[0]


def test_missing_model(capsys, tmp_path):
    _fails(capsys, ["generate", str(tmp_path / "nope.infeng"), "-p", "x"], "nope.infeng: no such file or directory")


def test_convert_missing_folder_writes_nothing(capsys, tmp_path):
    out = tmp_path / "o.infeng"
    _fails(capsys, ["convert", str(tmp_path / "nope"), "-o", str(out)], "no such directory")
    assert list(tmp_path.iterdir()) == []


def test_convert_non_llama_writes_nothing(capsys, tmp_path, data_dir):
    src = tmp_path / "src"
    shutil.copytree(data_dir / "stories260K", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.infeng"
    _fails(capsys, ["convert", str(src), "-o", str(out)], "architecture GPT2LMHeadModel is not supported")
    assert not out.exists() and not list(tmp_path.glob(".o.infeng*"))


@pytest.mark.parametrize("how,message", [
    ("truncated_header", "safetensors header length"),
    ("truncated_data", "file truncated?"),
])
def test_convert_corrupt_safetensors(capsys, tmp_path, data_dir, how, message):
    src = tmp_path / "src"
    shutil.copytree(data_dir / "stories260K", src)
    st = src / "model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(raw[:100] if how == "truncated_header" else raw[:-1000])
    out = tmp_path / "o.infeng"
    _fails(capsys, ["convert", str(src), "-o", str(out)], message)
    assert not out.exists()


def test_corrupt_native_file(capsys, tmp_path, model):
    bad = tmp_path / "bad.infeng"
    raw = bytearray(model.read_bytes())
    raw[-5] ^= 0x55
    bad.write_bytes(bytes(raw))
    _fails(capsys, ["generate", str(bad), "-p", "x"], "checksum mismatch")


@pytest.mark.parametrize("opts,message", [
    (["--max-tokens", "-1"], "--max-tokens must be an integer >= 0, got -1"),
    (["--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    (["--temperature", "-0.5"], "--temperature must be a number >= 0"),
    (["--top-k", "-3"], "--top-k must be an integer >= 0"),
    (["--seed", "-3"], "--seed must be an integer >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--ctx", "100000"], "context length 100000 must be in 1..512 (the model's maximum)"),
    (["--max-tokens", "ten"], "Invalid value for '-n' / '--max-tokens'"),
    (["--bogus"], "No such option: --bogus"),
])
def test_impossible_options(capsys, model, opts, message):
    _fails(capsys, ["generate", str(model), "-p", "x"] + opts, message)


def test_batch_without_output(capsys, model, tmp_path):
    req = tmp_path / "r.jsonl"
    req.write_text('{"prompt": "x"}\n')
    _fails(capsys, ["generate", str(model), "--batch", str(req)], "--batch needs --output")


def test_missing_batch_file_writes_nothing(capsys, model, tmp_path):
    out = tmp_path / "o.jsonl"
    _fails(capsys, ["generate", str(model), "--batch", str(tmp_path / "none.jsonl"), "--output", str(out)], "none.jsonl: no such file")
    assert not out.exists()


def test_bad_batch_lines_fail_alone(capsys, model, tmp_path):
    req = tmp_path / "r.jsonl"
    req.write_text("\n".join([
        json.dumps({"id": "ok1", "prompt": "Once", "max_tokens": 5, "temperature": 0}),
        '{"id": "broken", "prompt": ',
        json.dumps({"id": "neg", "prompt": "x", "max_tokens": -1}),
        json.dumps({"id": "typo", "prompt": "x", "max_token": 3}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"id": "topp", "prompt": "x", "top_p": 2}),
        json.dumps({"id": "ok2", "prompt": "Lily", "max_tokens": 5, "temperature": 0}),
    ]) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["generate", str(model), "--batch", str(req), "--output", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["ok1", "line-2", "neg", "typo", "line-5", "topp", "ok2"]
    assert "text" in rows[0] and "text" in rows[-1]
    assert "r.jsonl:2: not valid JSON" in rows[1]["error"]
    assert "r.jsonl:3: max_tokens must be an integer >= 0" in rows[2]["error"]
    assert "unknown field(s) 'max_token'" in rows[3]["error"]
    assert "must be a JSON object" in rows[4]["error"]
    assert "top_p must be in (0, 1]" in rows[5]["error"]


def test_prompt_longer_than_context_is_an_error_result(capsys, model, tmp_path):
    req = tmp_path / "r.jsonl"
    req.write_text(json.dumps({"id": "long", "prompt": "Once upon a time " * 200}) + "\n"
                   + json.dumps({"id": "ok", "prompt": "Once", "max_tokens": 3}) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["generate", str(model), "--batch", str(req), "--output", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert "leaves no room in the context of 512" in rows[0]["error"] and "text" in rows[1]


@pytest.mark.parametrize("case,message", [
    ("magic", "not an infeng file (bad magic"),
    ("version", "infeng format version 7 is not supported"),
    ("offset", "runs past the end of the file"),
    ("length", "does not match shape"),
    ("shape", "tensor 'layers.0.wq' has shape [64, 63], config says [64, 64]"),
    ("missing", "missing tensor 'norm'"),
])
def test_corrupt_native_file_cases(capsys, tmp_path, model, case, message):
    bad = tmp_path / "bad.infeng"
    raw = bytearray(model.read_bytes())
    if case == "magic":
        raw[:4] = b"GGUF"
        bad.write_bytes(bytes(raw))
    elif case == "version":
        raw[8] = 7
        bad.write_bytes(bytes(raw))
    else:
        def mutate(m):
            t = {e["name"]: e for e in m["tensors"]}
            if case == "offset":
                t["layers.0.wk"]["offset"] = 1 << 40
            elif case == "length":
                t["layers.0.wk"]["nbytes"] += 64
            elif case == "shape":
                t["layers.0.wq"]["shape"] = [64, 63]
                t["layers.0.wq"]["nbytes"] = 64 * 63 * 2
            elif case == "missing":
                t["norm"]["name"] = "renamed"
        patch_manifest(model, bad, mutate)
    out = tmp_path / "out.jsonl"
    req = tmp_path / "r.jsonl"
    req.write_text('{"prompt": "x"}\n')
    _fails(capsys, ["generate", str(bad), "--batch", str(req), "--output", str(out), "--no-verify"], message)
    assert not out.exists()


def test_convert_wrong_tensor_shape_writes_nothing(capsys, tmp_path, data_dir):
    src = tmp_path / "src"
    shutil.copytree(data_dir / "stories260K", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_key_value_heads"] = 8
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.infeng"
    _fails(capsys, ["convert", str(src), "-o", str(out)],
           "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [32, 64], config says [64, 64]")
    assert not out.exists() and not list(tmp_path.glob(".o.infeng*"))


def test_convert_does_not_clobber_on_failure(capsys, tmp_path, data_dir, model):
    """A failed convert leaves an existing output file exactly as it was."""
    out = tmp_path / "keep.infeng"
    out.write_bytes(model.read_bytes())
    before = out.read_bytes()
    src = tmp_path / "src"
    shutil.copytree(data_dir / "stories260K", src)
    (src / "model.safetensors").write_bytes(b"\x10\x00")
    _fails(capsys, ["convert", str(src), "-o", str(out)], "not a safetensors file")
    assert out.read_bytes() == before
