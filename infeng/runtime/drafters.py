"""Drafters: where speculative tokens come from.

A drafter proposes, for each decoding sequence given with a length ``k``, up to ``k`` tokens
that likely follow its ids; the engine verifies them (speculate.py). Drafts are point guesses
(a deterministic function of the sequence), which is what makes verification exact for greedy
and distribution-preserving for sampling.

* ``LookupDrafter``: prompt lookup / n-gram — the tokens that followed the latest earlier
  occurrence of the sequence's last n tokens, in its prompt or its own output. No model.
* ``ModelDrafter`` (draft_model.py): a smaller model with the same tokenizer, run greedily.
"""
from __future__ import annotations

from abc import ABC, abstractmethod


class Drafter(ABC):
    name = ""

    @abstractmethod
    def draft(self, wanted: list) -> None:
        """``wanted``: (seq, k) pairs; set each ``seq.draft`` to at most ``k`` proposed tokens."""

    def rollback(self, s, n_valid: int) -> None:
        """``s`` keeps only its first ``n_valid`` positions (the rest of its draft was rejected)."""

    def forget(self, s) -> None:
        """``s`` left the engine (finished); drop anything held for it."""


class NgramIndex:
    """For one sequence: each n-gram (n in [min_n, max_n]) → where its latest occurrence ended,
    over every end position before the last (so the sequence's own tail never matches itself).
    Grown incrementally as the sequence grows; ids only ever grow by accepted tokens."""

    __slots__ = ("maps", "upto")

    def __init__(self, n_sizes: int):
        self.maps: list[dict] = [{} for _ in range(n_sizes)]
        self.upto = 0                  # end positions [0, upto) are indexed

    def lookup(self, ids: list[int], min_n: int, max_n: int, k: int) -> list[int]:
        L = len(ids)
        for e in range(max(self.upto, min_n), L):         # index ends up to L - 1
            for n in range(min_n, min(max_n, e) + 1):
                self.maps[n - min_n][tuple(ids[e - n:e])] = e
        self.upto = max(self.upto, L)
        for n in range(min(max_n, L), min_n - 1, -1):      # longest match wins
            c = self.maps[n - min_n].get(tuple(ids[L - n:]))
            if c is not None:
                return ids[c:c + k]
        return []


class LookupDrafter(Drafter):
    name = "lookup"

    def __init__(self, min_n: int = 2, max_n: int = 4):
        self.min_n, self.max_n = min_n, max_n

    def draft(self, wanted: list) -> None:
        for s, k in wanted:
            st = s.spec
            if st.index is None:
                st.index = NgramIndex(self.max_n - self.min_n + 1)
            s.draft = st.index.lookup(s.ids, self.min_n, self.max_n, k)
