"""llama.cpp as the multi-LoRA peer: the same mixed load (8 rows over 4 adapters) through
llama-cpp-python's low-level API, against infeng's fused batch, in one run.

    infeng bench --suite bench/llamacpp_lora.yaml --model BASE.infeng     # kind: llamacpp_lora

llama.cpp applies one adapter set per context at a time, so its mixed load is one batch per
adapter configuration: for each adapter, its rows (2 of 8) prefill together in one llama_decode
and decode together, the next adapter's rows after. Aggregate tok/s = all rows' tokens ÷ the
summed time. The base is the native file exported by infeng.converters.gguf_write; the adapters
are the same native adapter files infeng loads, exported by infeng.converters.gguf_lora. The
same rows with no adapter (one batch of 8) are reported too, to separate base speed from LoRA.
llama_cpp is imported only here; when missing the run is a note (skipped).
"""
from __future__ import annotations

import ctypes
import time

import numpy as np

from infeng.bench.lora_scenarios import adapter_file
from infeng.bench.peers import LlamaCppSeqs, PeerSkip, _import
from infeng.bench.synthetic import gguf_cache_dir
from infeng.converters.gguf_lora import write_gguf_lora
from infeng.converters.gguf_write import export_cached
from infeng.model.adapter import load_adapter
from infeng.model.loader import load_model
from infeng.runtime.engine import Engine, Request, StepStats
from infeng.runtime.sampler import SamplingParams


class LlamaCppLora:
    """The base model loaded once, a context of 8 sequences (LlamaCppSeqs), and the adapters."""

    def __init__(self, gguf, adapter_ggufs: dict, threads: int, n_ctx: int, n_batch: int):
        lc = self.lc = _import("llama_cpp", "llama.cpp peer needs llama-cpp-python (pip install -e '.[peers]')")
        # the high-level Llama only loads the model; the rows get their own context (freed in close)
        self.llm = lc.Llama(model_path=str(gguf), n_threads=threads, n_ctx=64, n_batch=64, verbose=False)
        self.seqs = LlamaCppSeqs(self.llm, threads, n_ctx, n_batch, 8)
        self.ctx = self.seqs.ctx
        self.adapters = {}
        for name, path in adapter_ggufs.items():
            a = lc.llama_adapter_lora_init(self.seqs.model, str(path).encode())
            if not a:
                raise PeerSkip(f"llama.cpp refused the LoRA adapter {path}")
            self.adapters[name] = a

    def close(self):
        self.seqs.close()
        self.llm.close()

    def _set(self, name):
        lc = self.lc
        if name is None:
            lc.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            arr = (lc.llama_adapter_lora_p_ctypes * 1)(self.adapters[name])
            if lc.llama_set_adapters_lora(self.ctx, arr, 1, (ctypes.c_float * 1)(1.0)):
                raise PeerSkip(f"llama.cpp: could not set adapter {name}")

    def run(self, prompts, adapter_of_row, n_out):
        """Rows grouped by adapter, one group at a time: (ids per row, prefill s, decode s)."""
        self.seqs.clear()
        groups: dict = {}
        for i, a in enumerate(adapter_of_row):
            groups.setdefault(a, []).append(i)
        ids, t_pre, t_dec = {}, 0.0, 0.0
        for a, rows in groups.items():
            self._set(a)
            t0 = time.perf_counter()
            nxt = self.seqs.decode([(i, prompts[i], 0) for i in rows])
            t_pre += time.perf_counter() - t0
            P = len(prompts[rows[0]])
            out = {i: [t] for i, t in zip(rows, nxt)}
            t0 = time.perf_counter()
            for j in range(n_out - 1):
                nxt = self.seqs.decode([(i, [out[i][-1]], P + j) for i in rows])
                for i, t in zip(rows, nxt):
                    out[i].append(t)
            t_dec += time.perf_counter() - t0
            ids.update(out)
        self._set(None)
        self.seqs.clear()
        return [ids[i] for i in range(len(prompts))], t_pre, t_dec


def compare(base_path, rank=16, threads=2, batch=8, n_adapters=4, prompt_len=128, n_out=32, repeats=2,
            adapter_dtype="bf16", seed=0):
    _import("llama_cpp", "llama.cpp peer needs llama-cpp-python (pip install -e '.[peers]')")
    model = load_model(base_path, verify=False)
    rng = np.random.default_rng(seed)
    prompts = [[1] + rng.integers(3, model.config.vocab_size, prompt_len - 1).tolist() for _ in range(batch)]
    paths = {f"r{rank}-{k}": adapter_file(base_path, model, rank, adapter_dtype, seed=100 * rank + k)
             for k in range(n_adapters)}
    ggufs = {}
    for n, p in paths.items():
        g = p.with_suffix(".gguf")
        if not g.exists() or g.stat().st_mtime < p.stat().st_mtime:
            write_gguf_lora(load_adapter(p, model), model, g)
        ggufs[n] = g
    names = list(paths)
    mixed = [names[i % n_adapters] for i in range(batch)]
    peer = LlamaCppLora(export_cached(model, gguf_cache_dir(), base_path), ggufs, threads,
                        n_ctx=batch * (prompt_len + n_out) + 64,
                        n_batch=batch * prompt_len)
    eng = Engine(model, threads=threads, max_batch=batch, max_batch_tokens=batch * prompt_len,
                 detokenize=False, prefix_cache=False)
    for n, p in paths.items():
        eng.load_adapter(p, n)

    def ours(adapters):
        eng.stats = StepStats()
        reqs = [Request(id=str(i), prompt_ids=p, adapter=a,
                        params=SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True, seed=0))
                for i, (p, a) in enumerate(zip(prompts, adapters))]
        res = sorted(eng.generate(reqs), key=lambda r: int(r.id))
        st = eng.stats
        return [r.token_ids for r in res], st.prefill_tokens / st.prefill_s, st.decode_tokens / st.decode_s

    def theirs(adapters):
        ids, tp, td = peer.run(prompts, adapters, n_out)
        return ids, batch * prompt_len / tp, batch * (n_out - 1) / td

    rec = {"rank": rank, "batch": batch, "adapters": n_adapters, "threads": threads, "prompt_len": prompt_len,
           "n_out": n_out, "base_dtype": model.weight_dtype, "adapter_dtype": adapter_dtype}
    for label, adapters in (("mixed", mixed), ("none", [None] * batch)):
        o, t = [], []
        for _ in range(repeats):                                           # A B A B
            o.append(ours(adapters))
            t.append(theirs(adapters))
        for who, runs in (("infeng", o), ("llamacpp", t)):
            rec[f"{who}_{label}_prefill_tok_s"] = float(np.median([r[1] for r in runs]))
            rec[f"{who}_{label}_decode_tok_s"] = float(np.median([r[2] for r in runs]))
        rec[f"{label}_prefill_ratio"] = rec[f"infeng_{label}_prefill_tok_s"] / rec[f"llamacpp_{label}_prefill_tok_s"]
        rec[f"{label}_decode_ratio"] = rec[f"infeng_{label}_decode_tok_s"] / rec[f"llamacpp_{label}_decode_tok_s"]
        rec[f"{label}_first_token_agree"] = f"{sum(a[0] == b[0] for a, b in zip(o[0][0], t[0][0]))}/{batch}"
    peer.close()
    return rec
