"""LongRoPE and dynamic NTK past the original length, in the engine as transformers generates:
a forward call's frequencies follow its highest position (a prompt's own length, each decoded
token position + 1), so K/V computed for a prompt longer than the original length differ from
the same tokens' under a shorter prompt — the prefix cache keeps them apart — and the scorer
runs a window as one call. (Logits and greedy tokens against transformers: test_architectures,
fixtures phi3_longrope_past and llama_dynamic.)"""
import json
from pathlib import Path

import numpy as np
import pytest

from infeng.model.loader import load_model
from infeng.model.reference import ReferenceModel
from infeng.runtime.engine import Engine, Request
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.scorer import Scorer

FIXTURES = Path(__file__).parent / "fixtures" / "arch"
NAMES = ["phi3_longrope_past", "llama_dynamic"]


def load(name):
    d = FIXTURES / name
    return load_model(d), json.loads((d / "reference.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_prefix_cache_keeps_rope_classes_apart(name):
    model, ref = load(name)
    orig = model.config.rope_past()
    a = ref["prompt"]                                                  # 12 tokens, under the original 16
    longer = a + ref["greedy"][:8]                                     # 20: past it, the same first 12
    shorter = a + ref["greedy"][:3]                                    # 15: under it
    eng = Engine(model, threads=1, max_batch=2, block_size=4)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    got = {}
    for rid, p in (("a", a), ("long", longer), ("short", shorter)):
        (r,) = eng.generate([Request(rid, prompt_ids=p, params=params)])
        got[rid] = r
        assert r.token_ids == ReferenceModel(model).greedy(p, 6), rid
    assert len(longer) > orig >= len(shorter)
    assert got["long"].cached_tokens == 0            # a's blocks rotate by base frequencies: not its
    assert got["short"].cached_tokens >= 8           # same class as a: a's full blocks are reused


@pytest.mark.parametrize("name", NAMES)
def test_scorer_window_is_one_call(name):
    model, ref = load(name)
    seq = ref["prompt"] + ref["greedy"]
    got = Scorer(model, threads=1, max_tokens=5).logits(seq)           # in chunks of 5 positions
    want = ReferenceModel(model).forward(seq)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
