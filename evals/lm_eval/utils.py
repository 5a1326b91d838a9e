"""Documents for the infeng lm-evaluation-harness tasks, built from local files (the Hugging Face
Hub is unreachable): TinyStories text split on <|endoftext|>, as `infeng eval --text` splits it.

lm_eval passes `--metadata '{"text": PATH}'` to these loaders; without it they read
$INFENG_TEST_DATA/text/tinystories_sample.txt.
"""
import os
import re
from pathlib import Path

import datasets

SEPARATOR = "<|endoftext|>"


def _stories(text: str | None) -> list[str]:
    path = Path(text) if text else Path(os.environ.get("INFENG_TEST_DATA", "../shared/data")) / "text" / "tinystories_sample.txt"
    docs = [d.strip() for d in path.read_text(encoding="utf-8").split(SEPARATOR)]
    return [d for d in docs if d]


def _sentences(story: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", story.replace("\n", " ")) if s]


def stories(text: str | None = None, **_) -> dict:
    """One document per story (perplexity: loglikelihood_rolling)."""
    return {"test": datasets.Dataset.from_list([{"text": d} for d in _stories(text)])}


def cloze(text: str | None = None, **_) -> dict:
    """Which sentence comes next? The story up to sentence k, the true sentence k and the k-th
    sentences of up to three other stories as choices (multiple_choice: loglikelihood)."""
    sents = [_sentences(d) for d in _stories(text)]
    rows = []
    for i, s in enumerate(sents):
        for k in (2, 4):
            if k >= len(s):
                continue
            others = [o[k] for j, o in enumerate(sents) if j != i and k < len(o)][:3]
            choices = [s[k]] + others
            rot = (i + k) % len(choices)             # the answer is not always first
            choices = choices[rot:] + choices[:rot]
            rows.append({"context": " ".join(s[:k]), "choices": choices, "label": choices.index(s[k])})
    return {"test": datasets.Dataset.from_list(rows)}


def continuation(text: str | None = None, **_) -> dict:
    """The story's first two sentences; the third is the target (generate_until)."""
    rows = [{"context": " ".join(s[:2]), "target": s[2]} for s in map(_sentences, _stories(text)) if len(s) > 2]
    return {"test": datasets.Dataset.from_list(rows)}
