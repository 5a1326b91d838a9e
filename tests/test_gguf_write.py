"""The bench's GGUF writer: header, metadata, vocabulary, tensor layout (RoPE row permutation of
wq/wk), and — when llama-cpp-python is installed — llama.cpp's logits on the export."""
import numpy as np
import pytest

from infeng.converters import gguf_write as G
from infeng.model.loader import load_model


@pytest.fixture(scope="module", params=["f32", "bf16"])
def exported(request, data_dir, tmp_path_factory):
    m = load_model(data_dir / "stories260K", dtype=request.param)
    p = G.write_gguf(m, tmp_path_factory.mktemp("gguf") / f"s-{request.param}.gguf")
    return m, p


def test_header_and_tensors(exported):
    m, p = exported
    meta, tensors = G.read_gguf_header(p)
    c = m.config
    assert meta["version"] == 3 and meta["general.architecture"] == "llama"
    assert meta["llama.embedding_length"] == c.dim and meta["llama.attention.head_count_kv"] == c.n_kv_heads
    assert len(meta["tokenizer.ggml.tokens"]) == c.vocab_size
    assert meta["tokenizer.ggml.tokens"][1] == "<s>" and meta["tokenizer.ggml.token_type"][1] == 3
    assert meta["tokenizer.ggml.token_type"][3 + 10] == 6              # <0x0A>
    assert "output.weight" not in tensors                               # tied embeddings
    assert len(tensors) == 2 + 9 * c.n_layers
    raw = p.read_bytes()
    t, dims, off = tensors["blk.1.ffn_down.weight"]
    dt, arr = m.tensors["layers.1.w_down"]
    assert t == G.GGML_TYPE[dt] and dims == [c.hidden_dim, c.dim] and off % 32 == 0
    assert raw[off:off + arr.nbytes] == arr.tobytes()
    # wq rows: GGML's interleaved RoPE order; undoing the permutation gives the HF rows back
    t, dims, off = tensors["blk.0.attn_q.weight"]
    dt, arr = m.tensors["layers.0.wq"]
    got = np.frombuffer(raw[off:off + arr.nbytes], arr.dtype).reshape(arr.shape)
    hd = c.head_dim
    back = got.reshape(c.n_heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(arr.shape)
    np.testing.assert_array_equal(back, arr)


def test_llama_cpp_runs_the_export(exported):
    llama_cpp = pytest.importorskip("llama_cpp")
    m, p = exported
    if m.weight_dtype != "f32":
        pytest.skip("logits compared on the f32 export")
    from infeng.model.reference import ReferenceModel
    ids = [1, 403, 407, 263, 31, 45]
    llm = llama_cpp.Llama(model_path=str(p), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[len(ids) - 1])
    want = ReferenceModel(m).forward(ids)[-1]
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)


def test_official_reader_parses_the_export(exported):
    gguf = pytest.importorskip("gguf")          # llama.cpp's gguf-py, when installed
    m, p = exported
    r = gguf.GGUFReader(str(p))
    assert len(r.tensors) == 2 + 9 * m.config.n_layers
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight")
    assert list(t.shape) == [m.config.hidden_dim, m.config.dim]


def test_byte_level_tokenizer_exported_as_gpt2_vocabulary(data_dir, tmp_path):
    """A byte-level BPE tokenizer (Llama 3, SmolLM) goes out as tokenizer.ggml.model "gpt2" with
    its merges and pre-tokenizer name, and the vocabulary alone rebuilds the same tokenizer."""
    import json

    from tokenizers import Tokenizer

    from infeng.converters.gguf_file import GGUFFile
    from infeng.converters.gguf_tokenizer import build, gpt2_tokenizer
    from test_gguf_types import _byte_chars
    m = load_model(data_dir / "stories260K")
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = _byte_chars() + ["Ġt", "he", "Ġthe"]
    tokens += [f"x{i}" for i in range(m.config.vocab_size - len(tokens) - 2)] + ["<s>", "</s>"]
    spec = gpt2_tokenizer(tokens, merges, "llama-bpe", "test")
    spec.update(version="1.0", post_processor=None, added_tokens=[
        {"id": len(tokens) - 2, "content": "<s>", "special": True, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False}])
    m.tokenizer = {"json": json.dumps(spec), "add_bos": False, "chat_template": None}
    g = GGUFFile(G.write_gguf(m, tmp_path / "bl.gguf"))
    assert g.metadata["tokenizer.ggml.model"] == "gpt2" and g.metadata["tokenizer.ggml.pre"] == "llama-bpe"
    assert g.metadata["tokenizer.ggml.merges"] == merges
    assert g.metadata["tokenizer.ggml.token_type"][len(tokens) - 2] == 3
    del g.metadata["tokenizer.huggingface.json"]
    rebuilt, _, _ = build(g, "test")
    a, b = Tokenizer.from_str(m.tokenizer["json"]), Tokenizer.from_str(rebuilt["json"])
    for text in ["the cat", " the 123 thé\n"]:
        assert a.encode(text).ids == b.encode(text).ids, text


def test_llama2_vocabulary_scores_keep_the_merge_order(data_dir, tmp_path):
    """The exported SentencePiece scores rebuild Llama 2's tokenizer exactly (with -id scores,
    runs of spaces merged into "▁▁" first and differed)."""
    import json
    from types import SimpleNamespace

    from gguf_build import gguf
    from infeng.converters.gguf_file import GGUFFile
    from infeng.converters.gguf_tokenizer import build
    from infeng.runtime.tokenizer import Tokenizer
    tj = (data_dir / "llama2-tokenizer" / "tokenizer.json").read_text()
    stub = SimpleNamespace(tokenizer={"json": tj}, config=SimpleNamespace(vocab_size=32000))
    p = tmp_path / "vocab.gguf"
    p.write_bytes(gguf(G._vocab(stub) + [G._kv("tokenizer.ggml.bos_token_id", G.U32, 1)], []))
    spec, bos, _ = build(GGUFFile(p), str(p))
    a, b = Tokenizer({"json": tj}, 1, (2,)), Tokenizer(spec, bos, (2,))
    qs = [json.loads(x)["question"] for x in (data_dir / "evals" / "gsm8k_test.jsonl").read_text().splitlines()[:200]]
    text = (data_dir / "text" / "tinystories_sample.txt").read_text()
    for s in qs + [text, "  two  spaces", "tabs\tand\nnewlines ✓ 日本"]:
        assert a.encode(s) == b.encode(s), s[:60]


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q5_0"])
def test_llama_cpp_runs_a_quantized_export_like_infeng(qtype, data_dir, tmp_path):
    """The issue's interop check: a quantized file infeng wrote, exported to GGUF, runs in llama.cpp
    with infeng's next-token distributions. Not bit-equal: both round activations to int8 per block
    of 32, with other tie and scale details (and llama.cpp rounds a bf16 fallback's activations to
    bf16), ~0.1 on a logit here, so greedy runs part at near ties. Measured: KL 3.9e-4 (q8_0) and
    5.4e-4 (q4_0) between the two, below either's KL to the f32 model (6.6e-4, 0.07); an export with
    a wrong layout (RoPE rows, block order) is off by orders of magnitude more."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from typer.testing import CliRunner

    from infeng.cli.main import app
    from infeng.runtime.scorer import Scorer, log_softmax
    q = tmp_path / f"s-{qtype}.infeng"
    r = CliRunner().invoke(app, ["quantize", str(data_dir / "stories260K-f32"), "-o", str(q), "--type", qtype])
    assert r.exit_code == 0, r.output
    m = load_model(q)
    g = G.write_gguf(m, tmp_path / f"s-{qtype}.gguf")
    sc = Scorer(m, threads=1, ctx=128)
    ids = sc.tokenizer.encode((data_dir / "text" / "tinystories_sample.txt").read_text()[:400])[:100]
    ours = log_softmax(sc.logits(ids))
    llm = llama_cpp.Llama(model_path=str(g), n_ctx=128, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    theirs = log_softmax(np.asarray(llm.scores[:len(ids)]))
    kl = (np.exp(ours) * (ours - theirs)).sum(1)
    assert kl.mean() < 1e-3 and np.mean(ours.argmax(1) == theirs.argmax(1)) > 0.95


def test_llama_cpp_peer_batches_rows_like_single_sequences(exported):
    """The bench peer's batched decode (many sequences in one llama.cpp context) gives each row
    the greedy tokens of that row decoded alone."""
    pytest.importorskip("llama_cpp")
    from infeng.bench.peers import LlamaCppPeer, LlamaCppSeqs
    m, p = exported
    peer = LlamaCppPeer(m, 1, 128, gguf=p)
    prompts = [[1, 403, 407, 263], [1, 31, 45, 99], [1, 200, 300, 400]]
    alone = []
    for ids in prompts:
        peer.llm.reset()
        peer.llm.eval(ids)
        out = [peer._next()]
        for _ in range(7):
            peer.llm.eval([out[-1]])
            out.append(peer._next())
        alone.append(out)
    seqs = LlamaCppSeqs(peer.llm, 1, 128, 64, len(prompts))
    nxt = seqs.decode([(i, ids, 0) for i, ids in enumerate(prompts)])
    rows = [[t] for t in nxt]
    for j in range(7):
        nxt = seqs.decode([(i, [r[-1]], 4 + j) for i, r in enumerate(rows)])
        for r, t in zip(rows, nxt):
            r.append(t)
    assert rows == alone
    tokens, dt = peer.batch_decode(prompts, 5)
    assert tokens == 3 * 4 and dt > 0
    seqs.close()
    peer.close()
