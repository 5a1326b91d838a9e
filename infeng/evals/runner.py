"""Run eval tasks against one model: each task is a name and its options (from the command line or
a suite YAML) and returns flat metrics plus per-item records."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from infeng.errors import InfengError
from infeng.evals import gsm8k as G, humaneval as H, perplexity as P
from infeng.evals.sandbox import Limits, net_isolation
from infeng.model.loader import Model, load_model
from infeng.runtime.engine import Engine
from infeng.runtime.scorer import Scorer
from infeng.telemetry import progress

# options each task accepts (suite YAML keys and their command-line twins)
TASK_OPTIONS: dict[str, set[str]] = {
    "perplexity": {"text", "separator", "ctx", "stride"},
    "kld": {"text", "separator", "ctx", "stride", "base", "top_k", "save_logits"},
    "humaneval": {"file", "limit", "subset", "max_tokens", "samples", "k", "temperature", "timeout",
                  "memory_mb", "workers", "max_batch", "ctx", "canonical"},
    "gsm8k": {"file", "limit", "shots", "max_tokens", "max_batch", "ctx"},
}


INT_OPTIONS = {"ctx": 2, "stride": 1, "top_k": 1, "limit": 1, "max_tokens": 1, "samples": 1, "shots": 0,
               "workers": 1, "max_batch": 1, "memory_mb": 64}
FLOAT_OPTIONS = {"temperature": 0.0, "timeout": 0.1}
FILE_OPTIONS = ("text", "file", "subset")


def check_options(task: str, opts: dict, where: str) -> None:
    """Types, ranges and input files of a task's options, before any work starts."""
    bad = set(opts) - TASK_OPTIONS[task]
    if bad:
        raise InfengError(f"{where}: option(s) {', '.join(sorted(bad))} do not apply to {task}")
    for n, lo in INT_OPTIONS.items():
        if n in opts:
            _int(opts, n, lo)
    for n, lo in FLOAT_OPTIONS.items():
        if n in opts:
            _float(opts, n, lo, 0.0)
    for n in FILE_OPTIONS:
        if n in opts and not Path(str(opts[n])).is_file():
            raise InfengError(f"{where}: {opts[n]}: no such file (for {n})")
    if "base" in opts and not Path(str(opts["base"])).exists():
        raise InfengError(f"{where}: {opts['base']}: no such file or directory (the KLD baseline)")
    if "separator" in opts and (not isinstance(opts["separator"], str) or not opts["separator"]):
        raise InfengError(f"{where}: separator must be a non-empty string")
    if "k" in opts and (not isinstance(opts["k"], list) or not opts["k"]
                        or any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in opts["k"])):
        raise InfengError(f"{where}: k must be a list of integers >= 1")
    if "canonical" in opts and not isinstance(opts["canonical"], bool):
        raise InfengError(f"{where}: canonical must be true or false")


@dataclass
class EvalContext:
    model_path: Path
    model: Model
    threads: int | None = None
    seed: int = 0
    show_progress: bool = True
    meta: dict = field(default_factory=dict)   # filled by tasks (isa, threads actually used)
    cache: dict = field(default_factory=dict)  # baseline logits shared by the models of one run
    adapter: Path | None = None                # LoRA/DoRA adapter file applied to ``model``
    kv: dict = field(default_factory=dict)     # Engine kv_* options for ``model`` (a baseline keeps f32 KV)

    def bar(self, label: str, total: int):
        """A progress bar (or a silent stand-in) and its advance function."""
        if not self.show_progress:
            import contextlib
            return contextlib.nullcontext(), (lambda n=1: None)
        from rich.progress import MofNCompleteColumn, TimeElapsedColumn
        p = progress(label, MofNCompleteColumn(), TimeElapsedColumn())
        t = p.add_task(label, total=total)
        return p, (lambda n=1: p.advance(t, n))


def _scorer(ec: EvalContext, model: Model, ctx: int | None):
    own = model is ec.model
    sc = Scorer(model, threads=ec.threads, ctx=ctx, adapter=ec.adapter if own else None, **(ec.kv if own else {}))
    ec.meta.update(isa=sc.isa, threads=sc.threads)
    return sc


def _int(opts: dict, name: str, lo: int, default=None):
    v = opts.get(name, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise InfengError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def run_perplexity(ec: EvalContext, opts: dict) -> tuple[dict, list[dict]]:
    text = _need_path(opts, "text")
    docs = P.read_documents(text, opts.get("separator") or P.DEFAULT_SEPARATOR)
    sc = _scorer(ec, ec.model, _int(opts, "ctx", 2))
    stride = _int(opts, "stride", 1)
    sc.check_stride(stride)
    ids = P.tokenize_documents(sc, docs)
    bar, adv = ec.bar("perplexity", len(ids))
    with bar:
        s = P.score(sc, ids, stride, on_doc=adv)
    m, recs = P.perplexity_metrics(s, len(ids))
    m.update(ctx=sc.ctx, stride=stride or max(1, sc.ctx // 2))
    return m, recs


def run_kld(ec: EvalContext, opts: dict) -> tuple[dict, list[dict]]:
    text = _need_path(opts, "text")
    docs = P.read_documents(text, opts.get("separator") or P.DEFAULT_SEPARATOR)
    sc = _scorer(ec, ec.model, _int(opts, "ctx", 2))
    stride = _int(opts, "stride", 1)
    sc.check_stride(stride)
    top_k = _int(opts, "top_k", 1, 128)
    ids = P.tokenize_documents(sc, docs)
    tokens, offsets = P.text_meta(ids)
    save = opts.get("save_logits")
    base_src = opts.get("base")
    if save is not None:
        save = Path(save)
        if save.suffix != ".npz":
            raise InfengError(f"--save-logits {save}: the file name must end in .npz")
        if not save.parent.is_dir():
            raise InfengError(f"{save.parent}: no such directory (for {save.name})")
    if base_src is None:
        raise InfengError("kld needs a baseline: --kld BASE (a model, or logits saved with --save-logits)")
    base_src = Path(base_src)
    if P.is_base_file(base_src):
        if save is not None:
            raise InfengError("--save-logits needs a baseline model, not saved logits")
        base = P.load_base(base_src)
        P.check_base_matches(base, tokens, offsets, ec.model.config.vocab_size, sc.ctx, stride, str(base_src))
        base_id = base.meta.get("model")
    else:
        bmodel = load_model(base_src)
        if bmodel.config.vocab_size != ec.model.config.vocab_size or bmodel.tokenizer.get("json") != ec.model.tokenizer.get("json"):
            raise InfengError(f"{base_src}: the baseline model has another tokenizer; KL-divergence needs the same vocabulary")
        base_id = P.model_identity(base_src, bmodel)
        key = (base_id["sha256"], str(base_src), tokens.tobytes(), offsets.tobytes(), sc.ctx, stride, top_k)
        base = ec.cache.get(key)
        if base is None:
            bsc = _scorer(ec, bmodel, sc.ctx)
            bar, adv = ec.bar("baseline logits", len(ids))
            with bar:
                base = P.compute_base(bsc, ids, top_k, stride, {"model": base_id, "text": str(text)}, on_doc=adv)
            ec.cache[key] = base
        if save is not None:
            P.save_base(base, save)
    bar, adv = ec.bar("kld", len(ids))
    with bar:
        s = P.score(sc, ids, stride, base=base, on_doc=adv)
    m, recs = P.kld_metrics(s, base, len(ids))
    m.update(ctx=sc.ctx, stride=stride or max(1, sc.ctx // 2))
    ec.meta["kld_base"] = base_id if base_id is not None else str(base_src)
    return m, recs


def save_own_logits(ec: EvalContext, opts: dict) -> dict:
    """``--save-logits`` without ``--kld``: store this model's logits as a future baseline."""
    text = _need_path(opts, "text")
    save = Path(opts["save_logits"])
    if save.suffix != ".npz":
        raise InfengError(f"--save-logits {save}: the file name must end in .npz")
    if not save.parent.is_dir():
        raise InfengError(f"{save.parent}: no such directory (for {save.name})")
    docs = P.read_documents(text, opts.get("separator") or P.DEFAULT_SEPARATOR)
    sc = _scorer(ec, ec.model, _int(opts, "ctx", 2))
    stride = _int(opts, "stride", 1)
    sc.check_stride(stride)
    ids = P.tokenize_documents(sc, docs)
    bar, adv = ec.bar("baseline logits", len(ids))
    with bar:
        base = P.compute_base(sc, ids, _int(opts, "top_k", 1, 128), stride,
                              {"model": P.model_identity(ec.model_path, ec.model), "text": str(text)}, on_doc=adv)
    P.save_base(base, save)
    return P.nll_stats(base.nll.astype("float64"))


def _need_path(opts: dict, name: str) -> Path:
    v = opts.get(name)
    if v is None:
        raise InfengError(f"this task needs --{name} FILE")
    p = Path(v)
    if not p.is_file():
        raise InfengError(f"{p}: no such file")
    return p


def default_data(rel: str) -> Path:
    """A file of the shared test data: $INFENG_TEST_DATA/rel, else ../shared/data/rel."""
    import os
    root = os.environ.get("INFENG_TEST_DATA") or "../shared/data"
    return Path(root) / rel


def _engine(ec: EvalContext, opts: dict, n_requests: int):
    mb = _int(opts, "max_batch", 1, 8)
    eng = Engine(ec.model, threads=ec.threads, max_batch=max(1, min(mb, n_requests)), max_seq_len=_int(opts, "ctx", 2),
                 **ec.kv)
    ec.meta.update(isa=eng.isa, threads=eng.threads)
    if ec.adapter is not None:
        eng.load_adapter(ec.adapter, ADAPTER_NAME, pinned=True)
    return eng


ADAPTER_NAME = "eval"


def _float(opts: dict, name: str, lo: float, default: float) -> float:
    v = opts.get(name, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= lo:
        raise InfengError(f"{name} must be a number >= {lo}, got {v!r}")
    return float(v)


def run_humaneval(ec: EvalContext, opts: dict) -> tuple[dict, list[dict]]:
    path = Path(opts["file"]) if opts.get("file") else default_data("evals/HumanEval.jsonl.gz")
    probs = H.select(H.load_problems(path), _int(opts, "limit", 1), Path(opts["subset"]) if opts.get("subset") else None)
    samples = _int(opts, "samples", 1, 1)
    ks = opts.get("k") or [1]
    if not isinstance(ks, list) or any(not isinstance(x, int) or isinstance(x, bool) or not 1 <= x <= samples for x in ks):
        raise InfengError(f"k must be a list of integers in 1..samples ({samples}), got {ks!r}")
    temperature = _float(opts, "temperature", 0.0, 0.0 if samples == 1 else 0.8)
    if samples > 1 and temperature == 0:
        raise InfengError("--samples > 1 needs --temperature > 0 (greedy samples are identical)")
    limits = Limits(timeout_s=_float(opts, "timeout", 0.1, 10.0), memory_mb=_int(opts, "memory_mb", 64, 1024))
    if opts.get("canonical"):   # grade the reference solutions: checks the sandbox, not the model
        comps, notes, gen = [[p.canonical_solution] * samples for p in probs], ["" for _ in probs], {}
    else:
        eng = _engine(ec, opts, len(probs) * samples)
        bar, adv = ec.bar("humaneval: generating", len(probs) * samples)
        with bar:
            comps, notes, gen = H.generate_completions(eng, probs, samples, _int(opts, "max_tokens", 1, 256), temperature,
                                                  ec.seed, on_done=adv, adapter=ADAPTER_NAME if ec.adapter else None)
    bar, adv = ec.bar("humaneval: testing", len(probs) * samples)
    with bar:
        outs = H.grade(probs, comps, limits, _int(opts, "workers", 1), on_done=adv)
    m, recs = H.summarize(probs, outs, sorted(set(ks)))
    m["prompt_too_long"] = sum(1 for n in notes if n)
    m["samples"] = samples
    m["canonical"] = int(bool(opts.get("canonical")))
    m.update(gen)
    for r, n, c in zip(recs, notes, comps):
        r["completion"] = c[0][:2000] if c else ""
        if n:
            r["error"] = n
    ec.meta["sandbox"] = {"network_namespace": bool(net_isolation()), "timeout_s": limits.timeout_s,
                          "memory_mb": limits.memory_mb}
    return m, recs


def run_gsm8k(ec: EvalContext, opts: dict) -> tuple[dict, list[dict]]:
    path = Path(opts["file"]) if opts.get("file") else default_data("evals/gsm8k_test.jsonl")
    items = G.load_items(path)
    lim = _int(opts, "limit", 1)
    items = items[:lim] if lim else items
    shots = _int(opts, "shots", 0, 8)
    G.prompt("", shots)   # checks the range
    eng = _engine(ec, opts, len(items))
    bar, adv = ec.bar("gsm8k", len(items))
    with bar:
        return G.run(eng, items, shots, _int(opts, "max_tokens", 1, 256), ec.seed, on_done=adv,
                     adapter=ADAPTER_NAME if ec.adapter else None)


TASKS: dict[str, Callable[[EvalContext, dict], tuple[dict, list[dict]]]] = {
    "perplexity": run_perplexity,
    "kld": run_kld,
    "humaneval": run_humaneval,
    "gsm8k": run_gsm8k,
}


def run_task(ec: EvalContext, task: str, opts: dict[str, Any]) -> tuple[dict, list[dict], float]:
    if task not in TASKS:
        raise InfengError(f"unknown task {task!r} (known: {', '.join(sorted(TASKS))})")
    t0 = time.perf_counter()
    m, recs = TASKS[task](ec, opts)
    return m, recs, time.perf_counter() - t0
