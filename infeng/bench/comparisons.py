"""Suite kinds beyond the scenario table: comparisons whose records have shapes of their own (LoRA
overhead, multi-LoRA against PEFT or llama.cpp, llama.cpp's quantizations by KL-divergence, the
engine's scheduling scenarios, batch jobs' memory, kills and scale-out, the simulator against the
engine, `infeng serve` under load, grammar masks' per-token cost, agreement with llama.cpp). A suite file names one with ``kind:`` and sets its parameters:

    kind: llamacpp_kld
    base: out/stories-f32.infeng
    text: /path/to/text.txt
    types: [Q8_0, Q4_0, Q4_K_M]
    compare: {q8_0: out/stories-q8_0.infeng}

``infeng bench --suite FILE`` runs it; ``--model`` replaces the model parameter, ``--threads`` and
``--repeats`` theirs. A peer that is not installed is a note, not an error.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import numpy as np

from infeng.bench import engine_scenarios, gguf_types, grammar_mask, job_memory, job_resume, lora_scenarios, \
    llamacpp_agreement, llamacpp_kld, llamacpp_lora, peft_peer, scale_out, serve_load, serve_peer, sim_compare
from infeng.bench.comparison_base import Comparison, Log, adapter_dtype, int_range, non_negative, positive_ints
from infeng.bench.kv_cache import KVCacheKinds
from infeng.bench.peers import PeerSkip
from infeng.bench.spec_bench import Speculation
from infeng.errors import InfengError
from infeng.model.loader import load_model
from infeng.telemetry import Run

class LoraOverhead(Comparison):
    """A mixed batch of LoRA adapters against the same batch without adapters (and, with ``zipf``,
    adapter popularity drawn from a Zipf law)."""
    name = "lora_overhead"
    required = ("base",)
    defaults = {"ranks": [16, 32, 64], "threads": 2, "repeats": 2, "adapter_dtype": "bf16", "prompt_len": 128,
                "n_out": 32, "zipf": False, "targets": list(lora_scenarios.TARGETS)}

    def run(self, p, log):
        positive_ints(p["ranks"], "ranks", self.name)
        adapter_dtype(p)
        t = p["targets"]
        if not isinstance(t, list) or not t or any(x not in lora_scenarios.TARGETS for x in t):
            raise InfengError(f"{self.name}: `targets` {t!r}: a list of {', '.join(lora_scenarios.TARGETS)}")
        recs = lora_scenarios.overhead(p["base"], p["ranks"], p["threads"], repeats=p["repeats"],
                                       dtype=p["adapter_dtype"], prompt_len=p["prompt_len"], n_out=p["n_out"],
                                       targets=tuple(t))
        if p["zipf"]:
            recs += lora_scenarios.zipf(p["base"], p["threads"], dtype=p["adapter_dtype"])
        return recs, []


class LoraPeer(Comparison):
    """The same mixed multi-LoRA batch on infeng and on a peer, A B A B."""
    required = ("base",)
    defaults = {"rank": 16, "threads": 2, "repeats": 2, "adapter_dtype": "bf16", "prompt_len": 128, "n_out": 32}

    def __init__(self, name: str, peer: str, compare):
        self.name, self.peer, self.compare = name, peer, compare

    def run(self, p, log):
        adapter_dtype(p)
        try:
            rec = self.compare(p["base"], p["rank"], p["threads"], repeats=p["repeats"], prompt_len=p["prompt_len"],
                               n_out=p["n_out"], adapter_dtype=p["adapter_dtype"])
        except PeerSkip as e:
            return [], [f"{self.peer} peer skipped: {e}"]
        return [rec], []


class LlamaCppKld(Comparison):
    """llama.cpp's own quantizations and infeng's, by KL-divergence and perplexity against one
    unquantized baseline on the same tokens."""
    name = "llamacpp_kld"
    required = ("base", "text")
    defaults = {"types": ["Q8_0", "Q4_0", "Q4_K_M"], "compare": {}, "ctx": 512, "threads": 2, "top_k": 128}

    def run(self, p, log):
        compare = []
        for name, path in p["compare"].items():
            if not isinstance(path, str) or not Path(path).is_file():
                raise InfengError(f"{self.name}: compare {name}: {path!r} is not a file")
            compare.append((str(name), Path(path)))
        if not all(isinstance(t, str) for t in p["types"]):
            raise InfengError(f"{self.name}: `types` must be a list of llama.cpp type names")
        return llamacpp_kld.run(Path(p["base"]), Path(p["text"]), p["types"], compare, p["ctx"], p["threads"],
                                p["top_k"], log=log)

    def metrics(self, records):
        return {f"{r['runner']}_{r['name']}".replace(".", "_") + ".kld_mean": r["kld_mean"] for r in records}


class GgufTypes(Comparison):
    """GGUF files written by llama.cpp's quantizer, converted by infeng: file size, resident memory
    after loading, and prefill / decode speed against llama.cpp on the same file."""
    name = "gguf_types"
    model_param = "model"
    defaults = {"model": "tinyllama-1.1b", "types": ["Q4_K_M", "Q5_K_M", "Q6_K", "Q4_1"], "threads": 2,
                "repeats": 2, "prefill": 512, "decode": 128}

    def run(self, p, log):
        if not p["types"] or not all(isinstance(t, str) for t in p["types"]):
            raise InfengError(f"{self.name}: `types` must be a list of llama.cpp type names")
        return gguf_types.run(p["model"], p["types"], p["threads"], p["repeats"], p["prefill"], p["decode"], log=log)

    def metrics(self, records):
        out = {}
        for r in records:
            for k in ("size_ratio", "rss_vs_file_kv", "prefill_ratio", "decode_ratio"):
                if r.get(k) is not None:
                    out[f"{r['type']}.{k}"] = r[k]
        return out


class EngineScenarios(Comparison):
    """Continuous batching against one request at a time, prefix reuse, and priority admission."""
    name = "engine"
    model_param = "model"
    required = ("model",)
    defaults = {"threads": 2, "requests": 32, "max_batch": 32, "only": ["mixed", "prefix", "priority"]}

    def run(self, p, log):
        runs = {"mixed": lambda m: engine_scenarios.mixed(m, p["threads"], p["requests"], max_batch=p["max_batch"]),
                "prefix": lambda m: engine_scenarios.prefix(m, p["threads"]),
                "priority": lambda m: engine_scenarios.priority(m, p["threads"])}
        bad = [s for s in p["only"] if s not in runs]
        if bad:
            raise InfengError(f"{self.name}: `only`: unknown scenario {bad[0]!r} (one of {', '.join(runs)})")
        model = load_model(p["model"], verify=False)
        recs = []
        for name in p["only"]:
            t0 = time.perf_counter()
            res = runs[name](model)
            res["scenario_s"] = time.perf_counter() - t0
            log(f"{name}: {res['scenario_s']:.1f} s")
            recs.append({"scenario": name, **{k: v for k, v in res.items() if not isinstance(v, dict)}})
        return recs, []


class JobMemory(Comparison):
    """Peak RSS of `generate --batch` against its input's length (and the whole-file path's)."""
    name, model_param, required = "job_memory", "model", ("model",)
    defaults = {"sizes": [10000, 100000], "max_tokens": 2, "max_batch": 32, "whole_file": False}

    def run(self, p, log):
        positive_ints(p["sizes"], "sizes", self.name)
        return job_memory.run(p["model"], p["sizes"], p["max_tokens"], p["max_batch"], p["whole_file"], log), []

    def metrics(self, records):
        return {f"{r['path']}.rss_ratio": r["rss_ratio"] for r in records if "rss_ratio" in r}


class JobResume(Comparison):
    """A batch job killed part way and rerun, against the uninterrupted run."""
    name, model_param, required = "job_resume", "model", ("model",)
    defaults = {"requests": 20000, "max_tokens": 4, "kill_at": 0.5}

    def run(self, p, log):
        return job_resume.run(p["model"], p["requests"], p["max_tokens"], float(p["kill_at"]), log), []


class ScaleOut(Comparison):
    """A batch job locally on 1 thread and on Ray with 1 and 2 single-core workers; driver rates
    and the simulator's projection to more workers (needs the `ray` extra)."""
    name, model_param, required = "scale_out", "model", ("model",)
    defaults = {"requests": 3000, "max_tokens": 8, "repeats": 2}

    def run(self, p, log):
        return scale_out.run(p["model"], p["requests"], p["max_tokens"], p["repeats"], log), []


class SimCompare(Comparison):
    """The engine simulator against the real engine on one synthetic trace (rate 0: all at once)."""
    name, model_param, required, may_be_zero = "sim", "model", ("model",), ("seed",)
    defaults = {"requests": 32, "rate": 0.0, "prompt": [64, 1024], "output": [16, 256], "threads": 2,
                "max_batch": 8, "kv_budget_mb": 0.0, "seed": 0}

    def run(self, p, log):
        prompt, output = (int_range(p[k], k, self.name) for k in ("prompt", "output"))
        if p["rate"] < 0 or p["kv_budget_mb"] < 0:
            raise InfengError(f"{self.name}: `rate` and `kv_budget_mb` must be >= 0")
        return sim_compare.run(p["model"], p["requests"], p["rate"], prompt, output, p["threads"], p["max_batch"],
                               p["kv_budget_mb"] or None, p["seed"], log), []

    def metrics(self, records):
        return {k: records[1][k] for k in ("throughput_ratio", "ttft_p99_ratio")}


class ServeLoad(Comparison):
    """`infeng serve` under N concurrent streaming clients over a Zipf mix of adapters."""
    name, model_param, may_be_zero = "serve_load", "model", ("seed", "adapters", "overhead_repeats")
    defaults = serve_load.DEFAULTS

    def run(self, p, log):
        positive_ints(p["concurrency"], "concurrency", self.name)
        for k in ("prompt_tokens", "output_tokens"):
            int_range(p[k], k, self.name)
        non_negative(p["time_limit_s"], "time_limit_s", self.name)
        return serve_load.run(p, log)


class ServeLlamaCpp(Comparison):
    """`infeng serve` and llama.cpp's server (llama-cpp-python) on one seeded Zipf-adapter trace."""
    name, model_param, may_be_zero = "serve_llamacpp", "model", ("seed", "adapters")
    defaults = serve_peer.DEFAULTS

    def run(self, p, log):
        positive_ints(p["concurrency"], "concurrency", self.name)
        for k in ("prompt_tokens", "output_tokens"):
            int_range(p[k], k, self.name)
        non_negative(p["time_limit_s"], "time_limit_s", self.name)
        try:
            return serve_peer.run(p, log)
        except PeerSkip as e:
            return [], [f"llama.cpp server peer skipped: {e}"]

    def metrics(self, records):
        return {f"c{r['concurrency']}.{k}_ratio": r[k] for r in records if r["server"] == "infeng/llama.cpp"
                for k in ("tok_s", "ttft_ms_p99")}


class GrammarMask(Comparison):
    """Per-token cost of llguidance's and outlines-core's token masks (each optional) on vocabularies."""
    name, model_param = "grammar_mask", "tokenizers"
    defaults = {"tokenizers": [], "tokens": 64}

    def run(self, p, log):
        t = p["tokenizers"]
        if not t or not all(isinstance(x, str) and Path(x).is_file() for x in t):
            raise InfengError(f"{self.name}: `tokenizers` must be a list of tokenizer.json files, got {t!r}")
        return grammar_mask.run(t, p["tokens"], log)


class GrammarStep(Comparison):
    """Grammar masks inside engine steps: a batch with some sequences under a JSON schema against
    the same batch unconstrained (the unconstrained sequences share each step's time)."""
    name, model_param, required = "grammar_step", "model", ("model",)
    defaults = {"batch": 8, "constrained": 4, "n_out": 32, "threads": 2, "repeats": 3}

    def run(self, p, log):
        if p["constrained"] > p["batch"]:
            raise InfengError(f"{self.name}: `constrained` ({p['constrained']}) must be <= `batch` ({p['batch']})")
        try:
            import llguidance  # noqa: F401
        except ImportError:
            return [], ["llguidance not installed (pip install -e '.[serve]'): skipped"]
        return grammar_mask.step_cost(p["model"], p["batch"], p["constrained"], p["n_out"], p["threads"],
                                      p["repeats"], log), []

    def metrics(self, records):
        return {"mixed_slowdown": records[0]["mixed_slowdown"]} if records else {}


class LlamaCppAgreement(Comparison):
    """infeng against llama.cpp on one GGUF file: greedy agreement and KL-divergence on a text."""
    name, model_param, required = "llamacpp_agreement", "gguf", ("gguf", "text")
    defaults = {"threads": 2, "ctx": 512, "n": 32, "top_k": 128, "greedy": True}

    def run(self, p, log):
        for k in self.required:
            if not Path(p[k]).is_file():
                raise InfengError(f"{self.name}: {k} {p[k]}: no such file")
        try:
            rec = llamacpp_agreement.run(Path(p["gguf"]), Path(p["text"]), p["threads"], p["ctx"], p["n"],
                                         p["top_k"], log=log, greedy=p["greedy"])
        except PeerSkip as e:
            return [], [f"llama.cpp peer skipped: {e}"]
        # one flat record: nested figures prefixed, lists as JSON text (CSV cells)
        flat = {k: v for k, v in rec.items() if not isinstance(v, (dict, list)) and v is not None}
        for part in ("greedy", "kld"):
            flat.update({f"{part}_{k}": json.dumps(v) if isinstance(v, list) else v
                         for k, v in (rec[part] or {}).items()})
        return [flat], []

    def metrics(self, records):
        return {"kld_mean": records[0]["kld_kld_mean"]} if records else {}


COMPARISONS: dict[str, Comparison] = {c.name: c for c in (
    LoraOverhead(), LoraPeer("peft_lora", "peft", peft_peer.compare),
    LoraPeer("llamacpp_lora", "llama.cpp lora", llamacpp_lora.compare), LlamaCppKld(), EngineScenarios(),
    JobMemory(), JobResume(), ScaleOut(), SimCompare(), ServeLoad(), ServeLlamaCpp(), GrammarMask(),
    GrammarStep(), LlamaCppAgreement(), Speculation(), KVCacheKinds(),
    GgufTypes())}


@dataclass
class ComparisonSuite:
    kind: Comparison
    params: dict[str, Any]
    where: str

    def override(self, model: str | None, threads: int | None, repeats: int | None) -> None:
        """The command line's --model, --threads and --repeats over the file's values."""
        for key, v in ((self.kind.model_param, model), ("threads", threads), ("repeats", repeats)):
            if v is None:
                continue
            if key not in self.kind.defaults and key not in self.kind.required:
                raise InfengError(f"{self.where}: kind {self.kind.name} takes no {key}")
            if isinstance(self.kind.defaults.get(key), list):
                v = [v]         # --model names one of a list (grammar_mask's tokenizers)
            self.params[key] = v

    def run(self, log: Log) -> tuple[list[dict[str, Any]], list[str]]:
        return self.kind.run(self.kind.params(self.params, self.where), log)

    def to_run(self, records: list[dict[str, Any]], notes: list[str]) -> Run:
        """The records in the telemetry schema (numbers as plain floats)."""
        run = Run("bench", meta={"suite": self.kind.name, **self.params, "notes": notes})
        run.records = [{k: float(v) if isinstance(v, np.floating) else v for k, v in r.items()} for r in records]
        run.metrics.update(self.kind.metrics(records))
        return run


def load_comparison(d: dict[str, Any], path: Path) -> ComparisonSuite:
    kind = d["kind"]
    if kind not in COMPARISONS:
        raise InfengError(f"{path}: `kind` {kind!r}: one of {', '.join(COMPARISONS)} "
                          f"(or no kind and a `scenarios` list)")
    c = COMPARISONS[kind]
    given = {k: v for k, v in d.items() if k not in ("kind", "name")}
    c.params(given, str(path), complete=False)   # unknown keys, wrong types: now, not after minutes of work
    return ComparisonSuite(c, given, str(path))
