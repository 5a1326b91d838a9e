"""Suite kinds beyond the scenario table: comparisons whose records have shapes of their own (LoRA
overhead, multi-LoRA against PEFT or llama.cpp, llama.cpp's quantizations by KL-divergence, the
engine's scheduling scenarios). A suite file names one with ``kind:`` and sets its parameters:

    kind: llamacpp_kld
    base: out/stories-f32.infeng
    text: /path/to/text.txt
    types: [Q8_0, Q4_0, Q4_K_M]
    compare: {q8_0: out/stories-q8_0.infeng}

``infeng bench --suite FILE`` runs it; ``--model`` replaces the model parameter, ``--threads`` and
``--repeats`` theirs. A peer that is not installed is a note, not an error.
"""
from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from infeng.bench import engine_scenarios, lora_scenarios, llamacpp_kld, llamacpp_lora, peft_peer
from infeng.bench.peers import PeerSkip
from infeng.errors import InfengError
from infeng.model.loader import load_model
from infeng.telemetry import Run

Log = Callable[[str], None]


class Comparison:
    name: str
    model_param = "base"                 # the parameter `--model` sets
    required: tuple[str, ...] = ()
    defaults: dict[str, Any] = {}

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
            if isinstance(d, int) and not isinstance(d, bool) and v < 1:
                raise InfengError(f"{where}: `{k}` must be >= 1, got {v}")
        return p

    def run(self, p: dict[str, Any], log: Log) -> tuple[list[dict[str, Any]], list[str]]:
        """(records, notes)."""
        raise NotImplementedError

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


def _adapter_dtype(p: dict[str, Any]) -> None:
    if p["adapter_dtype"] not in ("bf16", "f32", "int8"):
        raise InfengError(f"`adapter_dtype` {p['adapter_dtype']!r}: one of bf16, f32, int8")


COMPARISONS: dict[str, Comparison] = {c.name: c for c in (
    LoraOverhead(), LoraPeer("peft_lora", "peft", peft_peer.compare),
    LoraPeer("llamacpp_lora", "llama.cpp lora", llamacpp_lora.compare), LlamaCppKld(), EngineScenarios())}


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
