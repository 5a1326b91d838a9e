"""A Q4_K_M-style GGUF (Q4_K and Q6_K matrices beside F32 ones) converts to a native model whose
k-quant matrices are the dequantized blocks (bf16 by default, f32 with --dtype f32), Q/K rows
un-permuted, and the summary says so."""
import json

import numpy as np
import pytest

from infeng.cli.main import main
from infeng.converters import gguf_read, gguf_types
from infeng.converters.gguf_write import write_gguf
from infeng.format.schema import convert_dtype, expected_shapes, is_norm
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


@pytest.mark.parametrize("dtype", [None, "f32"])
def test_k_quants_dequantized(tmp_path, dtype):
    cfg, mixed, blocks = _tiny_256(tmp_path)
    m, info = load_gguf(mixed, k_quant_dtype=dtype)
    want_dt = dtype or "bf16"
    assert info["dequantized"] == {"Q4_K": 1, "Q6_K": 1} and info["k_quant_dtype"] == want_dt
    wq = gguf_read.unpermute_rope(gguf_types.dequantize_q4_k(blocks["blk.0.attn_q.weight"], 256 * 256)
                                  .reshape(256, 256), cfg.n_heads)
    down = gguf_types.dequantize_q6_k(blocks["blk.0.ffn_down.weight"], 256 * 256).reshape(256, 256)
    for name, want in (("layers.0.wq", wq), ("layers.0.w_down", down)):
        dt, arr = m.tensors[name]
        assert dt == want_dt
        np.testing.assert_array_equal(arr, convert_dtype(want, "f32", want_dt))
    assert m.tensors["layers.0.wk"][0] == "f32"


def test_cli_summary_names_the_conversion(capsys, tmp_path):
    _, mixed, _ = _tiny_256(tmp_path)
    out = tmp_path / "m.infeng"
    assert main(["convert", str(mixed), "-o", str(out)]) == 0
    cap = capsys.readouterr()
    text = " ".join((cap.out + cap.err).split())
    assert "Q4_K/Q6_K dequantized to bf16" in text and "1×Q4_K" in text
    assert load_model(out).tensors["layers.0.wq"][0] == "bf16"
