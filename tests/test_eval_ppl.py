"""infeng eval: perplexity (recorded reference NLL, chunking, sliding window) and KL-divergence."""
import json

import numpy as np
import pytest

from infeng.cli.main import main
from infeng.evals import perplexity as P
from infeng.model.loader import load_model
from infeng.runtime.scorer import Scorer, token_nll

FOLDERS = ["stories260K", "stories260K-f32"]


@pytest.fixture(scope="module")
def models(data_dir):
    return {f: load_model(data_dir / f) for f in FOLDERS}


@pytest.mark.parametrize("folder", FOLDERS)
def test_ppl_equals_exp_recorded_mean_nll(folder, models, data_dir):
    ref = json.loads((data_dir / folder / "reference.json").read_text())["logits_32"]
    sc = Scorer(models[folder], threads=1)
    s = P.score(sc, [ref["input_ids"]])
    m, recs = P.perplexity_metrics(s, 1)
    assert m["tokens"] == 31
    assert m["ppl"] == pytest.approx(np.exp(ref["mean_nll_next_token"]), rel=1e-4)
    assert list(sc.logits(ref["input_ids"]).argmax(axis=1)) == ref["argmax_ids_per_position"]


def test_chunked_logits_equal_one_chunk(models, data_dir):
    ids = json.loads((data_dir / "stories260K" / "reference.json").read_text())["logits_32"]["input_ids"]
    full = Scorer(models["stories260K"], threads=1).logits(ids)
    for mt in (1, 7, 31):
        assert np.allclose(Scorer(models["stories260K"], threads=1, max_tokens=mt).logits(ids), full, atol=1e-5)


def test_sliding_window_scores_each_target_once_with_its_window(models, data_dir):
    ids = json.loads((data_dir / "stories260K" / "reference.json").read_text())["logits_32"]["input_ids"]
    m = models["stories260K"]
    full = Scorer(m, threads=1)
    s = P.score(Scorer(m, threads=1, ctx=12), [ids], stride=5)
    # windows [0,12) [5,17) [10,22) [15,27) [20,32): targets 1..11, 12..16, 17..21, 22..26, 27..31
    want = []
    for b, e in ((0, 12), (5, 17), (10, 22), (15, 27), (20, 32)):
        nll = token_nll(full.logits(ids[b:e]), np.asarray(ids[b + 1:e]))
        first = 1 if b == 0 else e - 5
        want.extend(nll[first - 1 - b:])
    assert len(s.nll) == 31
    assert np.allclose(s.nll, want, atol=1e-6)
    # a window as long as the document is the plain score
    assert np.allclose(P.score(Scorer(m, threads=1, ctx=32), [ids], stride=3).nll, P.score(full, [ids]).nll, atol=1e-6)


def _metrics(path):
    return json.loads(path.read_text())["metrics"]


def test_cli_perplexity_per_document_records(data_dir, tmp_path):
    out = tmp_path / "r.json"
    text = data_dir / "text" / "tinystories_sample.txt"
    assert main(["eval", str(data_dir / "stories260K"), "--text", str(text), "--json", str(out), "--threads", "1"]) == 0
    rep = json.loads(out.read_text())
    m = rep["metrics"]
    assert m["perplexity.documents"] == 5 and 1 < m["perplexity.ppl"] < 10 and m["perplexity.ppl_se"] > 0
    assert len(rep["records"]) == 5 and sum(r["tokens"] for r in rep["records"]) == m["perplexity.tokens"]
    assert rep["meta"]["model"]["weight_dtype"] == "bf16" and len(rep["meta"]["model"]["sha256"]) == 64


def _two_stories(data_dir, tmp_path):
    """The first two documents of the sample (keeps the CLI tests fast on busy machines)."""
    src = (data_dir / "text" / "tinystories_sample.txt").read_text()
    p = tmp_path / "two.txt"
    p.write_text("<|endoftext|>".join(src.split("<|endoftext|>")[:2]))
    return p


def test_kld_self_zero_f32_vs_bf16_small_saved_equals_live(data_dir, tmp_path):
    text = str(_two_stories(data_dir, tmp_path))
    bf, f32 = str(data_dir / "stories260K"), str(data_dir / "stories260K-f32")
    a, b, c, saved = (tmp_path / n for n in ("a.json", "b.json", "c.json", "base.npz"))
    assert main(["eval", f32, "--kld", f32, "--text", text, "--json", str(a), "--threads", "1"]) == 0
    ma = _metrics(a)
    assert abs(ma["kld.kld_mean"]) < 1e-6 and abs(ma["kld.kld_p99"]) < 1e-6 and ma["kld.top1_agreement"] == 1.0
    assert ma["kld.ppl"] == pytest.approx(ma["kld.base_ppl"], rel=1e-6) and ma["kld.delta_p_rms"] < 1e-5
    assert main(["eval", "--threads", "1", bf, "--kld", f32, "--text", text, "--save-logits", str(saved), "--json", str(b)]) == 0
    mb = _metrics(b)
    assert 1e-6 < mb["kld.kld_mean"] < 0.01 and mb["kld.kld_median"] <= mb["kld.kld_p99"] <= mb["kld.kld_max"]
    assert 0.95 < mb["kld.top1_agreement"] < 1.0 and 0 < mb["kld.delta_p_rms"] < 0.05
    assert mb["kld.base_ppl"] == pytest.approx(ma["kld.ppl"], rel=1e-6)
    assert main(["eval", "--threads", "1", bf, "--kld", str(saved), "--text", text, "--json", str(c)]) == 0
    mc = _metrics(c)
    for key in ("kld.kld_mean", "kld.kld_median", "kld.kld_p99", "kld.top1_agreement", "kld.ppl", "kld.base_ppl"):
        assert mc[key] == pytest.approx(mb[key], rel=1e-6, abs=1e-12), key


def test_saved_baseline_is_validated(data_dir, tmp_path, capsys):
    text = _two_stories(data_dir, tmp_path)
    f32 = str(data_dir / "stories260K-f32")
    saved = tmp_path / "base.npz"
    assert main(["eval", "--threads", "1", f32, "--save-logits", str(saved), "--text", str(text)]) == 0
    # other text: refused
    other = tmp_path / "other.txt"
    other.write_text("Once upon a time there was a cat.")
    capsys.readouterr()
    assert main(["eval", "--threads", "1", f32, "--kld", str(saved), "--text", str(other)]) == 1
    assert "other text" in capsys.readouterr().err
    # tampered arrays: refused, never unpickled
    z = dict(np.load(saved, allow_pickle=False))
    for key, bad in (("topk_idx", z["topk_idx"] + 10_000), ("nll", z["nll"][:-1]),
                     ("meta", np.frombuffer(b"[1]", np.uint8)), ("rest", z["rest"].astype(np.float64))):
        t = tmp_path / f"bad-{key}.npz"
        np.savez(t, **dict(z, **{key: bad}))
        assert main(["eval", "--threads", "1", f32, "--kld", str(t), "--text", str(text)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("infeng: error:") and err.count("\n") == 1, err
    pk = tmp_path / "pickle.npz"
    np.savez(pk, **dict(z, meta=np.array([{"a": 1}], dtype=object)))
    assert main(["eval", "--threads", "1", f32, "--kld", str(pk), "--text", str(text)]) == 1
    assert "infeng: error:" in capsys.readouterr().err
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04not a zip")
    assert main(["eval", "--threads", "1", f32, "--kld", str(junk), "--text", str(text)]) == 1
    assert "saved baseline logits cannot be read" in capsys.readouterr().err
    assert main(["eval", "--threads", "1", f32, "--kld", str(tmp_path / "none.npz"), "--text", str(text)]) == 1
    assert "no such file" in capsys.readouterr().err


def test_topk_kl_is_a_lower_bound_and_exact_at_full_vocab(models, data_dir):
    """KL over top-k + rest buckets ≤ full KL, and equals the plain full-vocabulary KL at k = vocab."""
    ids = json.loads((data_dir / "stories260K" / "reference.json").read_text())["logits_32"]["input_ids"]
    sb, sm = Scorer(models["stories260K-f32"], threads=1), Scorer(models["stories260K"], threads=1)
    from infeng.runtime.scorer import log_softmax
    lpb, lpm = log_softmax(sb.logits(ids)[:-1]), log_softmax(sm.logits(ids)[:-1])
    full = (np.exp(lpb) * (lpb - lpm)).sum(axis=1)
    by_k = {}
    for k in (4, 64, 512):
        base = P.compute_base(sb, [ids], k, None, {})
        by_k[k] = P.score(sm, [ids], base=base).kld
    assert np.allclose(by_k[512], full, atol=1e-6, rtol=1e-4)
    assert np.all(by_k[4] <= by_k[64] + 1e-6) and np.all(by_k[64] <= full + 1e-6)
    assert full.mean() > 0
