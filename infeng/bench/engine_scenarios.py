"""Engine scenarios on one model: batching vs one at a time, prefix reuse, priority under load,
and the simulator against the real engine on the same trace.

    infeng bench --suite bench/engine.yaml --model MODEL --json engine.json     # kind: engine

Figures are ratios measured in the same run (absolute times on shared machines are noise).
"""
from __future__ import annotations

import time

import numpy as np

from infeng.runtime.engine import Engine, FinishEvent, Request, TokenEvent
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.sim import CostModel, make_trace, replay, sim_engine, trace_requests


def mixed(model, threads, n, seed=0, max_batch=32):
    """n requests (prompts 64–1024, outputs 16–256) all at once: batched engine (up to max_batch
    running at once) vs one at a time, then the simulator (cost model fitted on the one-at-a-time
    run) on the batched schedule. Prefill is compute-bound and costs the same either way, so the
    batching gain comes from decode: the more rows share one sweep of the weights, the better."""
    hi = min(1024, model.config.max_seq_len - 257)          # small demo models have short contexts
    trace = make_trace(n, 0.0, (min(64, hi), hi), (16, 256), seed=seed)
    reqs = lambda: trace_requests(trace, model.config.vocab_size)          # noqa: E731
    seq = Engine(model, threads=threads, max_batch=1, detokenize=False)
    seq.step_log = []
    warm = make_trace(1, 0.0, (64, 64), (4, 4), seed=99)
    replay(seq, warm, trace_requests(warm, model.config.vocab_size, 9))
    seq.step_log.clear()
    r_seq = replay(seq, trace, reqs())
    bat = Engine(model, threads=threads, max_batch=max_batch, detokenize=False)
    replay(bat, warm, trace_requests(warm, model.config.vocab_size, 9))
    bat.stats.max_kv_blocks = 0
    r_bat = replay(bat, trace, reqs())
    cost = CostModel.fit(seq.step_log + probe_steps(model, threads, max_batch))
    r_sim = replay(sim_engine(model, cost, max_batch=max_batch), trace, reqs())
    kv = bat.kv
    out = {
        "requests": n, "max_batch": max_batch,
        "one_at_a_time_tok_s": r_seq.throughput_tok_s, "batched_tok_s": r_bat.throughput_tok_s,
        "batched_over_one_at_a_time": r_bat.throughput_tok_s / r_seq.throughput_tok_s,
        "batched_ttft_s_p50": r_bat.ttft(50), "batched_ttft_s_p99": r_bat.ttft(99),
        "kv_used_mb_max": bat.stats.max_kv_blocks * kv.block_bytes / 2**20,
        "kv_contiguous_mb": bat.max_batch * bat.max_seq_len * kv.block_bytes / kv.block_size / 2**20,
        "sim_tok_s": r_sim.throughput_tok_s, "sim_ttft_s_p99": r_sim.ttft(99),
        "sim_over_real_tok_s": r_sim.throughput_tok_s / r_bat.throughput_tok_s,
        "sim_over_real_ttft_p99": r_sim.ttft(99) / r_bat.ttft(99),
        "cost_model": cost.to_dict(),
    }
    return out


def probe_steps(model, threads, max_batch, seed=7):
    """Step records of a short batched run (16-token prompts, 8 outputs, all at once) that is not
    the trace being predicted. One-at-a-time steps alone cannot tell a step's fixed cost (one
    sweep of the weights) from its per-row cost, since every decode step there has one row: a
    fit on them alone charges each decode row a full weight sweep."""
    n = max(2, min(max_batch, 16))
    trace = make_trace(n, 0.0, (16, 16), (8, 8), seed=seed)
    eng = Engine(model, threads=threads, max_batch=n, detokenize=False)
    eng.step_log = []
    replay(eng, trace, trace_requests(trace, model.config.vocab_size, seed))
    return eng.step_log


def prefix(model, threads, n=16, prefix_len=512, seed=1):
    """n requests sharing a prefix_len-token prefix: prefill time with and without block reuse."""
    rng = np.random.default_rng(seed)
    prefix_len = min(prefix_len, model.config.max_seq_len - 64)
    shared = [1] + rng.integers(3, model.config.vocab_size, prefix_len - 1).tolist()
    prompts = [shared + rng.integers(3, model.config.vocab_size, 16).tolist() for _ in range(n)]
    out = {}
    for reuse in (False, True):
        eng = Engine(model, threads=threads, max_batch=8, detokenize=False, prefix_cache=reuse)
        reqs = [Request(id=str(i), prompt_ids=p, params=SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
                for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        res = list(eng.generate(reqs))
        wall = time.perf_counter() - t0
        key = "with_reuse" if reuse else "without_reuse"
        out[f"prefill_s_{key}"] = eng.stats.prefill_s
        out[f"prefill_tokens_{key}"] = eng.stats.prefill_tokens
        out[f"wall_s_{key}"] = wall
        out[f"ttft_s_p50_{key}"] = float(np.median([r.ttft_s for r in res]))
        if reuse:
            out["prefix_hit_rate"] = eng.kv.hits / eng.kv.lookups
    out["prefill_speedup"] = out["prefill_s_without_reuse"] / out["prefill_s_with_reuse"]
    return out


def priority(model, threads, n_low=8, seed=2):
    """A high-priority request arriving while low-priority ones decode: its TTFT, and that the
    low ones keep going."""
    rng = np.random.default_rng(seed)
    eng = Engine(model, threads=threads, max_batch=4, detokenize=False)
    vocab = model.config.vocab_size
    for i in range(n_low):
        eng.submit(Request(id=f"low{i}", prompt_ids=[1] + rng.integers(3, vocab, 127).tolist(),
                           params=SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)))
    steps = []
    for _ in range(12):          # under load: every slot busy decoding
        t = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - t)
    eng.submit(Request(id="high", prompt_ids=[1] + rng.integers(3, vocab, 127).tolist(),
                       params=SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), priority=10))
    low_tokens_after = 0
    res = {}
    while eng.busy:
        for ev in eng.step():
            if isinstance(ev, TokenEvent) and ev.id.startswith("low"):
                low_tokens_after += 1
            if isinstance(ev, FinishEvent):
                res[ev.id] = ev.result
    return {"high_ttft_s": res["high"].ttft_s, "decode_step_s_median": float(np.median(steps[4:])),
            "high_ttft_in_steps": res["high"].ttft_s / float(np.median(steps[4:])),
            "low_ttft_s_p50": float(np.median([r.ttft_s for k, r in res.items() if k != "high"])),
            "low_tokens_after_high_arrived": low_tokens_after,
            "preemptions": eng.stats.preemptions,
            "all_finished": all(r.finish_reason == "length" for r in res.values())}
