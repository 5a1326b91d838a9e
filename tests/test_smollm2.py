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


# ---- the weights (Q4_1 tensors, loaded natively) ------------------------------------------------

TIE = 0.05      # logits: a disagreement with llama.cpp must be a near-tie at most (int8-rounded activations on both sides)


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    from infeng.converters.gguf_read import read_model
    m, _ = read_model(smollm2_gguf)
    return m


def test_greedy_tokens_match_llamacpp(model):
    """Teacher-forced over llama.cpp's 32 greedy tokens of each of the ten prompts: infeng's argmax
    is llama.cpp's token, or the two are within TIE of each other."""
    from infeng.runtime.scorer import Scorer
    sc = Scorer(model, threads=2, ctx=256)
    exact, gaps = 0, []
    for p in FIX["prompts"]:
        n = len(p["prompt_ids"])
        rows = sc.logits(p["prompt_ids"] + p["greedy"][:-1])[n - 1:]
        for row, want in zip(rows, p["greedy"]):
            top = int(np.argmax(row))
            exact += top == want
            if top != want:
                gaps.append(float(row[top] - row[want]))
    total = sum(len(p["greedy"]) for p in FIX["prompts"])
    assert total == 10 * FIX["n_greedy"] == 320
    assert all(g <= TIE for g in gaps), gaps
    assert exact >= 0.97 * total


def test_free_running_greedy_agrees(model):
    """The engine's own greedy continuation (as `generate -t 0 --ignore-eos` runs it)."""
    from infeng.bench.llamacpp_agreement import agreement, infeng_greedy
    from infeng.runtime.engine import Engine
    engine = Engine(model, threads=2, max_batch=10, max_seq_len=256)
    ours = infeng_greedy(engine, [p["prompt_ids"] for p in FIX["prompts"]], FIX["n_greedy"])
    a = agreement(ours, [p["greedy"] for p in FIX["prompts"]])
    assert a["identical_prompts"] >= 9, a


def test_chat_answers_and_follows_up(model):
    from infeng.runtime.chat import ChatSession
    from infeng.runtime.engine import Engine
    from infeng.runtime.sampler import SamplingParams
    s = ChatSession(Engine(model, threads=2, max_batch=1, max_seq_len=512), SamplingParams(max_tokens=64, temperature=0))
    answer = "".join(s.send("What is the capital of France?"))
    first = FIX["prompts"][0]
    assert first["messages"][0]["content"] == "What is the capital of France?"
    # the reply is llama.cpp's greedy continuation, up to and including <|im_end|>
    want = first["greedy"][:first["greedy"].index(2) + 1] if 2 in first["greedy"] else first["greedy"]
    assert s.ids[len(first["prompt_ids"]):][:len(want)] == want
    assert "Paris" in answer and s.turns[-1].finish_reason == "stop"
    follow = "".join(s.send("And what is the capital of Germany?"))
    assert "Berlin" in follow and s.turns[-1].cached_tokens >= 16
