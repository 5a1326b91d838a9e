"""Q4_K / Q6_K numpy dequantizers: against a per-element loop written from the block layout
(always), and against llama.cpp's gguf-py (when installed). Also the type table vs gguf-py."""
import numpy as np
import pytest

from infeng.converters import gguf_types as T


def _blocks(rng, n_blocks, nbytes, scale_at):
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for at in scale_at:      # sane f16 scales (random bytes could be inf/nan)
        raw[:, at:at + 2] = rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16)[:, None].view(np.uint8)
    return raw


def _f16(b0, b1):
    return float(np.frombuffer(bytes([b0, b1]), np.float16)[0])


def q4_k_loop(block):
    d, dmin = _f16(*block[0:2]), _f16(*block[2:4])
    s, qs = block[4:16], block[16:]
    out = []
    for j in range(8):                      # sub-block j: 6-bit scale and min
        if j < 4:
            sc, m = s[j] & 63, s[j + 4] & 63
        else:
            sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)
            m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4)
        for l in range(32):
            byte = qs[(j // 2) * 32 + l]
            q = byte & 0xF if j % 2 == 0 else byte >> 4
            out.append(np.float32(d * sc) * q - np.float32(dmin * m))
    return out


def q6_k_loop(block):
    ql, qh, sc = block[0:128], block[128:192], block[192:208].view(np.int8)
    d = _f16(*block[208:210])
    out = [0.0] * 256
    for half in range(2):
        for l in range(32):
            h = qh[half * 32 + l]
            lo0, lo1 = ql[half * 64 + l], ql[half * 64 + l + 32]
            qs = [(lo0 & 0xF) | ((h & 3) << 4), (lo1 & 0xF) | (((h >> 2) & 3) << 4),
                  (lo0 >> 4) | (((h >> 4) & 3) << 4), (lo1 >> 4) | (((h >> 6) & 3) << 4)]
            for k in range(4):
                out[half * 128 + k * 32 + l] = d * sc[half * 8 + k * 2 + l // 16] * (int(qs[k]) - 32)
    return out


@pytest.mark.parametrize("n_blocks", [1, 3])
def test_q4_k_matches_loop(n_blocks):
    raw = _blocks(np.random.default_rng(1), n_blocks, 144, (0, 2))
    got = T.dequantize_q4_k(raw, n_blocks * 256)
    want = np.concatenate([q4_k_loop(b) for b in raw]).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n_blocks", [1, 3])
def test_q6_k_matches_loop(n_blocks):
    raw = _blocks(np.random.default_rng(2), n_blocks, 210, (208,))
    got = T.dequantize_q6_k(raw, n_blocks * 256)
    want = np.concatenate([q6_k_loop(b) for b in raw]).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,nbytes,scales", [("Q4_K", 144, (0, 2)), ("Q6_K", 210, (208,))])
def test_k_quants_match_gguf_py(name, nbytes, scales):
    gguf = pytest.importorskip("gguf")
    from gguf import quants
    raw = _blocks(np.random.default_rng(3), 5, nbytes, scales)
    want = quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType[name]).reshape(-1)
    np.testing.assert_allclose(T.dequantize(name, raw, 5 * 256), want, rtol=1e-6, atol=1e-7)


def test_type_table_matches_gguf_py():
    gguf = pytest.importorskip("gguf")
    for qt, (block, nbytes) in gguf.GGML_QUANT_SIZES.items():
        # Q8_1 is 36 bytes in ggml (two f16 + 32 int8); some gguf-py releases say 40 (f32 d and s)
        if int(qt) in T.GGML_TYPES and qt.name != "Q8_1":
            assert T.GGML_TYPES[int(qt)] == (qt.name, block, nbytes), qt


def test_unsupported_type_named():
    with pytest.raises(Exception, match="IQ2_XXS cannot be converted"):
        T.dequantize("IQ2_XXS", np.zeros(66, np.uint8), 256)


class _Meta:
    """Stands in for a GGUFFile's typed metadata access (gguf_tokenizer.build only uses get)."""

    def __init__(self, meta):
        self.meta = meta

    def get(self, key, kind, default=None, required=False):
        if key not in self.meta:
            assert not required, key
            return default
        return self.meta[key]


def _byte_chars():
    """GPT-2's byte → printable character table, written out from its definition."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_gpt2_vocabulary_builds_a_byte_level_tokenizer(pre):
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    from infeng.converters.gguf_tokenizer import build
    chars = _byte_chars()
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]
    tokens = chars + [m.replace(" ", "") for m in merges] + ["<|begin|>", "<|end|>"]
    n = len(tokens)
    types = [1] * (n - 2) + [3, 3]
    spec, bos, eos = build(_Meta({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                                  "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
                                  "tokenizer.ggml.pre": pre, "tokenizer.ggml.bos_token_id": n - 2,
                                  "tokenizer.ggml.eos_token_id": n - 1}), "t.gguf")
    assert (bos, eos) == (n - 2, (n - 1,))
    got = Tokenizer.from_str(spec["json"])
    ref = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges]))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = decoders.ByteLevel()
    for text in ["the cat in a hat", "ünïcode ✓ 12345", "  two  spaces\nnew line"]:
        ids = got.encode(text, add_special_tokens=False).ids
        if pre == "gpt-2":        # llama-bpe splits digits and spaces differently: only the decode is compared
            assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert got.decode(ids) == text
    # BOS only where llama.cpp adds it without an add_bos_token key: the Llama 3 split
    assert (got.encode("the", add_special_tokens=True).ids[0] == n - 2) == (pre == "llama-bpe")
    assert spec["add_bos"] == (pre == "llama-bpe")
    assert got.encode(" the", add_special_tokens=False).ids == [tokens.index("Ġthe")]
