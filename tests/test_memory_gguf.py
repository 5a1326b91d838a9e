"""Part 3 of issue 21: the resident set after loading a GGUF-derived model stays within 10 % of
the file's size plus the KV cache. A fresh process loads the converted real model (SmolLM2-135M,
Q4_1 GGUF: its matrices run on the row-interleaved q4_1x16 layout, built at load), builds the C
model and a KV cache and runs one decode step (every weight read once); its RSS growth from
before the load is compared with file + KV (infeng.bench.gguf_types.resident)."""
from infeng.bench.gguf_types import resident
from infeng.cli.main import main


def test_rss_after_load_is_file_plus_kv(tmp_path, smollm2_gguf):
    out = tmp_path / "smollm2.infeng"
    assert main(["convert", str(smollm2_gguf), "-o", str(out)]) == 0
    r = resident(out, 512, 2)
    assert r["rss_vs_file_kv"] <= 1.10, r
    assert r["rss_load_mb"] >= 0.5 * out.stat().st_size / 2**20, r     # the weights were read: the probe measures them


def test_gguf_types_kind_small(tmp_path, monkeypatch):
    """The bench kind end to end on a small architecture: llama.cpp writes the file, infeng converts
    it at the same size, the RSS probe and both engines run, and an unknown type is refused."""
    import pytest
    pytest.importorskip("llama_cpp")
    from infeng.bench import gguf_types
    from infeng.errors import InfengError
    monkeypatch.setenv("INFENG_CACHE", str(tmp_path))
    recs, notes = gguf_types.run("test-32k", ["Q4_1"], 1, 1, 8, 4, log=lambda s: None)
    (r,) = recs
    assert r["type"] == "Q4_1" and 1.0 <= r["size_ratio"] <= 1.1, r          # the target; manifest and tokenizer weigh on 7 MB
    assert r["prefill_ratio"] > 0 and r["decode_ratio"] > 0 and r["rss_load_mb"] > 0, (r, notes)
    with pytest.raises(InfengError, match="unknown llama.cpp type"):
        gguf_types.run("test-32k", ["Q9_X"], 1, 1, 8, 4)
