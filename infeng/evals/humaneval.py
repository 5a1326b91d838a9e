"""HumanEval: generate completions with the Engine, grade them in the sandbox, pass@k.

The prompt is the problem's function signature + docstring; the completion is cut at the first
stop sequence (the start of another top-level block), then ``prompt + completion + test +
check(entry_point)`` runs in its own sandboxed process (``infeng.evals.sandbox``).
"""
from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from infeng.errors import InfengError
from infeng.evals.sandbox import Limits, Outcome, run_many
from infeng.runtime.engine import Request
from infeng.runtime.sampler import SamplingParams

STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#", "\n@", "\nimport ", "\nfrom ")
FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


@dataclass
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str


def load_problems(path: Path) -> list[Problem]:
    p = Path(path)
    try:
        raw = gzip.open(p, "rt", encoding="utf-8").read() if p.suffix == ".gz" else p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InfengError(f"{p}: no such file") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise InfengError(f"{p}: cannot read ({e})") from None
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise InfengError(f"{p}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict) or any(not isinstance(d.get(f), str) for f in FIELDS):
            raise InfengError(f"{p}:{n}: a HumanEval problem needs string fields {', '.join(FIELDS)}")
        out.append(Problem(*(d[f] for f in FIELDS)))
    if not out:
        raise InfengError(f"{p}: no problems")
    return out


def select(problems: list[Problem], limit: int | None = None, subset: Path | None = None) -> list[Problem]:
    """A stored subset (file of task ids, one per line, # comments) and/or the first ``limit``."""
    if subset is not None:
        try:
            ids = [ln.split("#")[0].strip() for ln in Path(subset).read_text().splitlines()]
        except FileNotFoundError:
            raise InfengError(f"{subset}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InfengError(f"{subset}: cannot read ({e})") from None
        ids = [i for i in ids if i]
        by_id = {p.task_id: p for p in problems}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise InfengError(f"{subset}: unknown task id {unknown[0]!r}")
        problems = [by_id[i] for i in ids]
    if limit is not None:
        problems = problems[:limit]
    return problems


def truncate(completion: str, stops=STOP) -> str:
    """Cut at the first stop sequence (post hoc: the engine may have run past it)."""
    cut = len(completion)
    for s in stops:
        i = completion.find(s)
        if i != -1:
            cut = min(cut, i)
    return completion[:cut]


def program(p: Problem, completion: str) -> str:
    return f"{p.prompt}{completion}\n\n{p.test}\n\ncheck({p.entry_point})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), in its stable product form."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def grade(problems: list[Problem], completions: list[list[str]], limits: Limits | None = None,
          workers: int | None = None, on_done: Callable[[], None] | None = None) -> list[list[Outcome]]:
    """Run every completion of every problem; outcomes per problem, in order."""
    flat = [(i, program(p, c)) for i, (p, cs) in enumerate(zip(problems, completions)) for c in cs]
    outs = run_many([code for _, code in flat], limits, workers, on_done)
    res: list[list[Outcome]] = [[] for _ in problems]
    for (i, _), o in zip(flat, outs):
        res[i].append(o)
    return res


def summarize(problems: list[Problem], outcomes: list[list[Outcome]], ks: list[int]) -> tuple[dict, list[dict]]:
    m: dict = {"problems": len(problems)}
    n_samples = min((len(o) for o in outcomes), default=0)
    for k in ks:
        if k <= n_samples:
            m[f"pass@{k}"] = float(np.mean([pass_at_k(len(o), sum(x.passed for x in o), k) for o in outcomes])) if outcomes else 0.0
    m["passed"] = sum(1 for o in outcomes if o and o[0].passed)
    for st in ("failed", "timeout", "memory", "error"):
        m[st] = sum(1 for o in outcomes for x in o if x.status == st)
    recs = [{"task_id": p.task_id, "samples": len(o), "correct": sum(x.passed for x in o),
             "status": o[0].status if o else "none", "detail": o[0].detail if o else ""}
            for p, o in zip(problems, outcomes)]
    return m, recs


def generate_completions(engine, problems: list[Problem], samples: int, max_tokens: int, temperature: float,
                         seed: int, on_done: Callable[[], None] | None = None,
                         adapter: str | None = None) -> tuple[list[list[str]], list[str], dict]:
    """Completions per problem (``samples`` each) through the Engine's batches; a prompt that does
    not fit the context gets an empty completion (and fails), noted in the second list; the
    third is generation figures (tokens, seconds, tokens/s)."""
    reqs, notes = [], ["" for _ in problems]
    for i, p in enumerate(problems):
        for j in range(samples):
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + 1000 * i + j,
                                    stop=STOP)
            reqs.append(Request(id=f"{i}:{j}", prompt=p.prompt, params=params, adapter=adapter))
    out: list[list[str]] = [["" for _ in range(samples)] for _ in problems]
    tok = engine.tokenizer
    stats = {"generated_tokens": 0}
    t0 = time.perf_counter()
    for r in engine.generate(reqs):
        if isinstance(r, tuple):
            req, err = r
            i, j = map(int, req.id.split(":"))
            notes[i] = str(err)
        else:
            i, j = map(int, r.id.split(":"))
            out[i][j] = truncate(tok.completion_text(r.prompt_ids, r.token_ids))
            stats["generated_tokens"] += len(r.token_ids)
        if on_done:
            on_done()
    dt = time.perf_counter() - t0
    stats.update(generate_s=dt, gen_tok_s=stats["generated_tokens"] / dt if dt > 0 else 0.0)
    return out, notes, stats
