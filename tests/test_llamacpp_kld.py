"""The llama.cpp KLD tool's plumbing, with llama_cpp stood in by infeng itself: a "llama.cpp"
that computes the baseline's own logits must score KLD ~0 at every position (so windows and
positions line up), the quantizer is called per type, and an absent llama_cpp is one note."""
import json
import shutil
import sys
import types

import numpy as np
import pytest

from infeng.bench import llamacpp_kld as K


class _FakeLlama:
    """llama_cpp.Llama's eval/scores/reset over infeng's Scorer of a fixed model."""
    model = None

    def __init__(self, model_path, n_ctx, **kw):
        from infeng.runtime.scorer import Scorer
        assert kw["logits_all"] and kw["type_k"] == 0 and kw["type_v"] == 0
        self.sc = Scorer(_FakeLlama.model, threads=1, ctx=n_ctx)
        self.ids = []

    def reset(self):
        self.ids = []

    def eval(self, toks):
        self.ids += toks
        self.scores = self.sc.logits(self.ids)


def _fake_llama_cpp(calls):
    def default_params():
        return types.SimpleNamespace(ftype=None, nthread=None)

    def quantize(src, dst, params):
        calls.append(params.ftype)
        shutil.copyfile(src.decode(), dst.decode())
        return 0
    return types.SimpleNamespace(Llama=_FakeLlama, llama_model_quantize_default_params=default_params,
                                 llama_model_quantize=quantize)


@pytest.fixture(scope="module")
def files(data_dir, tmp_path_factory):
    from infeng.cli.main import app
    from typer.testing import CliRunner
    d = tmp_path_factory.mktemp("kld")
    r = CliRunner()
    assert r.invoke(app, ["convert", str(data_dir / "stories260K-f32"), "-o", str(d / "f32.infeng"), "--dtype", "f32"]).exit_code == 0
    assert r.invoke(app, ["quantize", str(d / "f32.infeng"), "-o", str(d / "q8.infeng"), "--type", "q8_0"]).exit_code == 0
    text = d / "text.txt"
    text.write_text((data_dir / "text" / "tinystories_sample.txt").read_text()[:3000])
    return d, text


def test_llamacpp_rows_scored_like_infeng(files, monkeypatch, tmp_path):
    from infeng.model.loader import load_model
    d, text = files
    monkeypatch.setenv("INFENG_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setitem(sys.modules, "llama_cpp", _fake_llama_cpp(calls))
    _FakeLlama.model = load_model(d / "f32.infeng")
    rows, notes = K.run(d / "f32.infeng", text, ["Q8_0", "Q4_K_M"], [("q8_0", d / "q8.infeng")], ctx=64,
                        threads=1, log=lambda *_: None)
    assert not notes and calls == [K.FTYPES["Q8_0"], K.FTYPES["Q4_K_M"]]
    by = {(r["runner"], r["name"]): r for r in rows}
    assert set(by) == {("infeng", "q8_0"), ("llama.cpp", "F32"), ("llama.cpp", "Q8_0"), ("llama.cpp", "Q4_K_M")}
    # the stand-in computes the baseline's own logits, windows included (ctx 64 < the documents)
    for name in ("F32", "Q8_0", "Q4_K_M"):
        assert abs(by["llama.cpp", name]["kld_mean"]) < 1e-6 and by["llama.cpp", name]["top1_agreement"] == 1.0
    q8 = by["infeng", "q8_0"]
    assert 1e-5 < q8["kld_mean"] < 1e-2 and q8["tokens"] == by["llama.cpp", "F32"]["tokens"] > 64
    assert 8.0 < q8["bits_per_weight"] < 32.0 and 31.0 < by["llama.cpp", "F32"]["bits_per_weight"] < 34.0


def test_absent_llama_cpp_is_a_note(files, monkeypatch, tmp_path):
    d, text = files
    monkeypatch.setenv("INFENG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    rows, notes = K.run(d / "f32.infeng", text, ["Q8_0"], [], ctx=64, threads=1, log=lambda *_: None)
    assert rows == [] and len(notes) == 1 and "not installed" in notes[0]


def _suite(path, **kw) -> str:
    path.write_text("kind: llamacpp_kld\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in kw.items()))
    return str(path)


def test_bad_input(files, capsys, tmp_path):
    """Through `infeng bench --suite` (kind llamacpp_kld): one line naming what is wrong, exit 1."""
    from infeng.cli.main import main
    d, text = files
    y = tmp_path / "kld.yaml"
    assert main(["bench", "--suite", _suite(y, base=str(d / "q8.infeng"), text=str(text))]) == 1
    assert "must be unquantized" in capsys.readouterr().err
    assert main(["bench", "--suite", _suite(y, base=str(d / "f32.infeng"), text=str(text), compare={"a": "nofile"})]) == 1
    assert "compare a: 'nofile' is not a file" in capsys.readouterr().err
    assert main(["bench", "--suite", _suite(y, base=str(d / "f32.infeng"), text=str(text), types=["Q3_XS"])]) == 1
    assert "unknown llama.cpp type 'Q3_XS'" in capsys.readouterr().err
    assert main(["bench", "--suite", _suite(y, text=str(text), ctx="long")]) == 1
    assert "`ctx` must be int" in capsys.readouterr().err
    assert main(["bench", "--suite", _suite(y, text=str(text))]) == 1
    assert "kind llamacpp_kld needs base" in capsys.readouterr().err
    assert main(["bench", "--suite", _suite(y, text=str(text), colour="red")]) == 1
    assert "unknown key(s) colour" in capsys.readouterr().err


def test_absent_llama_cpp_through_the_cli(files, monkeypatch, tmp_path, capsys):
    """The suite kind end to end: the baseline is scored, the llama.cpp rows are a note, the
    telemetry file says so; --model sets the base."""
    from infeng.cli.main import main
    d, text = files
    monkeypatch.setenv("INFENG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    out = tmp_path / "kld.json"
    assert main(["bench", "--suite", _suite(tmp_path / "k.yaml", text=str(text), ctx=64, threads=1,
                                            compare={"q8": str(d / "q8.infeng")}),
                 "--model", str(d / "f32.infeng"), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["suite"] == "llamacpp_kld" and doc["meta"]["base"] == str(d / "f32.infeng")
    assert "not installed" in doc["meta"]["notes"][0]
    [row] = doc["records"]
    assert row["runner"] == "infeng" and row["name"] == "q8" and 0 < row["kld_mean"] < 1e-2
    assert doc["metrics"]["infeng_q8.kld_mean"] == row["kld_mean"]
    assert "not installed" in capsys.readouterr().err
