"""Speculative decoding figures (bench kind ``spec``), each a ratio measured in one process:

* ``lookup``: prompt lookup against plain decoding on a fixed prompt set (input-grounded tasks
  and free generation) on a real model, single stream, greedy, A B A B; the tokens must match.
* ``self_draft_acceptance``: on the real model, a q4_0 copy drafting for a q8_0 copy (both
  re-quantized from the file's weights): how many drafts the target accepts.
* ``self_draft_cost``: on a synthetic shape (TinyLlama), the q4_0 copy drafting for the q8_0
  model. Random weights agree by chance only, so the acceptance is forced by construction: the
  draft model runs (its cost is real) and then its tokens are replaced by the target's known
  continuation, each kept right with probability ``alpha`` (given the previous ones were);
  the speed ratio at each alpha, and the break-even alpha from the measured step costs.
* ``llamacpp_lookup``: llama.cpp (llama-cpp-python) with and without its prompt-lookup drafter
  (``LlamaPromptLookupDecoding``) on the same GGUF and prompts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from infeng.bench import synthetic
from infeng.bench.comparison_base import Comparison
from infeng.errors import InfengError
from infeng.model.loader import Model, load_model
from infeng.quant import QTYPES, policy as qpolicy, to_f32
from infeng.runtime.draft_model import ModelDrafter
from infeng.runtime.drafters import Drafter
from infeng.runtime.engine import Engine, Request
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.speculate import SpecConfig

Log = Callable[[str], None]


def load_prompts(path: str | Path) -> list[dict]:
    if not Path(path).is_file():
        raise InfengError(f"{path}: no such file (the prompt set)")
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            d = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise InfengError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if d is None:
            continue
        if not isinstance(d, dict) or d.get("kind") not in ("grounded", "free") or \
                not (isinstance(d.get("messages"), list) or isinstance(d.get("prompt"), str)):
            raise InfengError(f"{path}:{i}: a prompt needs an id, kind grounded|free, and chat messages or a prompt")
        out.append(d)
    if not out:
        raise InfengError(f"{path}: no prompts")
    return out


def prompt_ids(tok, p: dict) -> list[int]:
    """A prompt's tokens: its chat messages in the model's template, or its plain text."""
    return tok.chat_ids(p["messages"]) if "messages" in p else tok.encode(p["prompt"])


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, seed=0)


def _one(eng: Engine, req: Request):
    (r,) = eng.generate([req])
    if isinstance(r, tuple):
        raise r[1]
    return r


def _decode_run(eng: Engine, ids: list[int], n: int) -> tuple[list[int], float]:
    """One request; (tokens, seconds from the first token to the last)."""
    r = _one(eng, Request("b", prompt_ids=ids, params=_greedy(n)))
    return r.token_ids, r.token_times[-1] - r.token_times[0]


def _ab(engines: dict[str, Engine], ids: list[int], n: int, repeats: int) -> dict:
    """Each engine on the same prompt, alternating, ``repeats`` times; total decode seconds, the
    tokens, and the speculation counters of the runs."""
    out = {k: {"s": 0.0, "tokens": None, "drafted": 0, "accepted": 0} for k in engines}
    for _ in range(repeats):
        for k, eng in engines.items():
            d0, a0 = (eng.spec.stats.drafted, eng.spec.stats.accepted) if eng.spec else (0, 0)
            toks, s = _decode_run(eng, ids, n)
            o = out[k]
            o["s"] += s
            o["tokens"] = toks
            if eng.spec:
                o["drafted"] += eng.spec.stats.drafted - d0
                o["accepted"] += eng.spec.stats.accepted - a0
    return out


def lookup(model_path: str, prompts: list[dict], threads: int, n: int, repeats: int, log: Log) -> list[dict]:
    model = load_model(model_path, verify=False)
    engines = {"plain": Engine(model, threads=threads, max_batch=1, detokenize=False),
               "lookup": Engine(model, threads=threads, max_batch=1, detokenize=False, speculate=SpecConfig("lookup"))}
    recs = []
    for p in prompts:
        ids = prompt_ids(engines["plain"].tokenizer, p)
        log(f"lookup: {p['id']}")
        o = _ab(engines, ids, n, repeats)
        gen = len(o["plain"]["tokens"]) - 1
        recs.append({"scenario": "lookup", "prompt": p["id"], "kind": p["kind"], "decoded_tokens": gen,
                     "plain_tok_s": gen * repeats / o["plain"]["s"], "spec_tok_s": gen * repeats / o["lookup"]["s"],
                     "speedup": o["plain"]["s"] / o["lookup"]["s"],
                     "drafted": o["lookup"]["drafted"], "accepted": o["lookup"]["accepted"],
                     "acceptance": o["lookup"]["accepted"] / o["lookup"]["drafted"] if o["lookup"]["drafted"] else 0.0,
                     "same_tokens": o["plain"]["tokens"] == o["lookup"]["tokens"],
                     "_s": (o["plain"]["s"], o["lookup"]["s"], gen * repeats)})
    return recs + [_lookup_total(recs, kind) for kind in ("grounded", "free")]


def _lookup_total(recs: list[dict], kind: str) -> dict:
    rs = [r for r in recs if r["kind"] == kind]
    plain, spec, toks = (sum(r["_s"][i] for r in rs) for i in range(3))
    dr, ac = sum(r["drafted"] for r in rs), sum(r["accepted"] for r in rs)
    return {"scenario": "lookup", "prompt": f"all {kind}", "kind": kind, "decoded_tokens": toks,
            "plain_tok_s": toks / plain, "spec_tok_s": toks / spec, "speedup": plain / spec, "drafted": dr,
            "accepted": ac, "acceptance": ac / dr if dr else 0.0, "same_tokens": all(r["same_tokens"] for r in rs)}


def requantized(model: Model, qtype: str) -> Model:
    """The model's weights (dequantized where stored quantized) quantized to ``qtype`` with the
    default policy, in memory."""
    f32 = {k: (("f32", to_f32(a, d)) if d in QTYPES else (d, a)) for k, (d, a) in model.tensors.items()}
    items = qpolicy.plan(f32, qtype, qpolicy.Policy(), source=model.source)
    return model.derived(qpolicy.quantize_tensors(f32, items))


def self_draft_acceptance(model_path: str, prompts: list[dict], threads: int, n: int, k: int, log: Log) -> list[dict]:
    base = load_model(model_path, verify=False)
    log("self-draft: re-quantizing q8_0 and q4_0 copies")
    target, draft = requantized(base, "q8_0"), requantized(base, "q4_0")
    engines = {"plain": Engine(target, threads=threads, max_batch=1, detokenize=False),
               "draft": Engine(target, threads=threads, max_batch=1, detokenize=False,
                               speculate=SpecConfig("draft", k=k, draft_model=draft))}
    recs = []
    for kind in ("grounded", "free"):
        agg = {"plain": 0.0, "draft": 0.0, "toks": 0, "drafted": 0, "accepted": 0, "same": True}
        for p in (p for p in prompts if p["kind"] == kind):
            log(f"self-draft: {p['id']}")
            o = _ab(engines, prompt_ids(engines["plain"].tokenizer, p), n, 1)
            agg["plain"] += o["plain"]["s"]
            agg["draft"] += o["draft"]["s"]
            agg["toks"] += len(o["plain"]["tokens"]) - 1
            agg["drafted"] += o["draft"]["drafted"]
            agg["accepted"] += o["draft"]["accepted"]
            agg["same"] &= o["plain"]["tokens"] == o["draft"]["tokens"]
        recs.append({"scenario": "self_draft_acceptance", "kind": kind, "target": "q8_0", "draft": "q4_0", "k": k,
                     "decoded_tokens": agg["toks"], "drafted": agg["drafted"], "accepted": agg["accepted"],
                     "acceptance": agg["accepted"] / agg["drafted"] if agg["drafted"] else 0.0,
                     "speedup": agg["plain"] / agg["draft"], "same_tokens": agg["same"]})
    return recs


class ForcedAcceptance(Drafter):
    """Runs the draft model (its cost is real), then replaces its tokens by the target's known
    continuation, each right with probability ``alpha`` given the previous ones were; the first
    wrong one ends the run of accepted tokens. For cost figures only."""

    def __init__(self, inner: ModelDrafter, want: list[int], alpha: float, vocab: int, seed: int = 0):
        self.inner, self.want, self.alpha, self.vocab = inner, want, alpha, vocab
        self.rng = np.random.default_rng(seed)

    def draft(self, wanted: list) -> None:
        self.inner.draft(wanted)
        for s, _ in wanted:
            g = len(s.result.token_ids)
            d = s.draft
            for j in range(len(d)):
                t = self.want[g + j] if g + j < len(self.want) else 0
                if self.rng.random() >= self.alpha:
                    d[j:] = [(t + 1) % self.vocab] * (len(d) - j)
                    break
                d[j] = t

    def rollback(self, s, n_valid: int) -> None:
        self.inner.rollback(s, n_valid)

    def forget(self, s) -> None:
        self.inner.forget(s)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a step gives with k drafts each accepted with probability alpha (given the
    previous were): the accepted run plus the one drawn after it."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def break_even(cost_ratio: float, k: int) -> float:
    """The alpha at which a speculative step's tokens pay for its cost (in plain steps)."""
    if cost_ratio <= 1:
        return 0.0
    if cost_ratio >= k + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, k) < cost_ratio else (lo, mid)
    return (lo + hi) / 2


def self_draft_cost(target_path: str, draft_path: str, threads: int, n: int, k: int, alphas: list[float],
                    repeats: int, log: Log) -> list[dict]:
    target, draft = load_model(target_path, verify=False), load_model(draft_path, verify=False)
    V = target.config.vocab_size
    ids = [int(t) for t in np.random.default_rng(1).integers(3, V, 32)]
    params = SamplingParams(max_tokens=n, temperature=0.0, seed=0, ignore_eos=True)
    plain = Engine(target, threads=threads, max_batch=1, detokenize=False, max_seq_len=256)
    spec = Engine(target, threads=threads, max_batch=1, detokenize=False, max_seq_len=256,
                  speculate=SpecConfig("draft", k=k, draft_model=draft))
    inner = spec.spec.drafter

    def run(eng):
        r = _one(eng, Request("c", prompt_ids=ids, params=params))
        return r.token_ids, r.token_times[-1] - r.token_times[0], len(r.token_ids) - 1
    log("self-draft cost: plain")
    want, _, _ = run(plain)
    t_plain, t_spec = {a: 0.0 for a in alphas}, {a: 0.0 for a in alphas}
    counts = {a: [0, 0, 0] for a in alphas}          # drafted, accepted, steps
    for rep in range(repeats):
        for a in alphas:
            log(f"self-draft cost: alpha {a} ({rep + 1}/{repeats})")
            _, s, gen = run(plain)
            t_plain[a] += s
            spec.spec.drafter = ForcedAcceptance(inner, want, a, V, seed=rep)
            st = spec.spec.stats
            d0, a0, s0 = st.drafted, st.accepted, st.steps
            toks, s, _ = run(spec)
            if toks != want:
                raise InfengError("self-draft cost: speculative tokens differ from plain decoding")
            t_spec[a] += s
            c = counts[a]
            c[0] += st.drafted - d0
            c[1] += st.accepted - a0
            c[2] += st.steps - s0
    recs, ratios = [], []
    for a in alphas:
        dr, ac, steps = counts[a]
        tok_per_step = (ac + steps) / steps if steps else 1.0
        speed = t_plain[a] / t_spec[a]
        ratios.append(tok_per_step / speed)             # a speculative step's cost in plain steps
        recs.append({"scenario": "self_draft_cost", "alpha": a, "k": k, "target": Path(target_path).name,
                     "draft": Path(draft_path).name, "acceptance": ac / dr if dr else 0.0,
                     "tokens_per_step": tok_per_step, "speedup": speed, "step_cost_in_plain_steps": ratios[-1]})
    cost = float(np.median(ratios))
    recs.append({"scenario": "self_draft_cost", "alpha": "break_even", "k": k, "step_cost_in_plain_steps": cost,
                 "break_even_alpha": break_even(cost, k)})
    return recs


def llamacpp_lookup(gguf: str, prompts: list[dict], tokenizer_model: str, threads: int, n: int, num_pred: int,
                    log: Log) -> tuple[list[dict], list[str]]:
    """llama.cpp through llama-cpp-python, with and without its prompt-lookup draft model."""
    try:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        return [], ["llama.cpp peer skipped: llama-cpp-python not installed (pip install -e '.[peers]')"]
    tok = Engine(load_model(tokenizer_model, verify=False), threads=1, max_batch=1, max_seq_len=16).tokenizer
    runs = {}
    for name, draft in (("plain", None), ("lookup", LlamaPromptLookupDecoding(num_pred_tokens=num_pred))):
        llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                              verbose=False, draft_model=draft)
        runs[name] = llm
    totals = {"grounded": [0.0, 0.0, 0], "free": [0.0, 0.0, 0]}
    same = True
    for p in prompts:
        ids = prompt_ids(tok, p)
        log(f"llama.cpp lookup: {p['id']}")
        got = {}
        for name, llm in runs.items():
            llm.reset()
            times, toks = [], []
            for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                times.append(time.perf_counter())
                toks.append(t)
                if len(toks) >= n or t == llm.token_eos():
                    break
            got[name] = (toks, times[-1] - times[0], len(toks) - 1)
        same &= got["plain"][0] == got["lookup"][0]
        tt = totals[p["kind"]]
        tt[0] += got["plain"][1]
        tt[1] += got["lookup"][1]
        tt[2] += got["plain"][2]
    recs = [{"scenario": "llamacpp_lookup", "kind": kind, "decoded_tokens": t[2], "plain_tok_s": t[2] / t[0],
             "spec_tok_s": t[2] / t[1], "speedup": t[0] / t[1], "same_tokens": same} for kind, t in totals.items()]
    notes = ["llama.cpp: llama-cpp-python exposes speculation only as Llama(draft_model=...) in its one-sequence "
             "generate loop, and ships one drafter, LlamaPromptLookupDecoding (first earlier match of the last "
             "1-2 tokens); it keeps every position's logits (logits_all) to verify. llama.cpp's own draft-model "
             "speculation (llama-speculative, llama-server --model-draft) is not reachable from the Python API, "
             "nor speculation in a batch of sequences"]
    return recs, notes


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
        prompts = load_prompts(p["prompts"])
        recs, notes, only = [], [], p["only"]
        if "lookup" in only:
            recs += lookup(p["model"], prompts, p["threads"], p["n"], p["repeats"], log)
        if "self_draft_acceptance" in only:
            recs += self_draft_acceptance(p["model"], prompts, p["threads"], p["n"], p["k"], log)
        if "self_draft_cost" in only:
            target, draft = (synthetic.make(p["synthetic"], d) for d in ("q8_0", "q4_0"))
            recs += self_draft_cost(str(target), str(draft), p["threads"], p["cost_tokens"], p["k"],
                                               p["alphas"], p["repeats"], log)
        if "llamacpp_lookup" in only:
            gguf = Path(p["gguf"]).expanduser()
            if not p["gguf"] or not gguf.is_file():
                notes.append(f"llama.cpp lookup skipped: `gguf` {p['gguf']!r} (the GGUF the model came from) is not a file")
            else:
                r, n = llamacpp_lookup(str(gguf), prompts, p["model"], p["threads"], p["n"], p["k"], log)
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
