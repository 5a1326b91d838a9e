"""Sliding-window models (Mistral, Phi-3) in the engine: a prompt several windows long is
prefilled a chunk at a time, the blocks the window no longer reads go back as it goes, and the
KV pool is sized for window + chunk per sequence, not the context, while the logits stay the
numpy reference's (which attends to the window over the full history)."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from infeng.model.loader import load_model
from infeng.model.reference import ReferenceModel
from infeng.runtime.engine import Engine, FinishEvent, Request
from infeng.runtime.sampler import SamplingParams

FIXTURES = Path(__file__).parent / "fixtures" / "arch"


def run_watched(eng: Engine, reqs: list[Request]):
    """Run to completion; returns results by id, the logits rows each request sampled from,
    and the most blocks any one sequence / all sequences held after a step's admission."""
    rows: dict[str, list[np.ndarray]] = {r.id: [] for r in reqs}
    for r in reqs:
        r.params = replace(r.params, logits_processor=lambda ids, lg, rid=r.id: rows[rid].append(lg.copy()))
        eng.submit(r)
    done, most_seq, most_all = {}, 0, 0
    orig_admit = eng.sched.admit

    def admit(now):     # measure right after admission: the step's blocks are all granted then
        out = orig_admit(now)
        nonlocal most_seq, most_all
        for s in eng.sched.running:
            most_seq = max(most_seq, eng.kv.held(s.slot))
        most_all = max(most_all, eng.kv.blocks_used())
        return out
    eng.sched.admit = admit
    while eng.busy:
        for ev in eng.step():
            if isinstance(ev, FinishEvent):
                done[ev.result.id] = ev.result
    return done, rows, most_seq, most_all


@pytest.mark.parametrize("name", ["mistral", "phi3"])
def test_long_prompt_holds_window_not_context(name):
    model = load_model(FIXTURES / name)
    c = model.config
    W, bs, chunk = c.sliding_window, 2, 4
    assert W and len(c.swa_layers) == c.n_layers
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, c.vocab_size, 8 * W)]       # eight windows
    n_new = 6
    eng = Engine(model, threads=1, max_batch=2, max_batch_tokens=chunk, block_size=bs, max_seq_len=c.max_seq_len)
    kv = eng.kv
    cap = (W + chunk - 2) // bs + 2
    assert kv.seq_blocks == cap < kv.max_blocks
    assert kv.n_blocks == 2 * cap                      # the pool: window + chunk per slot
    params = SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True)
    done, rows, most_seq, _ = run_watched(eng, [Request("a", prompt_ids=prompt, params=params)])
    got = done["a"].token_ids
    assert len(got) == n_new and most_seq <= cap
    want = ReferenceModel(model).forward(prompt + got[:-1])[len(prompt) - 1:]
    assert np.abs(np.array(rows["a"]) - want).max() <= 1e-3 * np.abs(want).max()
    assert got == [int(t) for t in want.argmax(-1)]
    assert eng.stats.prefill_tokens == len(prompt) and eng.stats.steps >= len(prompt) // chunk


def test_two_long_prompts_and_a_prefix_hit_stay_bounded():
    """Two sequences prefilling side by side share the step's budget and the bounded pool; the
    same prompt again reuses the cached blocks of its last window only (older ones need not be
    cached), with the same tokens."""
    model = load_model(FIXTURES / "mistral")
    c = model.config
    W, bs, chunk = c.sliding_window, 2, 6
    rng = np.random.default_rng(1)
    p1 = [int(t) for t in rng.integers(3, c.vocab_size, 6 * W)]
    p2 = [int(t) for t in rng.integers(3, c.vocab_size, 7 * W)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    eng = Engine(model, threads=1, max_batch=2, max_batch_tokens=chunk, block_size=bs, max_seq_len=c.max_seq_len)
    done, _, most_seq, most_all = run_watched(eng, [Request("a", prompt_ids=p1, params=params),
                                                    Request("b", prompt_ids=p2, params=params)])
    assert most_seq <= eng.kv.seq_blocks and most_all <= eng.kv.n_blocks
    ref = ReferenceModel(model)
    assert done["a"].token_ids == ref.greedy(p1, 5)
    assert done["b"].token_ids == ReferenceModel(model).greedy(p2, 5)
    again, _, most_seq, _ = run_watched(eng, [Request("c", prompt_ids=p2, params=params)])
    assert again["c"].cached_tokens >= len(p2) - W - 2 * bs and most_seq <= eng.kv.seq_blocks
    assert again["c"].token_ids == done["b"].token_ids


def test_budget_check_counts_the_window():
    """A KV budget that holds one window + chunk is enough for a windowed model of any context."""
    model = load_model(FIXTURES / "mistral")
    c = model.config
    cap = (c.sliding_window + 4 - 2) // 2 + 2
    eng = Engine(model, threads=1, max_batch=1, max_batch_tokens=4, block_size=2, max_seq_len=c.max_seq_len,
                 kv_budget_mb=2 * c.n_layers * 2 * c.kv_dim * 4 * cap / 2**20)
    assert eng.kv.n_blocks == cap == eng.kv.seq_blocks
    prompt = list(range(3, 3 + 5 * c.sliding_window))
    (r,) = eng.generate([Request("a", prompt_ids=prompt, params=SamplingParams(max_tokens=3, temperature=0,
                                                                               ignore_eos=True))])
    assert r.token_ids == ReferenceModel(model).greedy(prompt, 3)

