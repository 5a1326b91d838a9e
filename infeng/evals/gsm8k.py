"""GSM8K: k-shot prompt, greedy generation, last-number answer extraction, exact match.

The exemplars below are written for this harness in the style of the GSM8K train split (worked
steps, final answer after "####"); none is taken from the test set.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable

from infeng.errors import InfengError
from infeng.runtime.engine import Request
from infeng.runtime.sampler import SamplingParams

EXEMPLARS: list[tuple[str, str]] = [
    ("A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 30 of them. How many muffins are left?",
     "She makes 24 + 18 = 42 muffins. After selling 30, she has 42 - 30 = 12 left.\n#### 12"),
    ("Tom reads 15 pages a day. How many pages does he read in 2 weeks?",
     "Two weeks have 2 * 7 = 14 days. He reads 15 * 14 = 210 pages.\n#### 210"),
    ("A shirt costs $25 and a pair of shoes costs three times as much. How much do the shirt and the shoes cost together?",
     "The shoes cost 3 * 25 = $75. Together they cost 25 + 75 = $100.\n#### 100"),
    ("There are 40 students in a class. One quarter of them walk to school and the rest take the bus. How many take the bus?",
     "One quarter is 40 / 4 = 10 students. So 40 - 10 = 30 take the bus.\n#### 30"),
    ("Mia has 3 boxes with 12 crayons each. She gives 7 crayons to her brother. How many crayons does she have now?",
     "She has 3 * 12 = 36 crayons. After giving away 7 she has 36 - 7 = 29.\n#### 29"),
    ("A train travels 60 miles per hour for 2.5 hours. How far does it go?",
     "It travels 60 * 2.5 = 150 miles.\n#### 150"),
    ("Sam earns $12 an hour and works 8 hours a day for 5 days. He spends $130. How much money does he keep?",
     "He works 8 * 5 = 40 hours and earns 40 * 12 = $480. He keeps 480 - 130 = $350.\n#### 350"),
    ("A garden has 5 rows of 9 tomato plants. Each plant gives 4 tomatoes. How many tomatoes are there in all?",
     "There are 5 * 9 = 45 plants. They give 45 * 4 = 180 tomatoes.\n#### 180"),
]
STOP = ("\n\nQuestion:", "Question:", "\n\n\n")


@dataclass
class Item:
    question: str
    answer: str      # the reference's normalized final answer


_NUM = re.compile(r"-?(?:\$\s?)?-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|-?\$?\.\d+")


def normalize(num: str) -> str | None:
    """'$1,234.50' → '1234.5', '-7.' → '-7', '3.0' → '3'; None if not a number."""
    s = num.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    neg = s.count("-") % 2 == 1
    s = s.replace("-", "")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    d = -d if neg else d
    if d == d.to_integral_value():
        return str(d.to_integral_value().quantize(Decimal(1)))
    return format(d.normalize(), "f")


def reference_answer(answer: str) -> str | None:
    """The number after '####' in a GSM8K reference."""
    if "####" not in answer:
        return None
    m = _NUM.search(answer.split("####")[-1])
    return normalize(m.group(0)) if m else None


def extract(completion: str) -> str | None:
    """The model's answer: the number after '####' if it wrote one, else the last number."""
    text = completion
    for s in STOP:
        i = text.find(s)
        if i != -1:
            text = text[:i]
    if "####" in text:
        m = _NUM.search(text.split("####", 1)[1])
        if m:
            return normalize(m.group(0))
    nums = _NUM.findall(text)
    return normalize(nums[-1]) if nums else None


def prompt(question: str, shots: int) -> str:
    if not 0 <= shots <= len(EXEMPLARS):
        raise InfengError(f"--shots must be in 0..{len(EXEMPLARS)}, got {shots}")
    parts = [f"Question: {q}\nAnswer: {a}\n\n" for q, a in EXEMPLARS[:shots]]
    return "".join(parts) + f"Question: {question.strip()}\nAnswer:"


def load_items(path: Path) -> list[Item]:
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InfengError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InfengError(f"{p}: cannot read ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise InfengError(f"{p}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict) or not isinstance(d.get("question"), str) or not isinstance(d.get("answer"), str):
            raise InfengError(f"{p}:{n}: a GSM8K item needs string fields question and answer")
        ref = reference_answer(d["answer"])
        if ref is None:
            raise InfengError(f"{p}:{n}: the answer has no number after '####'")
        out.append(Item(d["question"], ref))
    if not out:
        raise InfengError(f"{p}: no items")
    return out


def run(engine, items: list[Item], shots: int, max_tokens: int, seed: int,
        on_done: Callable[[], None] | None = None, adapter: str | None = None) -> tuple[dict, list[dict]]:
    reqs = [Request(id=str(i), prompt=prompt(it.question, shots),
                    params=SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=seed + i, stop=STOP[:1]),
                    adapter=adapter)
            for i, it in enumerate(items)]
    got: list[str | None] = [None] * len(items)
    texts = [""] * len(items)
    errors = [""] * len(items)
    n_gen = 0
    t0 = time.perf_counter()
    for r in engine.generate(reqs):
        if isinstance(r, tuple):
            i = int(r[0].id)
            errors[i] = str(r[1])
        else:
            i = int(r.id)
            texts[i] = engine.tokenizer.completion_text(r.prompt_ids, r.token_ids)
            got[i] = extract(texts[i])
            n_gen += len(r.token_ids)
        if on_done:
            on_done()
    dt = time.perf_counter() - t0
    correct = [g is not None and g == it.answer for g, it in zip(got, items)]
    m = {"accuracy": sum(correct) / len(items) if items else 0.0, "correct": sum(correct), "problems": len(items),
         "no_answer": sum(g is None for g in got), "too_long": sum(bool(e) for e in errors), "shots": shots,
         "generated_tokens": n_gen, "generate_s": dt, "gen_tok_s": n_gen / dt if dt > 0 else 0.0}
    recs = [{"index": i, "reference": it.answer, "extracted": g, "correct": c, "error": e or None, "completion": t[:500]}
            for i, (it, g, c, e, t) in enumerate(zip(items, got, correct, errors, texts))]
    return m, recs
