"""Byte-level BPE tokenizers as models ship them: GGUF "gpt2" vocabularies with each pre-tokenizer
split (GPT-2, SmolLM, Llama 3, Qwen2), BOS rules, end-of-turn tokens, and HF folders'
tokenizer_config.json (add_bos_token, chat templates)."""
import json
import shutil

import pytest
from tokenizers.pre_tokenizers import ByteLevel

from infeng.converters import gguf_tokenizer as gt
from infeng.converters.hf_tokenizer import load_tokenizer_files
from infeng.errors import InfengError
from infeng.runtime.tokenizer import Tokenizer

BYTES = sorted(ByteLevel.alphabet())             # the 256 byte-level characters
# merged pieces: "12", "123", "Ã©" (é = c3 a9 in byte-level characters), "Ġ1"
MERGES = ["1 2", "12 3", "Ã ©", "Ġ 1"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIAL + BYTES + ["12", "123", "Ã©", "Ġ1"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class FakeGGUF:
    """The metadata side of a GGUFFile (what gguf_tokenizer.build reads)."""
    path = "fake.gguf"

    def __init__(self, **md):
        self.md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": TOKENS,
                   "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(TOKENS) - 3),
                   "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.bos_token_id": 1,
                   "tokenizer.ggml.eos_token_id": 0}
        self.md.update(md)

    def get(self, key, kind, default=None, required=False):
        if key not in self.md or self.md[key] is None:
            if required:
                raise InfengError(f"{self.path}: missing required metadata {key!r}")
            return default
        return self.md[key]


def tok_for(pre: str, **md) -> Tokenizer:
    spec, bos, eos = gt.build(FakeGGUF(**{"tokenizer.ggml.pre": pre, **md}), "fake.gguf")
    return Tokenizer(spec, bos, eos)


def pieces(tok, text):
    return [tok.tk.id_to_token(i) for i in tok.encode_plain(text)]


@pytest.mark.parametrize("pre, want", [
    ("gpt2", ["123", "4"]),                   # GPT-2's regex keeps a number whole: merges make "123"
    ("smollm", ["1", "2", "3", "4"]),         # SmolLM: every digit on its own
    ("qwen2", ["1", "2", "3", "4"]),          # Qwen2: \p{N} one at a time
    ("llama-bpe", ["123", "4"]),              # Llama 3: up to three digits per piece
])
def test_digit_split_follows_the_pre_tokenizer(pre, want):
    assert pieces(tok_for(pre), "1234") == want


def test_space_digit_merges_only_where_the_split_allows():
    assert pieces(tok_for("gpt2"), "a 1") == ["a", "Ġ1"]            # " 1" is one GPT-2 piece
    assert pieces(tok_for("smollm"), "a 1") == ["a", "Ġ", "1"]      # the digit is split off the space
    assert pieces(tok_for("gpt2"), "a 12") == ["a", "Ġ", "12"]      # "1 2" outranks "Ġ 1"


def test_qwen2_normalizes_to_nfc_first():
    decomposed = "e\u0301"      # e + combining acute
    assert pieces(tok_for("qwen2"), decomposed) == ["Ã©"]          # NFC → é → one merged piece
    assert len(pieces(tok_for("gpt2"), decomposed)) == 3           # no normalizer: e + two bytes


def test_unknown_pre_tokenizer_is_refused_by_name():
    with pytest.raises(InfengError, match="tokenizer.ggml.pre 'tekken' is not supported"):
        tok_for("tekken")


def test_bos_rules():
    assert tok_for("gpt2").encode("12") == [TOKENS.index("12")]            # byte-level BPE: no BOS by default
    assert tok_for("smollm").encode("12")[0] != 1
    assert tok_for("llama-bpe").encode("12")[0] == 1                        # Llama 3 adds it
    assert tok_for("llama-bpe", **{"tokenizer.ggml.add_bos_token": False}).encode("12")[0] != 1
    assert tok_for("smollm", **{"tokenizer.ggml.add_bos_token": True}).encode("12")[0] == 1


def test_special_tokens_in_text_are_single_ids_and_decode_away():
    t = tok_for("gpt2")
    ids = t.encode_plain("<|im_start|>user\n12<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and TOKENS.index("12") in ids
    assert t.decode(ids) == "user\n12"
    assert t.decode(ids, keep_special=True) == "<|im_start|>user\n12<|im_end|>"


def test_end_of_turn_comes_from_the_template_and_eot_keys():
    t = tok_for("smollm", **{"tokenizer.chat_template": CHATML})
    assert t.eos_ids == {0}
    assert t.end_of_turn_ids == (2,)                   # what the template writes after a reply
    assert t.chat_stop_ids == (0, 2)
    t = tok_for("smollm", **{"tokenizer.ggml.eot_token_id": 2})
    assert t.eos_ids == {0, 2}                         # GGUF's end-of-turn id stops generation too
    assert t.end_of_turn_ids == ()                     # no template, nothing more


def test_end_of_turn_probe_tolerates_a_picky_template():
    picky = "{% if messages[-1]['role'] != 'user' %}{{ raise_exception('last turn must be the user') }}{% endif %}" + CHATML
    t = tok_for("smollm", **{"tokenizer.chat_template": picky})
    assert t.end_of_turn_ids == () and t.chat_stop_ids == (0,)
    assert t.render_chat([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_gguf_export_names_the_split(tmp_path):
    """A tokenizer.json with SmolLM's / Qwen2's pre-tokenizer exports with llama.cpp's pre name."""
    for pre, name in (("smollm", "smollm"), ("qwen2", "qwen2"), ("llama-bpe", "llama-bpe"), ("gpt2", "default")):
        spec = json.loads(gt.build(FakeGGUF(**{"tokenizer.ggml.pre": pre}), "x")[0]["json"])
        assert gt.pre_name(spec["pre_tokenizer"]) == name


# ---- Hugging Face folders -------------------------------------------------------------------

def hf_folder(tmp_path, data_dir, config: dict | None, **files):
    d = tmp_path / "tok"
    d.mkdir(parents=True)
    shutil.copy(data_dir / "stories260K" / "tokenizer.json", d / "tokenizer.json")
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (d / name.replace("_jinja", ".jinja")).write_text(text)
    return d


def test_hf_bos_from_config_or_post_processor(tmp_path, data_dir):
    assert load_tokenizer_files(hf_folder(tmp_path, data_dir, None))["add_bos"] is True   # its template adds <s>
    spec = load_tokenizer_files(hf_folder(tmp_path / "a", data_dir, {"add_bos_token": False}))
    assert spec["add_bos"] is False
    assert Tokenizer(spec, 1, (2,)).encode("Once upon a time") == [403, 407, 261, 378]   # the post-processor's <s> dropped too
    tj = json.loads((data_dir / "stories260K" / "tokenizer.json").read_text())
    tj["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    d = hf_folder(tmp_path / "b", data_dir, {})
    (d / "tokenizer.json").write_text(json.dumps(tj))
    assert load_tokenizer_files(d)["add_bos"] is False           # GPT-2 style: nothing before the text


def test_hf_chat_template_sources(tmp_path, data_dir):
    d = hf_folder(tmp_path / "a", data_dir, {"chat_template": [{"name": "tool_use", "template": "T"},
                                                                {"name": "default", "template": "D"}]})
    assert load_tokenizer_files(d)["chat_template"] == "D"
    d = hf_folder(tmp_path / "b", data_dir, {}, chat_template_jinja="J{{ messages[0]['content'] }}")
    assert load_tokenizer_files(d)["chat_template"] == "J{{ messages[0]['content'] }}"


@pytest.mark.parametrize("config, message", [
    ({"add_bos_token": "yes"}, "add_bos_token must be true or false"),
    ({"chat_template": 7}, "chat_template must be a string"),
    ({"chat_template": [{"name": "tool_use", "template": "T"}]}, "no 'default'"),
])
def test_hf_bad_tokenizer_config(tmp_path, data_dir, config, message):
    with pytest.raises(InfengError, match=message):
        load_tokenizer_files(hf_folder(tmp_path, data_dir, config))
