"""The real model, SmolLM2-135M-Instruct (Q4_1 GGUF, `make model`), against llama.cpp's recorded
view of the same file (tests/fixtures/smollm2/llamacpp.json, tools/record_smollm2_fixture.py):
its tokenizer, its chat template, its greedy tokens on ten prompts; and a chat that answers."""
import json
from pathlib import Path

import numpy as np
import pytest

from infeng.converters.gguf_read import GGUFFile
from infeng.converters.gguf_tokenizer import build
from infeng.runtime.tokenizer import Tokenizer

FIX = json.loads((Path(__file__).parent / "fixtures" / "smollm2" / "llamacpp.json").read_text())


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    spec, bos, eos = build(GGUFFile(smollm2_gguf), str(smollm2_gguf))
    return Tokenizer(spec, bos, eos)


@pytest.mark.parametrize("case", FIX["tokenize"], ids=lambda c: repr(c["text"][:24]))
def test_tokenizer_matches_llamacpp(tok, case):
    assert tok.encode(case["text"]) == case["ids"]


def test_tokens_decode_back_to_the_text(tok):
    for case in FIX["tokenize"]:
        if "<|" not in case["text"]:
            assert tok.decode(case["ids"]) == case["text"]


def test_chat_template_renders_as_llamacpp(tok):
    chats = [p for p in FIX["prompts"] if "messages" in p]
    assert len(chats) >= 5
    for p in chats:
        assert tok.render_chat(p["messages"]) == p["text"]
        assert tok.chat_ids(p["messages"]) == p["prompt_ids"]
    assert tok.add_bos is False and tok.end_of_turn_ids == (2,)        # <|im_end|>
