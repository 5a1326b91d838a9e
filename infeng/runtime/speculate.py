"""Speculative decoding inside the engine's continuous batching.

Before a step, ``propose`` asks the drafter for up to ``k`` tokens per decoding sequence
(``Seq.draft``); the packer feeds them as extra positions after the sequence's decode token, so
one ragged forward pass gives logits for every drafted position of every sequence (sequences
with and without drafts, with and without adapters, side by side). ``verify`` then draws the
sequence's tokens position by position with its own sampler and stops at the first draw that
differs from the draft: the drafts that agreed are accepted and the draw that disagreed (or the
one after the last draft) is the extra token. The KV of the rejected positions is rolled back
(kv.truncate), before the engine publishes full blocks to the prefix cache.

Why this is exact: drafts are point guesses (a deterministic function of the sequence), so the
rule of speculative sampling (Leviathan et al. 2023, Chen et al. 2023) — accept draft d with
probability min(1, p(d)/q(d)) = p(d), else draw from the residual (p - q)+ = p without d — is
the same as drawing x ~ p and accepting iff x == d, emitting x either way. Each emitted token
is drawn from the target's distribution (temperature, top_k, top_p applied by the one sampler
kernel) with the sequence's next random number, exactly as without speculation: same seed,
same tokens, with or without speculation, greedy or sampled.

Length: fixed (``SpecConfig.k``) or adaptive per sequence (grows while drafts are accepted,
shrinks to what was accepted, and switches itself off — for a growing number of steps — while
its acceptance stays low). With ``batch_off`` or more decoding sequences a step drafts nothing:
decode is then no longer bound by reading the weights, so extra positions are not free.
"""
from __future__ import annotations

from dataclasses import dataclass

from infeng.errors import InfengError
from infeng.runtime.draft_model import ModelDrafter
from infeng.runtime.drafters import Drafter, LookupDrafter

MAX_K = 16


@dataclass
class SpecConfig:
    drafter: str = "lookup"         # lookup | draft (a draft model: draft_model is set)
    k: int | None = None            # fixed draft length; None: adaptive up to max_k
    max_k: int = 8
    batch_off: int = 8              # no drafting in a step with this many decoding sequences
    draft_model: object = None      # a loaded Model (drafter "draft")
    min_accept: float = 0.25        # adaptive: a sequence's acceptance below this switches it off

    def validated(self) -> "SpecConfig":
        if self.drafter not in ("lookup", "draft"):
            raise InfengError(f"speculation drafter {self.drafter!r}: known are lookup, draft")
        if self.drafter == "draft" and self.draft_model is None:
            raise InfengError("speculation with a draft model needs the draft model (--draft)")
        if self.k is not None and not 1 <= self.k <= MAX_K:
            raise InfengError(f"--speculate: the draft length must be in 1..{MAX_K}, got {self.k}")
        if not 1 <= self.max_k <= MAX_K:
            raise InfengError(f"speculation max_k must be in 1..{MAX_K}, got {self.max_k}")
        if self.batch_off < 1:
            raise InfengError(f"speculation batch_off must be >= 1, got {self.batch_off}")
        return self

    @property
    def longest(self) -> int:
        return self.k if self.k is not None else self.max_k


def parse_speculate(value: str, draft_model=None) -> SpecConfig:
    """The ``--speculate`` option: ``lookup`` (prompt lookup, adaptive), ``auto`` (adaptive; the
    draft model if one is given, else lookup) or a fixed draft length N (the draft model if one is
    given, else lookup)."""
    drafter = "draft" if draft_model is not None else "lookup"
    if value == "lookup":
        if draft_model is not None:
            raise InfengError("--speculate lookup drafts without a model: drop --draft, or use --speculate auto|N")
        return SpecConfig("lookup").validated()
    if value == "auto":
        return SpecConfig(drafter, draft_model=draft_model).validated()
    try:
        k = int(value)
    except ValueError:
        raise InfengError(f"--speculate {value!r}: give lookup, auto or a draft length 1..{MAX_K}") from None
    return SpecConfig(drafter, k=k, draft_model=draft_model).validated()


@dataclass
class SpecStats:
    steps: int = 0              # steps that verified at least one draft
    drafted: int = 0            # draft tokens verified
    accepted: int = 0           # of those, accepted
    draft_s: float = 0.0        # time proposing drafts (lookup, or the draft model's passes)
    verify_s: float = 0.0       # time of the forward passes that verified drafts
    off: int = 0                # times a sequence switched speculation off (adaptive)

    def figures(self) -> dict[str, float]:
        return {"spec_drafted_tokens": self.drafted, "spec_accepted_tokens": self.accepted,
                "spec_acceptance_rate": self.accepted / self.drafted if self.drafted else float("nan"),
                "spec_steps": self.steps, "spec_draft_s": self.draft_s, "spec_verify_s": self.verify_s,
                "spec_switched_off": self.off}


class SeqSpec:
    """One sequence's speculation state."""
    __slots__ = ("k", "ema", "skip", "backoff", "index", "drafted", "accepted", "slot")

    def __init__(self, k: int):
        self.k, self.ema, self.skip, self.backoff = k, 1.0, 0, 8
        self.index = None               # the lookup drafter's n-gram index
        self.slot = -1                  # the draft model's KV slot owner mark
        self.drafted = self.accepted = 0


class Speculator:
    def __init__(self, cfg: SpecConfig, kv, max_seq_len: int, budget: int, max_out: int, drafter: Drafter,
                 clock):
        self.cfg, self.kv, self.max_seq_len = cfg, kv, max_seq_len
        self.budget, self.max_out, self.drafter, self.clock = budget, max_out, drafter, clock
        self.stats = SpecStats()

    def propose(self, running: list) -> None:
        """Give the decoding sequences of the next step their drafts (``Seq.draft``)."""
        cfg = self.cfg
        decode = [s for s in running if not s.prefilling]
        if not decode or len(decode) >= cfg.batch_off:
            return
        t0 = self.clock()
        # drafts share the step's token budget and logits rows with the decode rows
        room = min(self.budget - len(decode), self.max_out - len(running))
        wanted = []
        for s in decode:
            st = s.spec
            if st is None:
                st = s.spec = SeqSpec(cfg.k or max(1, cfg.max_k // 2))
            if s.req.params.logits_processor is not None:
                continue            # a stateful processor sees each accepted token once, in order
            if st.skip:
                st.skip -= 1
                continue
            r = s.result
            k = min(st.k, s.req.params.max_tokens - len(r.token_ids) - 1, self.max_seq_len - len(s.ids) - 1, room)
            if k > 0 and self.kv.ensure(s.slot, s.n_fed + 1 + k):
                wanted.append((s, k))
                room -= k
        if wanted:
            self.drafter.draft(wanted)
            for s, k in wanted:         # blocks taken for drafts that did not come
                if len(s.draft) < k:
                    self.kv.truncate(s.slot, s.n_fed + 1 + len(s.draft))
        self.stats.draft_s += self.clock() - t0

    def verify(self, s, first: int, draw) -> list:
        """Draw ``s``'s tokens from logits rows first.. (``draw(s, row)`` → (token, logprobs)):
        the accepted drafts and one token more; roll back the rejected positions."""
        d = s.draft
        out = []
        for j in range(len(d) + 1):
            t = draw(s, first + j)
            out.append(t)
            if j == len(d) or t[0] != d[j]:
                break
        a = len(out) - 1
        s.n_fed -= len(d) - a
        self.kv.truncate(s.slot, s.n_fed)
        self.drafter.rollback(s, s.n_fed)
        self._adapt(s.spec, len(d), a)
        st = self.stats
        st.drafted += len(d)
        st.accepted += a
        s.draft = []
        return out

    def _adapt(self, st: SeqSpec, drafted: int, accepted: int) -> None:
        st.drafted += drafted
        st.accepted += accepted
        if self.cfg.k is not None:
            return
        st.ema = 0.7 * st.ema + 0.3 * accepted / drafted
        st.k = min(self.cfg.max_k, st.k + 1) if accepted == drafted else max(1, accepted)
        if st.ema < self.cfg.min_accept:        # not paying: off for a while, longer each time
            st.skip, st.backoff = st.backoff, min(2 * st.backoff, 256)
            st.ema, st.k = 0.5, 1
            self.stats.off += 1
        elif accepted:
            st.backoff = 8


def make_speculator(cfg: SpecConfig, session, target_model, max_seq_len: int, budget: int, max_out: int,
                    clock, threads: int) -> Speculator:
    if cfg.drafter == "lookup":
        drafter: Drafter = LookupDrafter()
    else:
        drafter = ModelDrafter(cfg.draft_model, target_model, session, max_seq_len, budget, threads)
    return Speculator(cfg, session.kv, max_seq_len, budget, max_out, drafter, clock)
