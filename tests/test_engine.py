"""The engine: any batch mix, chunking, preemption or prefix sharing gives each request exactly
the tokens it gets alone, with every KV cache type (f32, bf16, int8, int4, f16 keys with fp8
values, mixed K/V, a per-layer policy: a position's stored codes depend on its own K/V row only,
so they hold there too); the
queue bound, cancel, deadlines and priorities behave; no block leaks."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from infeng.model.loader import load_model
from infeng.runtime.engine import Engine, FinishEvent, Request, TokenEvent
from infeng.runtime.sampler import SamplingParams

PROMPTS = ["Once upon a time", "Lily", "The little dog was very happy because", "",
           "Tom and Sue went to the park. They saw a big tree and", "One day", "Ben had a red ball",
           "Once upon a time, there was a little girl named Lily. She loved to play outside in the park"]


@pytest.fixture(scope="module")
def model(data_dir):
    return load_model(data_dir / "stories260K-f32")


# Engine keywords of each KV cache kind; the compressed layout needs blocks of 16 positions
KV_KINDS = {"f32": {}, "bf16": {"kv_dtype": "bf16"}, "int8": {"kv_dtype": "int8"},
            "k4v8": {"kv_dtype": "k=int4,v=int8"}, "int4-hybrid": {"kv_dtype": "int4", "kv_policy": "layers 0,-1: bf16"},
            "k16v8f": {"kv_dtype": "k=f16,v=fp8"}}


@pytest.fixture(scope="module", params=list(KV_KINDS))
def kv(request):
    return KV_KINDS[request.param]


def _bs(kv):
    """The smallest block size the KV kind allows (small blocks exercise the prefix cache more)."""
    return 4 if not kv else 16


@pytest.fixture(scope="module")
def alone(model, kv):
    """Each prompt's greedy ids, run by itself."""
    eng = Engine(model, threads=1, max_batch=1, **kv)
    out = {}
    for i, p in enumerate(PROMPTS):
        (r,) = eng.generate([_req(i, p, 40 + i)])
        out[i] = r.token_ids
    return out


def _req(i, prompt, n, **kw):
    return Request(id=str(i), prompt=prompt, params=SamplingParams(max_tokens=n, temperature=0, seed=1), **kw)


def _run(eng, reqs):
    return {r.id: r for r in eng.generate(reqs)}


def test_mixed_chunked_batches_equal_alone(model, alone, kv):
    eng = Engine(model, threads=2, max_batch=3, max_batch_tokens=7, **kv)     # prefill chunks of <= 7 tokens
    res = _run(eng, [_req(i, p, 40 + i) for i, p in enumerate(PROMPTS)])
    for i in range(len(PROMPTS)):
        assert res[str(i)].token_ids == alone[i], i
    assert eng.kv.blocks_used() == 0


def test_preemption_recomputes_and_equals_alone(model, kv):
    # blocks for 2 full sequences, 4 slots: running sequences must be preempted and recomputed.
    # A recomputed position's K/V row comes from a prefill product, the original from a decode
    # product: equal to f32 rounding, not bitwise. Sampling from f32 K/V shrugs that off; a
    # quantized cache can round such a row to the neighbouring code, which a sampled draw may
    # notice: those kinds decode greedily (argmax is robust to it).
    params = SamplingParams(max_tokens=400, temperature=0.8 if not kv else 0.0, seed=3, ignore_eos=True)
    reqs = [Request(id=str(i), prompt=p, params=params) for i, p in enumerate(PROMPTS)]
    solo = Engine(model, threads=1, max_batch=1, **kv)
    want = {r.id: r.token_ids for r in solo.generate(reqs)}
    budget = 2 * 32 * solo.kv.block_bytes / 2**20          # 2 x 512 positions, in this kind's bytes
    eng = Engine(model, threads=1, max_batch=4, kv_budget_mb=budget, **kv)
    got = {r.id: r for r in eng.generate(reqs)}
    assert eng.stats.preemptions > 0 and sum(r.preemptions for r in got.values()) == eng.stats.preemptions
    assert {k: r.token_ids for k, r in got.items()} == want      # sampled, not just greedy
    assert eng.kv.blocks_used() == 0


def test_prefix_sharing_hits_and_equals_alone(model, kv):
    prefix = PROMPTS[7] + ". " + PROMPTS[4]
    prompts = [prefix + x for x in (" and", " but the dog", " so they", " Lily")]
    bs = _bs(kv)
    solo = Engine(model, threads=1, max_batch=1, block_size=bs, **kv)
    want = {str(i): solo.generate([_req(i, p, 30)]).__next__().token_ids for i, p in enumerate(prompts)}
    eng = Engine(model, threads=1, max_batch=4, block_size=bs, **kv)
    first = _run(eng, [_req(0, prompts[0], 30)])          # fills the cache
    rest = _run(eng, [_req(i, p, 30) for i, p in enumerate(prompts) if i])
    got = {**first, **rest}
    assert {k: r.token_ids for k, r in got.items()} == want
    n_prefix = len(eng.tokenizer.encode(prefix))
    assert all(rest[k].cached_tokens >= (n_prefix - bs) // bs * bs - bs for k in rest)
    assert eng.kv.hits > 0
    assert eng.kv.blocks_used() == 0


def test_stream_events_and_stop_strings(model):
    eng = Engine(model, threads=1, max_batch=2)
    req = Request(id="s", prompt="Once upon a time", params=SamplingParams(max_tokens=60, temperature=0, stop=(" girl",)))
    texts, fin = [], None
    for ev in eng.stream([req]):
        if isinstance(ev, TokenEvent):
            texts.append(ev.text)
        else:
            fin = ev.result
    assert fin.finish_reason == "stop"
    assert fin.text == ", there was a little" and "".join(texts) == fin.text


def test_queue_bound_rejects_cleanly(model):
    eng = Engine(model, threads=1, max_batch=1, max_queue=2)
    reqs = [_req(i, "Lily", 5) for i in range(4)]
    for r in reqs:
        eng.submit(r)
    fins = [ev.result for ev in eng.stream() if isinstance(ev, FinishEvent)]
    rejected = [r for r in fins if r.finish_reason == "rejected"]
    assert [r.id for r in rejected] == ["2", "3"] and "queue full (2 requests waiting)" in rejected[0].error
    assert sorted(r.id for r in fins if r.finish_reason == "length") == ["0", "1"]


def test_cancel_and_deadline_free_blocks(model):
    now = [0.0]                       # a virtual clock: the deadline passes exactly when we say
    eng = Engine(model, threads=1, max_batch=2, clock=lambda: now[0])
    eng.submit(_req("c", "Once upon a time", 200))
    eng.submit(Request(id="d", prompt="Lily", params=SamplingParams(max_tokens=10_000 // 20, temperature=0),
                       deadline_s=0.02))
    events = eng.step() + eng.step()
    assert eng.kv.blocks_used() > 0
    eng.cancel("c")
    now[0] = 0.03
    events += list(eng.stream())
    fins = {ev.result.id: ev.result for ev in events if isinstance(ev, FinishEvent)}
    assert fins["c"].finish_reason == "cancelled" and fins["d"].finish_reason == "deadline"
    assert eng.kv.blocks_used() == 0


def test_high_priority_overtakes_under_load(model):
    eng = Engine(model, threads=1, max_batch=2)
    for i in range(6):
        eng.submit(Request(id=f"low{i}", prompt="Once upon a time", params=SamplingParams(max_tokens=100, temperature=0)))
    for _ in range(5):
        eng.step()
    eng.submit(Request(id="high", prompt="Lily", params=SamplingParams(max_tokens=5, temperature=0), priority=10))
    order = []
    for _ in range(3):          # within a step or two the high-priority request has its first token
        order += [ev.id for ev in eng.step() if isinstance(ev, TokenEvent)]
    assert "high" in order
    fins = [ev.result for ev in eng.stream() if isinstance(ev, FinishEvent)]
    assert sum(r.finish_reason == "length" for r in fins) == 7      # nobody lost


def test_fixed_schedule_is_deterministic(model):
    def run():
        eng = Engine(model, threads=2, max_batch=3, max_batch_tokens=9)
        reqs = [Request(id=str(i), prompt=p, params=SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, seed=i))
                for i, p in enumerate(PROMPTS)]
        return {r.id: r.token_ids for r in eng.generate(reqs)}
    assert run() == run()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(PROMPTS) - 1), st.integers(0, 30), st.integers(0, 3),
                          st.booleans()), min_size=1, max_size=12),
       st.integers(1, 4), st.integers(4, 24))
def test_no_block_leaks_randomized(model, plan, max_batch, budget_tokens):
    eng = Engine(model, threads=1, max_batch=max_batch, max_batch_tokens=budget_tokens, block_size=4,
                 max_queue=8)
    events = []
    for j, (p, n, prio, cancel) in enumerate(plan):
        eng.submit(Request(id=str(j), prompt=PROMPTS[p], priority=prio,
                           params=SamplingParams(max_tokens=n, temperature=0.7, seed=j)))
        events += eng.step()
        if cancel:
            eng.cancel(str(j))
    events += list(eng.stream())
    fins = [ev.result for ev in events if isinstance(ev, FinishEvent)]
    assert sorted(r.id for r in fins) == sorted(str(j) for j in range(len(plan)))
    assert eng.kv.blocks_used() == 0
    assert all(r == 0 for r in eng.kv.ref)
    assert len(eng.kv.free) + len(eng.kv.cached) == eng.kv.n_blocks


def test_requests_arriving_together_share_a_prefix_being_computed(model, kv):
    """A shared system prompt is computed once even when all its users arrive in one step."""
    prefix = PROMPTS[7] + ". " + PROMPTS[4] + ". " + PROMPTS[2]
    prompts = [prefix + x for x in (" and", " but the dog", " so they", " Lily", " Tom", " one day")]
    bs = _bs(kv)
    solo = Engine(model, threads=1, max_batch=1, block_size=bs, **kv)
    want = {str(i): next(solo.generate([_req(i, p, 20)])).token_ids for i, p in enumerate(prompts)}
    eng = Engine(model, threads=1, max_batch=6, block_size=bs, **kv)
    got = {r.id: r for r in eng.generate([_req(i, p, 20) for i, p in enumerate(prompts)])}
    assert {k: r.token_ids for k, r in got.items()} == want
    n_prefix_blocks = (len(eng.tokenizer.encode(prefix)) - 1) // bs
    assert n_prefix_blocks >= 2
    assert sum(r.cached_tokens > 0 for r in got.values()) == len(prompts) - 1
    assert min(r.cached_tokens for k, r in got.items() if k != "0") >= (n_prefix_blocks - 1) * bs


def test_public_api_as_documented(data_dir, tmp_path):
    from infeng import Engine as E, Request as R, SamplingParams as S
    from infeng.cli.main import main
    p = tmp_path / "m.infeng"
    assert main(["convert", str(data_dir / "stories260K"), "-o", str(p)]) == 0
    engine = E.load(p, threads=1, kv_budget_mb=8, max_batch_tokens=64)
    evs = list(engine.stream([R(id="a", prompt="Once upon a time", params=S(max_tokens=8, temperature=0), priority=1)]))
    assert [type(e).__name__ for e in evs] == ["TokenEvent"] * 8 + ["FinishEvent"]
    r = evs[-1].result
    assert r.finish_reason == "length" and r.queue_s >= 0 and r.ttft_s > 0 and r.tpot_s > 0
