"""The real model, SmolLM2-135M-Instruct (Q4_1 GGUF, `make model`), against llama.cpp's recorded
view of the same file (tests/fixtures/smollm2/llamacpp.json, tools/record_smollm2_fixture.py):
its tokenizer, its chat template, its greedy tokens on ten prompts; and a chat that answers."""
import json
from pathlib import Path

import numpy as np
import pytest

from infeng.converters.gguf_file import GGUFFile
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
# The yardstick: llama.cpp itself, keeping K/V in f32 as infeng does (its default is f16), agrees
# with its own recorded tokens only so well on this model (a 4-bit 135M model has many near-ties;
# the two K/V precisions move its logits by up to 3.6): FIX["llamacpp_f32_kv"], recorded with it.
REF = FIX["llamacpp_f32_kv"]


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    from infeng.model.loader import load_gguf
    m, _ = load_gguf(smollm2_gguf)
    return m


def test_greedy_tokens_match_llamacpp(model):
    """Teacher-forced over llama.cpp's 32 greedy tokens of each of the ten prompts: infeng picks
    llama.cpp's token about as often as llama.cpp with f32 K/V does, and where it does not, the
    two tokens are near-ties (within twice llama.cpp's own largest gap)."""
    from infeng.runtime.scorer import Scorer
    sc = Scorer(model, threads=2, ctx=256)
    exact, gaps = 0, []
    for p in FIX["prompts"]:
        n = len(p["prompt_ids"])
        rows = sc.logits(p["prompt_ids"] + p["greedy"][:-1])[n - 1:]
        for row, want in zip(rows, p["greedy"]):
            exact += int(np.argmax(row)) == want
            gaps.append(float(row.max() - row[want]))
    total = sum(len(p["greedy"]) for p in FIX["prompts"])
    assert total == 10 * FIX["n_greedy"] == 320
    assert max(gaps) <= 2 * REF["max_gap"], sorted(gaps)[-5:]
    assert exact >= REF["teacher_forced_equal"] - 0.025 * total, (exact, REF["teacher_forced_equal"])


def test_free_running_greedy_agrees(model):
    """The engine's own greedy continuations (as `generate -t 0 --ignore-eos` runs them): after a
    near-tie flip the texts part ways, so only the bulk is compared with llama.cpp's own f32-K/V run."""
    from infeng.bench.llamacpp_agreement import agreement, infeng_greedy
    from infeng.runtime.engine import Engine
    engine = Engine(model, threads=2, max_batch=10, max_seq_len=256)
    ours = infeng_greedy(engine, [p["prompt_ids"] for p in FIX["prompts"]], FIX["n_greedy"])
    a = agreement(ours, [p["greedy"] for p in FIX["prompts"]])
    assert a["positions_equal"] >= 0.7 * REF["free_running"]["positions_equal"], (a, REF["free_running"])
    assert sum(x >= 5 for x in a["leading_equal"]) >= 8, a       # the first tokens agree on nearly every prompt


def test_chat_answers_and_follows_up(model):
    from infeng.runtime.chat import ChatSession
    from infeng.runtime.engine import Engine
    from infeng.runtime.sampler import SamplingParams
    s = ChatSession(Engine(model, threads=2, max_batch=1, max_seq_len=512), SamplingParams(max_tokens=64, temperature=0))
    answer = "".join(s.send("What is the capital of Germany?"))
    assert "Berlin" in answer and s.turns[-1].finish_reason == "stop" and s.ids[-1] == 2     # ended at <|im_end|>
    follow = "".join(s.send("How many legs does a spider have?"))
    assert "8" in follow or "eight" in follow
    assert s.turns[-1].cached_tokens >= 16 * ((s.turns[0].prompt_tokens + s.turns[0].completion_tokens) // 16 - 1)
