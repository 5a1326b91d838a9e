"""A draft model as drafter: a smaller model with the target's tokenizer (typically a lower-bit
copy of the target itself), run greedily in its own forward session on the same threads.

Its KV cache mirrors the target's slots: per slot, the positions of the owning sequence it has
fed. A round of drafting first catches each sequence up on the tokens it has not seen (its
prompt after admission, the tokens accepted since), then decodes one token per round for every
drafting sequence in one batched call. After verification its KV is rolled back like the
target's. It runs without adapters: a sequence with an adapter verifies with its adapter, so the
output stays exact; only acceptance may drop.
"""
from __future__ import annotations

import json

import numpy as np

from infeng.errors import InfengError
from infeng.runtime.drafters import Drafter
from infeng.runtime.session import ForwardSession


def check_same_vocabulary(draft, target) -> None:
    """Refuse a draft model whose token ids do not mean what the target's mean."""
    a, b = draft.config, target.config
    where = f"draft model {draft.source or '(given)'}"
    if a.vocab_size != b.vocab_size:
        raise InfengError(f"{where}: vocabulary of {a.vocab_size} tokens, the target's has {b.vocab_size}")
    if (a.bos_id, tuple(a.eos_ids)) != (b.bos_id, tuple(b.eos_ids)):
        raise InfengError(f"{where}: BOS/EOS ids {a.bos_id}/{list(a.eos_ids)} differ from the target's "
                          f"{b.bos_id}/{list(b.eos_ids)}")
    va, vb = _vocab(draft.tokenizer), _vocab(target.tokenizer)
    if va != vb:
        diff = next((t for t in set(va) ^ set(vb)), None) if isinstance(va, dict) and isinstance(vb, dict) else None
        raise InfengError(f"{where}: its tokenizer's vocabulary differs from the target's"
                          + (f" (e.g. token {diff!r})" if diff is not None else ""))


def _vocab(tok: dict):
    try:
        model = json.loads(tok.get("json") or "{}").get("model", {})
    except (ValueError, AttributeError):
        return None
    return model.get("vocab")


class ModelDrafter(Drafter):
    name = "draft"

    def __init__(self, draft, target, target_session, max_seq_len: int, budget: int, threads: int):
        check_same_vocabulary(draft, target)
        n_slots = target_session.kv.table.shape[0]
        self.budget = budget
        self.session = ForwardSession(target_session.kern, draft, max_tokens=budget, max_out=n_slots,
                                      threads=threads, n_slots=n_slots, max_seq_len=max_seq_len,
                                      block_size=target_session.kv.block_size)
        self.net, self.kv = self.session.net, self.session.kv
        self.owner: list = [None] * n_slots          # the sequence whose positions a slot holds
        self.fed = [0] * n_slots                      # positions of it in the draft KV

    def _slot(self, s) -> int:
        if self.owner[s.slot] is not s:               # a new sequence in this slot, or s recomputed
            self.kv.release(s.slot)
            self.owner[s.slot], self.fed[s.slot] = s, 0
        return s.slot

    def draft(self, wanted: list) -> None:
        net, kv = self.net, self.kv
        # round 0: catch up on unseen tokens (chunked by the step budget; a sequence whose
        # catch-up does not fit in this step drafts from the next)
        T, outs, live = 0, [], []
        for s, k in wanted:
            slot = self._slot(s)
            n, L = self.fed[slot], len(s.ids)
            if L - n > self.budget - T or not kv.ensure(slot, L + k - 1):
                if kv.ensure(slot, min(L, n + self.budget - T)) and self.budget - T > 0:
                    T = self._feed(s, slot, n, min(L, n + self.budget - T), T)
                continue
            T = self._feed(s, slot, n, L, T)
            net.out_rows[len(outs)] = T - 1
            outs.append(s)
            live.append(k)
        for s, _ in wanted:
            s.draft = []
        if not T:
            return
        self.session.run(T, len(outs), None)
        # rounds 1..k-1: one greedy token per still-drafting sequence per call
        lib = self.session.kern.lib
        V = self.session.cfg.vocab_size
        while outs:
            toks = [int(lib.ifg_argmax(net.logit_rows[i], V)) for i in range(len(outs))]
            T, nxt, nk = 0, [], []
            for s, k, t in zip(outs, live, toks):
                s.draft.append(t)
                if len(s.draft) < k:
                    T = self._feed_one(s, t, T)
                    net.out_rows[len(nxt)] = T - 1
                    nxt.append(s)
                    nk.append(k)
            outs, live = nxt, nk
            if T:
                self.session.run(T, len(outs), None)

    def _feed(self, s, slot: int, start: int, end: int, T: int) -> int:
        net, ids = self.net, s.ids
        n = end - start
        net.tokens[T:T + n] = ids[start:end]
        net.pos[T:T + n] = np.arange(start, end)
        net.seq[T:T + n] = slot
        self.fed[slot] = end
        return T + n

    def _feed_one(self, s, tok: int, T: int) -> int:
        net, slot = self.net, s.slot
        net.tokens[T], net.pos[T], net.seq[T] = tok, self.fed[slot], slot
        self.fed[slot] += 1
        return T + 1

    def rollback(self, s, n_valid: int) -> None:
        slot = s.slot
        if self.owner[slot] is s and self.fed[slot] > n_valid:
            self.fed[slot] = n_valid
            self.kv.truncate(slot, n_valid)

    def forget(self, s) -> None:
        for slot, o in enumerate(self.owner):
            if o is s:
                self.kv.release(slot)
                self.owner[slot], self.fed[slot] = None, 0
