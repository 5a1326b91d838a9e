"""infeng as a Ray Data stage, for pipelines that already use Ray Data:

    ds = ray.data.read_json("requests.jsonl")          # rows: prompt (+ id, max_tokens, temperature, ...)
    ds = ds.map_batches(InfengPredictor, fn_constructor_kwargs={"model_path": "m.infeng", "temperature": 0},
                        concurrency=4, num_cpus=1, batch_size=64)

Each actor holds one Engine (threads = ``threads``, give Ray the same ``num_cpus``). A row's
columns are read as a batch line's fields (``id``, ``prompt``, ``max_tokens``, ``temperature``,
``top_k``, ``top_p``, ``seed``, ``stop``, ``priority``, ``adapter``); the batch comes back with
``text``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens`` and ``error`` (None, or why
that row could not run) added, rows in their order.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from infeng.jobs.local import Collect, LineParser, run_local
from infeng.jobs.stats import JobStats
from infeng.model.loader import load_model
from infeng.runtime.batch import REQUEST_FIELDS
from infeng.runtime.engine import Engine
from infeng.runtime.sampler import SamplingParams
from infeng.runtime.tokenizer import Tokenizer


class InfengPredictor:
    def __init__(self, model_path: str, threads: int = 1, max_batch: int = 8, ctx: int | None = None,
                 adapters: dict[str, str] | None = None, **defaults: Any):
        model = load_model(model_path)
        tok = Tokenizer(model.tokenizer, model.config.bos_id, model.config.eos_ids)
        self.engine = Engine(model, threads=threads, max_batch=max_batch, max_seq_len=ctx, tokenizer=tok,
                             detokenize=False)
        for name, path in (adapters or {}).items():
            self.engine.load_adapter(path, name)
        params = SamplingParams.with_model_defaults(model.generation, **defaults).validated()
        self.parse = LineParser("ray data batch", params, tok, frozenset(self.engine.adapters.loaded))
        self.window = 8 * max_batch
        self.name = str(model_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(batch.values()))) if batch else 0
        fields = [c for c in batch if c in REQUEST_FIELDS]
        todos = []
        for i in range(n):
            row = {c: _plain(batch[c][i], c in INT_FIELDS) for c in fields}
            todos.append(self.parse(i + 1, json.dumps({c: v for c, v in row.items() if v is not None})))
        sink = Collect()
        run_local(self.engine, todos, sink, JobStats(), self.name, self.window)
        got = dict(sink.records)
        recs = [got[t.k] for t in todos]
        out = dict(batch)
        out["text"] = np.array([r.get("text") for r in recs], dtype=object)
        out["finish_reason"] = np.array([r.get("finish_reason") for r in recs], dtype=object)
        out["prompt_tokens"] = np.array([r.get("usage", {}).get("prompt_tokens", 0) for r in recs], dtype=np.int64)
        out["completion_tokens"] = np.array([r.get("usage", {}).get("completion_tokens", 0) for r in recs],
                                            dtype=np.int64)
        out["error"] = np.array([r.get("error") for r in recs], dtype=object)
        return out


INT_FIELDS = {"max_tokens", "top_k", "seed", "priority"}


def _plain(v: Any, integer: bool) -> Any:
    """A numpy / Arrow cell as the JSON value a batch line would hold (NaN and None: absent; an
    integer column with gaps arrives as floats, whole ones are its integers)."""
    if isinstance(v, np.generic):
        v = v.item()
    elif isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, float) and math.isnan(v):
        return None
    if integer and isinstance(v, float) and v.is_integer():
        return int(v)
    return v
