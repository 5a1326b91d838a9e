"""The engine simulator against the real engine on one synthetic trace.

    infeng bench --suite bench/sim.yaml --model MODEL      (kind: sim)

The cost model is fitted on a different trace of the same kind (the fit is out of sample), then
the trace is replayed on the real engine and on the simulator (the same scheduler on virtual
time); records are both reports and the simulator's throughput and TTFT p99 over the engine's.
"""
from __future__ import annotations

from infeng.model.loader import load_model
from infeng.runtime.engine import Engine
from infeng.runtime.sim import CostModel, make_trace, replay, sim_engine, trace_requests


def run(model_path: str, requests: int, rate: float, prompt: tuple[int, int], output: tuple[int, int],
        threads: int, max_batch: int, kv_budget_mb: float | None, seed: int, log=print) -> list[dict]:
    model = load_model(model_path, verify=False)
    vocab = model.config.vocab_size
    trace = make_trace(requests, rate, prompt, output, seed=seed)
    kw = dict(max_batch=max_batch, kv_budget_mb=kv_budget_mb)
    real = Engine(model, threads=threads, detokenize=False, **kw)
    calib = make_trace(max(8, requests // 2), 0, prompt, output, seed=seed + 1)
    replay(real, calib[:2], trace_requests(calib[:2], vocab, 2))   # page in
    real.step_log = []
    replay(real, calib, trace_requests(calib, vocab, 1))
    cost = CostModel.fit(real.step_log)
    rep_real = replay(real, trace, trace_requests(trace, vocab))
    rep_sim = replay(sim_engine(model, cost, **kw), trace, trace_requests(trace, vocab))
    log("cost model: " + str({k: f"{v:.3g}" for k, v in cost.to_dict().items()}))
    r, s = rep_real.summary(), rep_sim.summary()
    ratio = {"throughput_ratio": s["throughput_tok_s"] / r["throughput_tok_s"],
             "ttft_p99_ratio": s["ttft_s_p99"] / r["ttft_s_p99"]}
    log(f"sim/real: throughput {ratio['throughput_ratio']:.3f}  ttft_p99 {ratio['ttft_p99_ratio']:.3f}")
    return [{"runner": "engine", **r}, {"runner": "simulator", **s, **ratio},
            {"runner": "cost_model", **cost.to_dict()}]
