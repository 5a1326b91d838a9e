"""Log-probs of prompt tokens (completions with echo + logprobs, what lm-evaluation-harness's
loglikelihood tasks ask for): the engine's Scorer, run on the engine thread between steps, one
per adapter, the few most recently used kept."""
from __future__ import annotations

from collections import OrderedDict

from infeng.runtime.engine import Engine
from infeng.runtime.sampler import token_logprobs
from infeng.runtime.scorer import Scorer

KEEP = 4


class PromptScorer:
    def __init__(self):
        self.scorers: OrderedDict[tuple, Scorer] = OrderedDict()

    def __call__(self, engine: Engine, ids: list[int], top: int, adapter: str | None) -> list:
        """[(token id, (log p, top) or None)] for each prompt token; the first has no log-p."""
        sc = self._scorer(engine, adapter)
        lg = sc.logits(ids)
        return [(ids[0], None)] + [(ids[i], token_logprobs(lg[i - 1], ids[i], top)) for i in range(1, len(ids))]

    def _scorer(self, engine: Engine, adapter: str | None) -> Scorer:
        la = engine.adapters.get(adapter) if adapter else None
        key = (adapter, la.path, la.mtime) if la else (None,)
        sc = self.scorers.get(key)
        if sc is None:
            sc = Scorer(engine.model, threads=engine.threads, ctx=engine.max_seq_len, adapter=la.path if la else None)
            self.scorers[key] = sc
            while len(self.scorers) > KEEP:
                self.scorers.popitem(last=False)
        self.scorers.move_to_end(key)
        return sc
