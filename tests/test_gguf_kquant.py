"""A Q4_K_M-style GGUF (Q4_K and Q6_K matrices beside F32 ones) converts to a native model whose
k-quant matrices are the file's blocks, copied (native q4_k / q6_k), Q/K rows un-permuted; they
compute what ggml's layout says (gguf_types' independent dequantizers), and export back to GGUF
byte for byte."""
import json

import numpy as np
import pytest

from infeng.cli.main import main
from infeng.converters import gguf_file, gguf_read, gguf_types
from infeng.converters.gguf_write import write_gguf
from infeng.format.schema import expected_shapes, is_norm
from infeng.format.config import ModelConfig
from infeng.model.loader import Model, load_gguf, load_model

from gguf_build import rewrite

Q4_K, Q6_K = 12, 14


def _tiny_256(tmp_path):
    cfg = ModelConfig(dim=256, hidden_dim=256, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=64, vocab_size=8,
                      max_seq_len=64, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=True, bos_id=1, eos_ids=(2,))
    rng = np.random.default_rng(0)
    tensors = {n: ("f32", np.ones(s, np.float32) if is_norm(n) else rng.standard_normal(s).astype(np.float32) * 0.02)
               for n, s in expected_shapes(cfg).items()}
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "ab"])}
    tok = {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None, "post_processor": None,
           "decoder": None, "model": {"type": "BPE", "vocab": vocab, "merges": [["\u2581", "a"], ["a", "b"]],
                                      "unk_token": "<unk>", "byte_fallback": False}}
    src = tmp_path / "f32.gguf"
    write_gguf(Model(cfg, tensors, {"json": json.dumps(tok), "add_bos": True, "chat_template": None}), src)
    blocks = {}

    def to_k_quants(meta, ts):
        for i, (name, dims, t, raw) in enumerate(ts):
            kind = {"blk.0.attn_q.weight": (Q4_K, 144, (0, 2)), "blk.0.ffn_down.weight": (Q6_K, 210, (208,))}.get(name)
            if kind:
                tid, nbytes, scales = kind
                b = rng.integers(0, 256, size=(dims[0] * dims[1] // 256, nbytes), dtype=np.uint8)
                for at in scales:
                    b[:, at:at + 2] = rng.uniform(0.001, 0.01, len(b)).astype(np.float16)[:, None].view(np.uint8)
                blocks[name] = b
                ts[i] = (name, dims, tid, b.tobytes())
    mixed = tmp_path / "mixed.gguf"
    rewrite(src, mixed, to_k_quants)
    return cfg, mixed, blocks


def test_k_quants_copied(tmp_path):
    cfg, mixed, blocks = _tiny_256(tmp_path)
    m, info = load_gguf(mixed)
    assert info["dequantized"] == {} and info["types"]["Q4_K"] == 1 and info["types"]["Q6_K"] == 1
    wq_rows = gguf_read.unpermute_rope(blocks["blk.0.attn_q.weight"].reshape(256, -1), cfg.n_heads)
    for name, dt, want in (("layers.0.wq", "q4_k", wq_rows), ("layers.0.w_down", "q6_k", blocks["blk.0.ffn_down.weight"])):
        got_dt, arr = m.tensors[name]
        assert got_dt == dt
        np.testing.assert_array_equal(arr, want.reshape(arr.shape))
    # the native dequantizers (what the kernels compute) agree with ggml's layout
    wq = gguf_read.unpermute_rope(gguf_types.dequantize_q4_k(blocks["blk.0.attn_q.weight"], 256 * 256)
                                  .reshape(256, 256), cfg.n_heads)
    down = gguf_types.dequantize_q6_k(blocks["blk.0.ffn_down.weight"], 256 * 256).reshape(256, 256)
    np.testing.assert_allclose(m.f32("layers.0.wq"), wq, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(m.f32("layers.0.w_down"), down)
    assert m.tensors["layers.0.wk"][0] == "f32"


def test_cli_converts_and_exports_back(capsys, tmp_path):
    _, mixed, blocks = _tiny_256(tmp_path)
    out, back = tmp_path / "m.infeng", tmp_path / "back.gguf"
    assert main(["convert", str(mixed), "-o", str(out)]) == 0
    cap = capsys.readouterr()
    text = " ".join((cap.out + cap.err).split())
    assert "1×Q4_K" in text and "1×Q6_K" in text and "dequantized" not in text
    assert load_model(out).tensors["layers.0.wq"][0] == "q4_k"
    assert main(["convert", str(out), "--to", "gguf", "-o", str(back)]) == 0
    g = gguf_file.GGUFFile(back)
    for name in blocks:
        assert g.tensors[name].type_name == {"blk.0.attn_q.weight": "Q4_K", "blk.0.ffn_down.weight": "Q6_K"}[name]
        np.testing.assert_array_equal(g.raw(name), blocks[name].ravel())
