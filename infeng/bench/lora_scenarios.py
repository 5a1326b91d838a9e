"""Multi-LoRA overhead: a batch whose rows use several adapters vs the same batch with none.

    infeng bench --suite bench/lora_overhead.yaml --model BASE.infeng     # kind: lora_overhead

BASE may be any native model (bf16, q8_0, ...). Per rank and adapter set (``targets``: ``all7``,
every projection; ``qv``, PEFT's default q_proj + v_proj): a batch of 8 rows split over 4 different
adapters, stored as ``adapter_dtype`` (bf16, f32 or int8). The overhead is the
C forward time of that batch with its adapters over the same batch bare, measured step for step
in alternating pairs (``paired_steps``; this machine's speed drifts too much between whole runs
for a 5 % effect), for the prefill step (all prompts at once) and every decode step; then one
end-to-end engine run each way (tok/s, informational) and the physical floor: adapter bytes read
per decode step ÷ the base's layer weights (``floor_bytes_ratio``), and ÷ all a base decode step
reads, output head and K/V cache included (``floor_step_bytes_ratio``; a decode step cannot cost
less than that, so ``decode_overhead_above_floor`` is what the kernels add beyond it).

    python -m infeng.bench.lora_scenarios BASE.infeng --ranks 16 32 --adapter-dtype int8 --repeats 6
"""
from __future__ import annotations

import time

import numpy as np

from pathlib import Path

from infeng import format as native
from infeng.bench.synthetic import make_adapter
from infeng.model.loader import load_model
from infeng.model.adapter import requantize
from infeng.runtime.engine import Engine, Request, StepStats
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.session import ForwardSession
from infeng.runtime.sim import make_trace, replay


def run_once(eng: Engine, prompts, adapters, n_out: int) -> tuple[float, float]:
    eng.stats = StepStats()
    reqs = [Request(id=str(i), prompt_ids=p, adapter=a,
                    params=SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True, seed=0))
            for i, (p, a) in enumerate(zip(prompts, adapters))]
    list(eng.generate(reqs))
    st = eng.stats
    return st.prefill_tokens / st.prefill_s, st.decode_tokens / st.decode_s


ALL7 = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# the adapter sets the bench measures: every projection, and PEFT's default for Llama-style
# models (target_modules q_proj, v_proj), what most published adapters adapt
TARGETS = {"all7": ALL7, "qv": ("wq", "wv")}


def adapter_file(base_path, model, rank: int, dtype: str, seed: int, targets: tuple[str, ...] = ALL7) -> Path:
    """A random rank-``rank`` adapter for the base on the ``targets`` projections, stored as
    ``dtype`` (int8: the f32 adapter rounded as ``infeng convert --dtype int8`` does; cached beside it)."""
    if dtype != "int8":
        return make_adapter(base_path, rank, targets=targets, dtype=dtype, seed=seed)
    src = make_adapter(base_path, rank, targets=targets, dtype="f32", seed=seed)
    out = src.with_name(src.name.replace("-f32-", "-int8-"))
    if not (out.exists() and native.is_native(out)):
        requantize(src, out, model, "int8")
    return out


def paired_steps(eng: Engine, adapters, prompt_len: int, n_decode: int, repeats: int, seed: int = 0,
                 chunk: int = 32) -> dict:
    """C forward time of one batch with and without its adapters, step for step: each prefill
    step (``chunk`` prompt tokens of every row, as a chunked prefill) and each decode step runs
    once bare and once with the adapters, back to back in alternating order, in two forward
    sessions (sharing the engine's weights, each with its own KV cache).
    The machine's slow drifts (this one's speed wanders by ±20 % over seconds) then hit both
    sides of every pair alike. ``adapters``: one per row (None: none), rows already grouped by
    adapter as the engine's scheduler groups them."""
    kern, cfg, net = eng.kern, eng.cfg, eng.net
    B, P = len(adapters), prompt_len
    rng = np.random.default_rng(seed)
    bare, mixed = (ForwardSession(kern, eng.model, max_tokens=B * P, max_out=B, threads=eng.threads, n_slots=B,
                                  max_seq_len=P + n_decode + 1, net=net) for _ in range(2))
    starts, tables = [], []
    for i, a in enumerate(adapters):            # one segment per run of equal adapters
        if i == 0 or a is not adapters[i - 1]:
            starts.append(i)
            tables.append(a.table if a is not None else None)
    mixed.lora.reserve(max(a.kernel_rank for a in adapters if a is not None))
    times = {"prefill": ([], []), "decode": ([], [])}    # (bare, adapted) seconds per step

    def step(which, fs, T, n_out, lb):
        t0 = time.perf_counter()
        fs.run(T, n_out, lb)
        times[which][lb is not None].append(time.perf_counter() - t0)

    for rep in range(repeats):
        for fs in (bare, mixed):
            for slot in range(B):
                fs.kv.release(slot)
                fs.kv.ensure(slot, P + n_decode)
        for c0 in range(0, P, chunk):             # prefill: every prompt, a chunk of each per step
            c = min(chunk, P - c0)
            T = B * c
            net.tokens[:T] = rng.integers(3, cfg.vocab_size, T)
            net.pos[:T] = np.tile(np.arange(c0, c0 + c), B)
            net.seq[:T] = np.repeat(np.arange(B), c)
            net.out_rows[:B] = np.arange(B) * c + c - 1
            pair = [(bare, None), (mixed, mixed.lora_segments(tables, [s * c for s in starts], T))]
            for fs, lb in (pair if (rep + c0 // chunk) % 2 == 0 else pair[::-1]):
                step("prefill", fs, T, B, lb)
        for d in range(n_decode):                # decode: one token per row
            net.tokens[:B] = rng.integers(3, cfg.vocab_size, B)
            net.pos[:B] = P + d
            net.seq[:B] = np.arange(B)
            net.out_rows[:B] = np.arange(B)
            pair = [(bare, None), (mixed, mixed.lora_segments(tables, starts, B))]
            for fs, lb in (pair if (rep + d) % 2 == 0 else pair[::-1]):
                step("decode", fs, B, B, lb)
    out = {}
    for which, (bare, mixed) in times.items():
        n_tok = B * min(chunk, P) if which == "prefill" else B
        bare, mixed = np.array(bare), np.array(mixed)
        out[f"{which}_tok_s_none"] = n_tok / float(np.median(bare))
        out[f"{which}_tok_s_mixed"] = n_tok / float(np.median(mixed))
        out[f"{which}_overhead"] = float(mixed.sum() / bare.sum() - 1)          # over all pairs
        out[f"{which}_overhead_pair_median"] = float(np.median(mixed / bare) - 1)
    return out


def overhead(base_path, ranks, threads, batch=8, n_adapters=4, prompt_len=128, n_out=32, repeats=2,
             dtype="bf16", seed=0, targets=("all7", "qv")):
    model = load_model(base_path, verify=False)
    cfg = model.config
    rng = np.random.default_rng(seed)
    prompts = [[1] + rng.integers(3, cfg.vocab_size, prompt_len - 1).tolist() for _ in range(batch)]
    base_bytes = sum(model.tensors.nbytes(n) for n in model.tensors if n.startswith("layers."))
    # what a decode step of the base reads in all: the layers, the output head, and the f32 K/V
    # of every row at the mean depth of the decode steps measured
    kv_bytes = batch * (prompt_len + n_out / 2) * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 4
    step_bytes = base_bytes + model.tensors.nbytes(model.output_name) + kv_bytes
    base_dtype = model.weight_dtype
    eng = Engine(model, threads=threads, max_batch=batch, max_batch_tokens=batch * prompt_len,
                 detokenize=False, prefix_cache=False)
    run_once(eng, prompts, [None] * batch, 2)      # warm up: touches every KV block the runs use
    out = []
    for r, tset in ((r, t) for r in ranks for t in targets):
        names = []
        for k in range(n_adapters):
            p = adapter_file(base_path, model, r, dtype, seed=100 * r + k, targets=TARGETS[tset])
            names.append(eng.load_adapter(p, f"r{r}-{tset}-{k}").name)
        mixed = [names[i % n_adapters] for i in range(batch)]
        a_bytes = sum(eng.adapters.get(n).nbytes for n in names)
        rows = [eng.adapters.get(n) for n in sorted(mixed)]        # grouped, as the scheduler does
        rec = {"rank": r, "targets": tset, "adapters": n_adapters, "batch": batch, "base_dtype": base_dtype,
               "adapter_dtype": dtype,
               **paired_steps(eng, rows, prompt_len, n_out, repeats, seed)}
        e2e = {"none": run_once(eng, prompts, [None] * batch, n_out), "mixed": run_once(eng, prompts, mixed, n_out)}
        rec.update({"engine_prefill_tok_s_none": e2e["none"][0], "engine_prefill_tok_s_mixed": e2e["mixed"][0],
                    "engine_decode_tok_s_none": e2e["none"][1], "engine_decode_tok_s_mixed": e2e["mixed"][1],
                    "floor_bytes_ratio": a_bytes / base_bytes, "floor_step_bytes_ratio": a_bytes / step_bytes,
                    "decode_overhead_above_floor": rec["decode_overhead"] - a_bytes / step_bytes})
        out.append(rec)
        for n in names:
            eng.unload_adapter(n)
    return out


def zipf(base_path, threads, alphas=(0.5, 1.0, 1.5), n_adapters=64, n_requests=64, rank=16,
         prompt_len=64, n_out=16, batch=8, seed=0, dtype="bf16", rounds=2):
    """n_requests whose adapters follow Zipf(alpha) over n_adapters, all at once: aggregate tok/s
    and p99 TTFT against the same requests all on one adapter. The runs go in ``rounds`` passes
    over the configurations, every other pass in reverse order (single, α..., α..., single), and
    each figure is the mean over passes, so a drift of the machine's speed hits all alike. Also
    the time to first use of an adapter hot-loaded while the engine runs."""
    model = load_model(base_path, verify=False)
    cfg = model.config
    paths = [adapter_file(base_path, model, rank, dtype, seed=10_000 + k) for k in range(n_adapters)]
    eng = Engine(model, threads=threads, max_batch=batch, max_batch_tokens=batch * prompt_len,
                 detokenize=False, prefix_cache=False)
    t_load = []
    for k, p in enumerate(paths):
        t0 = time.perf_counter()
        eng.load_adapter(p, f"a{k}")
        t_load.append(time.perf_counter() - t0)
    rng = np.random.default_rng(seed)
    prompts = [[1] + rng.integers(3, cfg.vocab_size, prompt_len - 1).tolist() for _ in range(n_requests)]
    configs = (None,) + tuple(alphas)
    runs = {a: [] for a in configs}
    for rnd in range(rounds):
        for alpha in (configs if rnd % 2 == 0 else configs[::-1]):
            trace = make_trace(n_requests, 0.0, (prompt_len, prompt_len), (n_out, n_out), seed=seed,
                               n_adapters=n_adapters, zipf_alpha=alpha or 1.0)
            reqs = [Request(id=t.id, prompt_ids=prompts[i], adapter="a0" if alpha is None else f"a{t.adapter}",
                            params=SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True, seed=0))
                    for i, t in enumerate(trace)]
            rep = replay(eng, trace, reqs)
            runs[alpha].append((len({r.adapter for r in reqs}), rep.throughput_tok_s, rep.ttft(99), rep.ttft(50)))
    out = [{"zipf_alpha": alpha if alpha is not None else "single adapter", "adapter_dtype": dtype,
            "distinct_adapters": runs[alpha][0][0], "runs": rounds,
            "tok_s": float(np.mean([r[1] for r in runs[alpha]])),
            "ttft_s_p99": float(np.mean([r[2] for r in runs[alpha]])),
            "ttft_s_p50": float(np.mean([r[3] for r in runs[alpha]]))} for alpha in configs]
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


def main(argv=None) -> None:
    """The overhead figures of one base as JSON lines (what ``kind: lora_overhead`` records)."""
    import argparse
    import json
    ap = argparse.ArgumentParser(prog="python -m infeng.bench.lora_scenarios")
    ap.add_argument("base")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--adapter-dtype", default="bf16", choices=("bf16", "f32", "int8"))
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    for rec in overhead(a.base, a.ranks, a.threads, repeats=a.repeats, dtype=a.adapter_dtype, targets=a.targets):
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
