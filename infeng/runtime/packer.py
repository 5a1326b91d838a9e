"""One step's batch laid into the forward buffers.

Rows are ragged: one decode token for each running sequence past its prompt (followed by the
tokens drafted for it, if any: speculative decoding verifies them as extra positions, each with
its logits row), then prefill chunks
of the others while the step's token budget lasts (chunked prefill), each row with its own
position and KV slot. Within each part, the rows of one adapter sit side by side (in order of
first appearance), so each adapter is one segment of the batch and its weights are read once per
step, not once per row; this is the only place rows are grouped by adapter.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from infeng.runtime.scheduler import Seq


@dataclass(slots=True)
class Batch:
    T: int = 0                  # rows (tokens) in the step
    n_out: int = 0              # rows whose logits are sampled
    outs: list[Seq] = field(default_factory=list)    # the sequences of those rows, in order
    first: list[int] = field(default_factory=list)   # each one's first logits row (1 + its drafts)
    drafted: int = 0            # draft tokens verified in this step
    n_seqs: int = 0             # sequences with rows in the step
    prefill_tokens: int = 0
    ctx: int = 0                # attention work: positions attended, summed over rows
    lora: object = None         # struct ifg_lora_batch *, or NULL when no row uses an adapter


def by_adapter(seqs: list[Seq]) -> list[Seq]:
    """The sequences in order, except that those using the same adapter are made adjacent (in
    order of first appearance)."""
    if len(seqs) < 2:
        return seqs
    groups: dict[int, list[Seq]] = {}
    for s in seqs:
        groups.setdefault(id(s.adapter), []).append(s)
    return [s for g in groups.values() for s in g]


class BatchPacker:
    def __init__(self, session, max_batch_tokens: int):
        self.session, self.budget = session, max_batch_tokens
        self.net, self.seg_start = session.net, session.lora.seg_start
        self.seg_ad: list = []          # the adapter (or None) of each segment of the last batch
        self.by_extent = bool(getattr(self.net, "rope_past", 0))   # RoPE by sequence length (llama.py)

    def pack(self, running: list[Seq]) -> Batch:
        b, net, kv = Batch(), self.net, self.session.kv
        self.seg_ad = []
        decode, prefill = [], []
        for s in running:
            (prefill if s.prefilling else decode).append(s)
        for s in by_adapter(decode):
            k = len(s.draft)
            self._put(b, s, 1 + k)
            b.outs.append(s)
            b.first.append(b.n_out)
            for j in range(b.T - 1 - k, b.T):
                net.out_rows[b.n_out] = j
                b.n_out += 1
            b.drafted += k
        for s in by_adapter(prefill):
            if b.T >= self.budget:
                break
            n = min(s.n_prompt - s.n_fed, self.budget - b.T, kv.room(s.slot) - s.n_fed)
            if n <= 0:
                continue
            self._put(b, s, n)
            b.prefill_tokens += n
            if not s.prefilling:
                net.out_rows[b.n_out] = b.T - 1
                b.outs.append(s)
                b.first.append(b.n_out)
                b.n_out += 1
        b.lora = self._lora(b.T)
        return b

    def _put(self, b: Batch, s: Seq, n: int) -> None:
        net, T, start = self.net, b.T, s.n_fed
        if not self.seg_ad or self.seg_ad[-1] is not s.adapter:     # a new adapter segment
            self.seg_start[len(self.seg_ad)] = T
            self.seg_ad.append(s.adapter)
        b.ctx += n * start + n * (n + 1) // 2
        ids, L = s.ids, len(s.ids)
        for j in range(n):
            net.tokens[T + j] = ids[start + j] if start + j < L else s.draft[start + j - L]
            net.pos[T + j] = start + j
            net.seq[T + j] = s.slot
        if self.by_extent:      # transformers' call extents: the prompt's length, then position + 1
            p0 = len(s.result.prompt_ids)
            for j in range(n):
                net.extent[T + j] = max(p0, start + j + 1)
        s.n_fed = start + n
        b.T = T + n
        b.n_seqs += 1

    def _lora(self, T: int):
        """The C view of this batch's adapter segments, or NULL when no row uses an adapter."""
        ads = self.seg_ad
        if all(a is None for a in ads):
            return self.session.NULL
        lb = self.session.lora
        lb.reserve(max(a.kernel_rank for a in ads if a is not None))
        for i, a in enumerate(ads):
            lb.tables[i] = a.table if a is not None else lb.NULL
        return lb.commit(len(ads), T)
