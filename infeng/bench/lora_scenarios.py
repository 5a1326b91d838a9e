"""Multi-LoRA overhead: a batch whose rows use several adapters vs the same batch with none.

    python -m infeng.bench.lora_scenarios BASE.infeng --ranks 16,32,64 --threads 2 --adapter-dtype int8

BASE may be any native model (bf16, q8_0, ...). Per rank: 8 requests, rows split over 4 different
adapters on all 7 projections, stored as --adapter-dtype (bf16, f32 or int8); prefill tok/s and
decode tok/s with and without adapters, measured alternately (A B A B) in one run, the overhead
as a ratio, and the physical floor (adapter bytes read per decode step ÷ base bytes).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from pathlib import Path

from infeng.bench.synthetic import make_adapter
from infeng.model.loader import load_model
from infeng.runtime.engine import Engine, Request, StepStats
from infeng.runtime.sampler import SamplingParams
from infeng.telemetry import Run


def run_once(eng: Engine, prompts, adapters, n_out: int) -> tuple[float, float]:
    eng.stats = StepStats()
    reqs = [Request(id=str(i), prompt_ids=p, adapter=a,
                    params=SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True, seed=0))
            for i, (p, a) in enumerate(zip(prompts, adapters))]
    list(eng.generate(reqs))
    st = eng.stats
    return st.prefill_tokens / st.prefill_s, st.decode_tokens / st.decode_s


def adapter_file(base_path, model, rank: int, dtype: str, seed: int) -> Path:
    """A random rank-``rank`` adapter for the base on all 7 projections, stored as ``dtype``
    (int8: the f32 adapter rounded as ``infeng convert --dtype int8`` does; cached beside it)."""
    if dtype != "int8":
        return make_adapter(base_path, rank, dtype=dtype, seed=seed)
    from infeng import format as native
    from infeng.model.adapter import requantize
    src = make_adapter(base_path, rank, dtype="f32", seed=seed)
    out = src.with_name(src.name.replace("-f32-", "-int8-"))
    if not (out.exists() and native.is_native(out)):
        requantize(src, out, model, "int8")
    return out


def overhead(base_path, ranks, threads, batch=8, n_adapters=4, prompt_len=128, n_out=32, repeats=2,
             dtype="bf16", seed=0):
    model = load_model(base_path, verify=False)
    cfg = model.config
    rng = np.random.default_rng(seed)
    prompts = [[1] + rng.integers(3, cfg.vocab_size, prompt_len - 1).tolist() for _ in range(batch)]
    base_bytes = sum(a.nbytes for n, (d, a) in model.tensors.items() if n.startswith("layers."))
    base_dtype = model.weight_dtype
    eng = Engine(model, threads=threads, max_batch=batch, max_batch_tokens=batch * prompt_len,
                 detokenize=False, prefix_cache=False)
    run_once(eng, prompts[:2], [None, None], 2)                           # warm up
    out = []
    for r in ranks:
        names = []
        for k in range(n_adapters):
            p = adapter_file(base_path, model, r, dtype, seed=100 * r + k)
            names.append(eng.load_adapter(p, f"r{r}-{k}").name)
        mixed = [names[i % n_adapters] for i in range(batch)]
        a_bytes = sum(eng.adapters.get(n).nbytes for n in names)
        res = {"none": [], "mixed": []}
        for _ in range(repeats):                                           # A B A B
            res["none"].append(run_once(eng, prompts, [None] * batch, n_out))
            res["mixed"].append(run_once(eng, prompts, mixed, n_out))
        med = {k: np.median(np.array(v), axis=0) for k, v in res.items()}
        out.append({"rank": r, "adapters": n_adapters, "batch": batch, "base_dtype": base_dtype, "adapter_dtype": dtype,
                    "prefill_tok_s_none": med["none"][0], "prefill_tok_s_mixed": med["mixed"][0],
                    "decode_tok_s_none": med["none"][1], "decode_tok_s_mixed": med["mixed"][1],
                    "prefill_overhead": med["none"][0] / med["mixed"][0] - 1,
                    "decode_overhead": med["none"][1] / med["mixed"][1] - 1,
                    "floor_bytes_ratio": a_bytes / base_bytes})
        for n in names:
            eng.unload_adapter(n)
    return out


def zipf(base_path, threads, alphas=(0.5, 1.0, 1.5), n_adapters=64, n_requests=64, rank=16,
         prompt_len=64, n_out=16, batch=8, seed=0):
    """n_requests whose adapters follow Zipf(alpha) over n_adapters, all at once: aggregate tok/s
    and p99 TTFT against the same requests all on one adapter. Also the time to first use of an
    adapter hot-loaded while the engine runs."""
    from infeng.runtime.sim import make_trace, replay
    model = load_model(base_path, verify=False)
    cfg = model.config
    paths = [make_adapter(base_path, rank, seed=10_000 + k) for k in range(n_adapters)]
    eng = Engine(model, threads=threads, max_batch=batch, max_batch_tokens=batch * prompt_len,
                 detokenize=False, prefix_cache=False)
    t_load = []
    for k, p in enumerate(paths):
        t0 = time.perf_counter()
        eng.load_adapter(p, f"a{k}")
        t_load.append(time.perf_counter() - t0)
    rng = np.random.default_rng(seed)
    prompts = [[1] + rng.integers(3, cfg.vocab_size, prompt_len - 1).tolist() for _ in range(n_requests)]
    out = []
    for alpha in (None,) + tuple(alphas):
        trace = make_trace(n_requests, 0.0, (prompt_len, prompt_len), (n_out, n_out), seed=seed,
                           n_adapters=n_adapters, zipf_alpha=alpha or 1.0)
        reqs = [Request(id=t.id, prompt_ids=prompts[i], adapter="a0" if alpha is None else f"a{t.adapter}",
                        params=SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True, seed=0))
                for i, t in enumerate(trace)]
        rep = replay(eng, trace, reqs)
        out.append({"zipf_alpha": alpha if alpha is not None else "single adapter",
                    "distinct_adapters": len({r.adapter for r in reqs}),
                    "tok_s": rep.throughput_tok_s, "ttft_s_p99": rep.ttft(99), "ttft_s_p50": rep.ttft(50)})
    single = out[0]
    for rec in out[1:]:
        rec["tok_s_vs_single"] = rec["tok_s"] / single["tok_s"]
        rec["ttft_p99_vs_single"] = rec["ttft_s_p99"] / single["ttft_s_p99"]
    # hot load while serving: load a new adapter between steps of a running batch, time to its first token
    for i in range(batch - 1):
        eng.submit(Request(id=f"bg{i}", prompt_ids=prompts[i], adapter="a1",
                           params=SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)))
    for _ in range(3):
        eng.step()
    hot = make_adapter(base_path, rank, seed=99_999)          # the file exists before the clock starts
    t0 = time.perf_counter()
    eng.load_adapter(hot, "hot")
    t_loaded = time.perf_counter()
    eng.submit(Request(id="hot", prompt_ids=prompts[-1], adapter="hot",
                       params=SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)))
    first = None
    while eng.busy:
        for ev in eng.step():
            if getattr(ev, "id", None) == "hot" and first is None:
                first = time.perf_counter()
    out.append({"hot_load_s": t_loaded - t0, "hot_time_to_first_token_s": first - t0,
                "adapter_load_s_median": float(np.median(t_load)), "adapter_mb": eng.adapters.get("a0").nbytes / 2**20})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("--ranks", default="16,32,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--adapter-dtype", "--dtype", dest="dtype", default="bf16", choices=["bf16", "f32", "int8"],
                    help="how the adapters are stored")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--n-out", type=int, default=32)
    ap.add_argument("--zipf", action="store_true", help="also the Zipf adapter-popularity scenario")
    ap.add_argument("--json")
    a = ap.parse_args()
    run = Run("bench", meta={"suite": "lora_overhead", "base": a.base, "threads": a.threads, "adapter_dtype": a.dtype})
    t0 = time.perf_counter()
    for rec in overhead(a.base, [int(x) for x in a.ranks.split(",") if x], a.threads, repeats=a.repeats, dtype=a.dtype,
                        prompt_len=a.prompt_len, n_out=a.n_out):
        print(json.dumps(rec, default=float))
        run.records.append({k: float(v) if isinstance(v, np.floating) else v for k, v in rec.items()})
    if a.zipf:
        for rec in zipf(a.base, a.threads):
            print(json.dumps(rec, default=float))
            run.records.append({k: float(v) if isinstance(v, np.floating) else v for k, v in rec.items()})
    run.metrics["seconds"] = time.perf_counter() - t0
    if a.json:
        run.write(a.json)


if __name__ == "__main__":
    main()
