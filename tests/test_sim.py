"""The simulator drives the engine's own scheduler on virtual time."""
import numpy as np
import pytest

from infeng.model.loader import load_model
from infeng.runtime.sim import CostModel, make_trace, replay, sim_engine, trace_requests


@pytest.fixture(scope="module")
def model(data_dir):
    return load_model(data_dir / "stories260K")


COST = CostModel(base_s=2e-3, per_token_s=1e-4, per_ctx_s=1e-7, per_out_s=5e-4)


def test_trace_is_reproducible_and_zipf_skewed():
    a = make_trace(400, 5.0, (64, 1024), (16, 256), seed=3, n_adapters=64, zipf_alpha=1.5)
    assert a == make_trace(400, 5.0, (64, 1024), (16, 256), seed=3, n_adapters=64, zipf_alpha=1.5)
    counts = np.bincount([t.adapter for t in a], minlength=64)
    assert counts[0] == counts.max() and counts[0] > 5 * counts[10:].mean()
    assert all(64 <= t.prompt_len <= 1024 and 16 <= t.output_len <= 256 for t in a)
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:]))


def test_cost_model_fit_recovers_coefficients():
    rng = np.random.default_rng(0)
    steps = [(int(T), int(o), int(c), 0.0) for T, o, c in zip(rng.integers(1, 512, 200), rng.integers(1, 8, 200),
                                                             rng.integers(0, 100000, 200))]
    steps = [(T, o, c, COST(T, o, c)) for T, o, c, _ in steps]
    fit = CostModel.fit(steps)
    for k, v in COST.to_dict().items():
        assert getattr(fit, k) == pytest.approx(v, rel=1e-6)


def test_simulation_is_deterministic_and_completes(model):
    trace = make_trace(40, 50.0, (16, 200), (8, 64), seed=1)

    def run():
        eng = sim_engine(model, COST, max_batch=4)
        rep = replay(eng, trace, trace_requests(trace, model.config.vocab_size))
        return rep.summary(), sorted((r.id, len(r.token_ids), r.t_first) for r in rep.results)
    a, b = run(), run()
    assert a == b
    assert a[0]["finished"] == 40
    assert {i: n for i, n, _ in a[1]} == {t.id: t.output_len for t in trace}


def test_simulated_priorities_and_preemption_use_the_engine_scheduler(model):
    trace = make_trace(30, 0.0, (100, 300), (50, 150), seed=2, priorities=(0, 5))
    per_block = 2 * model.config.n_layers * 16 * model.config.kv_dim * 4
    eng = sim_engine(model, COST, max_batch=4, kv_budget_mb=48 * per_block / 2**20)
    rep = replay(eng, trace, trace_requests(trace, model.config.vocab_size))
    assert eng.stats.preemptions > 0 and rep.summary()["finished"] == 30
    prio = {t.id: t.priority for t in trace}
    high = [r.ttft_s for r in rep.results if prio[r.id] == 5]
    low = [r.ttft_s for r in rep.results if prio[r.id] == 0]
    assert np.median(high) < np.median(low)
    assert eng.kv.blocks_used() == 0
