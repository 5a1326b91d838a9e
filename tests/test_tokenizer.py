"""Tokenizer and streaming detokenization: pieces join to the whole text, no U+FFFD ever."""
import json

import pytest

from infeng.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llama2(data_dir):
    return Tokenizer({"json": (data_dir / "llama2-tokenizer" / "tokenizer.json").read_text(), "add_bos": True}, 1, (2,))


@pytest.fixture(scope="module")
def stories(data_dir):
    spec = {"json": (data_dir / "stories260K" / "tokenizer.json").read_text(), "add_bos": True}
    return Tokenizer(spec, 1, (2,))


def test_encode_adds_bos_and_empty_is_bos(stories):
    assert stories.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert stories.encode("") == [1]


TEXTS = ["héllo wörld", "世界 and 🙂🙃 emoji", "tab\tnew\nline  double  spaces", "ÆØÅ ß ñ ç — “quotes”", "a"]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_pieces_join_to_text_without_replacement_chars(llama2, text):
    ids = llama2.encode(text)
    s = llama2.stream(ids[:1])
    pieces = [s.push(t) for t in ids[1:]] + [s.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_split_multibyte_char_is_held_back_then_released(llama2):
    ids = llama2.encode("🙂")          # byte-fallback: four byte tokens
    byte_tokens = ids[-4:]
    s = llama2.stream(ids[:-4])
    assert [s.push(t) for t in byte_tokens[:3]] == ["", "", ""]   # incomplete UTF-8: held
    assert s.push(byte_tokens[3]).endswith("🙂")


def test_incomplete_sequence_at_the_end_is_flushed(llama2):
    ids = llama2.encode("🙂")
    s = llama2.stream(ids[:-4])
    for t in ids[-4:-1]:
        s.push(t)
    assert s.flush() != ""             # whatever is left comes out at the end, not silently dropped


def test_completion_keeps_leading_space(stories, data_dir):
    g = json.loads((data_dir / "stories260K" / "reference.json").read_text())["greedy"]
    text = stories.completion_text(g["prompt_ids"], g["new_ids"])
    assert "Once upon a time" + text == g["text"]
