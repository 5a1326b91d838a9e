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

from abc import ABC, abstractmethod

import json
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from infeng.bench import engine_scenarios, gguf_types, grammar_mask, job_memory, job_resume, kv_cache, lora_scenarios, \
    llamacpp_agreement, llamacpp_kld, llamacpp_lora, peft_peer, scale_out, serve_load, serve_peer, sim_compare, \
    spec_bench, synthetic
from infeng.bench.peers import PeerSkip
from infeng.errors import InfengError
from infeng.model.loader import load_model
from infeng.telemetry import Run

Log = Callable[[str], None]


class Comparison(ABC):
    name: str
    model_param = "base"                 # the parameter `--model` sets
    required: tuple[str, ...] = ()
    defaults: dict[str, Any] = {}
    may_be_zero: tuple[str, ...] = ()    # integers where 0 means something (seeds)

    def params(self, given: dict[str, Any], where: str, complete: bool = True) -> dict[str, Any]:
        """The defaults updated with ``given``, each checked against its default's type (and,
        when ``complete``, the required ones present)."""
        extra = sorted(set(given) - set(self.defaults) - set(self.required))
        if extra:
            raise InfengError(f"{where}: unknown key(s) {', '.join(extra)} for kind {self.name} "
                              f"(it takes {', '.join(sorted(set(self.defaults) | set(self.required)))})")
        missing = [k for k in self.required if given.get(k) is None]
        if missing and complete:
            raise InfengError(f"{where}: kind {self.name} needs {', '.join(missing)}")
        for k in self.required:
            if given.get(k) is not None and not isinstance(given[k], str):
                raise InfengError(f"{where}: `{k}` must be a path, got {given[k]!r}")
        p = {**self.defaults, **given}
        for k, d in self.defaults.items():
            v = p[k]
            # a YAML `true` is an int to Python: a bool only where the default is one
            if not isinstance(v, type(d)) or isinstance(v, bool) != isinstance(d, bool):
                raise InfengError(f"{where}: `{k}` must be {type(d).__name__}, got {v!r}")
            if isinstance(d, int) and not isinstance(d, bool) and v < (0 if k in self.may_be_zero else 1):
                raise InfengError(f"{where}: `{k}` must be >= {0 if k in self.may_be_zero else 1}, got {v}")
        return p

    @abstractmethod
    def run(self, p: dict[str, Any], log: Log) -> tuple[list[dict[str, Any]], list[str]]:
        """(records, notes)."""
        ...

    def metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        return {}


def _positive_ints(v: list, key: str, where: str) -> list[int]:
    if not v or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        raise InfengError(f"{where}: `{key}` must be a list of positive integers, got {v!r}")
    return v


class LoraOverhead(Comparison):
    """A mixed batch of LoRA adapters against the same batch without adapters (and, with ``zipf``,
    adapter popularity drawn from a Zipf law)."""
    name = "lora_overhead"
    required = ("base",)
    defaults = {"ranks": [16, 32, 64], "threads": 2, "repeats": 2, "adapter_dtype": "bf16", "prompt_len": 128,
                "n_out": 32, "zipf": False}

    def run(self, p, log):
        _positive_ints(p["ranks"], "ranks", self.name)
        _adapter_dtype(p)
        recs = lora_scenarios.overhead(p["base"], p["ranks"], p["threads"], repeats=p["repeats"],
                                       dtype=p["adapter_dtype"], prompt_len=p["prompt_len"], n_out=p["n_out"])
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
        _adapter_dtype(p)
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
        _positive_ints(p["sizes"], "sizes", self.name)
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
        prompt, output = (_range(p[k], k, self.name) for k in ("prompt", "output"))
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
        _positive_ints(p["concurrency"], "concurrency", self.name)
        for k in ("prompt_tokens", "output_tokens"):
            _range(p[k], k, self.name)
        return serve_load.run(p, log)


class ServeLlamaCpp(Comparison):
    """`infeng serve` and llama.cpp's server (llama-cpp-python) on one seeded Zipf-adapter trace."""
    name, model_param, may_be_zero = "serve_llamacpp", "model", ("seed", "adapters")
    defaults = serve_peer.DEFAULTS

    def run(self, p, log):
        _positive_ints(p["concurrency"], "concurrency", self.name)
        for k in ("prompt_tokens", "output_tokens"):
            _range(p[k], k, self.name)
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


class Speculation(Comparison):
    """Speculative decoding: prompt lookup on a real model's grounded and free prompts, a q4_0
    self-draft's acceptance there, the self-draft's cost at forced acceptances on a synthetic
    shape (and the break-even), and llama.cpp's prompt lookup on the same GGUF."""
    name, model_param, required = "spec", "model", ("model",)
    defaults = {"gguf": "", "prompts": "bench/spec_prompts.jsonl", "threads": 2, "repeats": 2, "n": 128, "k": 4,
                "synthetic": "tinyllama-1.1b", "alphas": [0.6, 0.8, 0.9], "cost_tokens": 48,
                "only": ["lookup", "self_draft_acceptance", "self_draft_cost", "llamacpp_lookup"]}

    def run(self, p, log):
        parts = ("lookup", "self_draft_acceptance", "self_draft_cost", "llamacpp_lookup")
        bad = [x for x in p["only"] if x not in parts]
        if bad:
            raise InfengError(f"{self.name}: `only` {bad[0]!r}: one of {', '.join(parts)}")
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1 for a in p["alphas"]):
            raise InfengError(f"{self.name}: `alphas` must be numbers in [0, 1], got {p['alphas']!r}")
        if p["synthetic"] not in synthetic.ARCHS:
            raise InfengError(f"{self.name}: `synthetic` {p['synthetic']!r}: one of {', '.join(synthetic.ARCHS)}")
        if not Path(p["model"]).is_file():
            raise InfengError(f"{self.name}: model {p['model']}: no such file")
        prompts = spec_bench.load_prompts(p["prompts"])
        recs, notes, only = [], [], p["only"]
        if "lookup" in only:
            recs += spec_bench.lookup(p["model"], prompts, p["threads"], p["n"], p["repeats"], log)
        if "self_draft_acceptance" in only:
            recs += spec_bench.self_draft_acceptance(p["model"], prompts, p["threads"], p["n"], p["k"], log)
        if "self_draft_cost" in only:
            target, draft = (synthetic.make(p["synthetic"], d) for d in ("q8_0", "q4_0"))
            recs += spec_bench.self_draft_cost(str(target), str(draft), p["threads"], p["cost_tokens"], p["k"],
                                               p["alphas"], p["repeats"], log)
        if "llamacpp_lookup" in only:
            gguf = Path(p["gguf"]).expanduser()
            if not p["gguf"] or not gguf.is_file():
                notes.append(f"llama.cpp lookup skipped: `gguf` {p['gguf']!r} (the GGUF the model came from) is not a file")
            else:
                r, n = spec_bench.llamacpp_lookup(str(gguf), prompts, p["model"], p["threads"], p["n"], p["k"], log)
                recs, notes = recs + r, notes + n
        for r in recs:
            r.pop("_s", None)
        return recs, notes

    def metrics(self, records):
        out = {}
        for r in records:
            if r["scenario"] in ("lookup", "llamacpp_lookup") and str(r.get("prompt", "all")).startswith("all"):
                out[f"{r['scenario']}_{r['kind']}.speedup"] = r["speedup"]
            elif r["scenario"] == "self_draft_acceptance":
                out[f"self_draft_{r['kind']}.acceptance"] = r["acceptance"]
            elif r["scenario"] == "self_draft_cost":
                if r["alpha"] == "break_even":
                    out["self_draft.break_even_alpha"] = r["break_even_alpha"]
                else:
                    out[f"self_draft_alpha_{r['alpha']}.speedup"] = r["speedup"]
        return out


class KVCacheKinds(Comparison):
    """Compressed KV caches: quality (KLD, ΔPPL against the f32 cache, real model and text) and
    decode speed at depth, beside llama.cpp's K/V cache types (infeng.bench.kv_cache)."""
    name, model_param = "kv_cache", "model"
    defaults = {"model": "", "gguf": "", "text": "", "ctx": [512, 2048], "top_k": 128,
                "kinds": [{"dtype": "bf16"}, {"dtype": "int8"}, {"dtype": "int4"}],
                "llamacpp": ["q8_0", "q4_0"],
                "speed_model": "tinyllama-1.1b:q4_0", "depths": [0, 1024, 4096], "tokens": 32,
                "speed_kinds": [{"dtype": "f32"}, {"dtype": "int8"}, {"dtype": "int4"}],
                "speed_llamacpp": ["f32", "q8_0", "q4_0"], "threads": 2, "repeats": 2,
                "parts": ["quality", "speed"]}

    def run(self, p, log):
        bad = [x for x in p["parts"] if x not in ("quality", "speed")]
        if bad:
            raise InfengError(f"{self.name}: `parts`: {bad[0]!r} is not quality or speed")
        rows, notes = [], []
        p = {**p, **{k: str(Path(p[k]).expanduser()) for k in ("model", "gguf", "text") if p[k]}}
        gguf = Path(p["gguf"]) if p["gguf"] else None
        if "quality" in p["parts"]:
            if not p["model"] or not Path(p["model"]).exists():
                raise InfengError(f"{self.name}: `model` {p['model']!r}: no such model file or folder (the quality part needs it)")
            if not p["text"] or not Path(p["text"]).is_file():
                raise InfengError(f"{self.name}: `text` {p['text']!r} is not a file (the quality part needs it)")
            _positive_ints(p["ctx"], "ctx", self.name)
            cfg = load_model(p["model"], verify=False).config
            kinds = kv_cache.check_kinds(p["kinds"], cfg, self.name)
            r, n = kv_cache.quality(Path(p["model"]), Path(p["text"]), p["ctx"], kinds, p["llamacpp"],
                                    gguf, p["threads"], p["top_k"], log)
            rows, notes = rows + r, notes + n
        if "speed" in p["parts"]:
            if not p["depths"] or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in p["depths"]):
                raise InfengError(f"{self.name}: `depths` must be a list of integers >= 0, got {p['depths']!r}")
            path = _model_path(p["speed_model"])
            cfg = load_model(path, verify=False).config
            kinds = kv_cache.check_kinds(p["speed_kinds"], cfg, self.name)
            r, n = kv_cache.speed(path, p["depths"], p["tokens"], kinds, p["speed_llamacpp"],
                                  gguf if p["speed_model"] == p["model"] else None,
                                  p["threads"], p["repeats"], log)
            rows, notes = rows + r, notes + n
        return rows, notes

    def metrics(self, records):
        out = {}
        for r in records:
            key = f"{r['part']}.{r['runner']}.{r['kv']}".replace(" ", "_")
            if r["part"] == "quality":
                out[f"{key}.ctx{r['ctx']}.kld_mean"] = r["kld_mean"]
                out[f"{key}.ctx{r['ctx']}.delta_ppl_pct"] = r["delta_ppl_pct"]
            else:
                out[f"{key}.d{r['depth']}.decode_tok_s"] = r["decode_tok_s"]
                if "decode_vs_f32" in r:
                    out[f"{key}.d{r['depth']}.decode_vs_f32"] = r["decode_vs_f32"]
        return out


def _model_path(spec: str) -> Path:
    """A model file or folder, or ARCH:DTYPE for a synthetic model (infeng.bench.synthetic)."""
    if Path(spec).exists():
        return Path(spec)
    arch, _, dtype = spec.partition(":")
    if arch not in synthetic.ARCHS:
        raise InfengError(f"kv_cache: `speed_model` {spec!r} is neither a file nor ARCH:DTYPE "
                          f"(archs: {', '.join(synthetic.ARCHS)})")
    return synthetic.make(arch, dtype or "bf16")


def _range(v, key: str, where: str) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            and 1 <= v[0] <= v[1]):
        raise InfengError(f"{where}: `{key}` must be [LOW, HIGH] with 1 <= LOW <= HIGH, got {v!r}")
    return v[0], v[1]


def _adapter_dtype(p: dict[str, Any]) -> None:
    if p["adapter_dtype"] not in ("bf16", "f32", "int8"):
        raise InfengError(f"`adapter_dtype` {p['adapter_dtype']!r}: one of bf16, f32, int8")


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
