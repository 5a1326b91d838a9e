"""Per-channel (KIVI) keys, int8c / int4c, in the compressed cache (kernels_c/kvq.h), every ISA:
a group of 16 positions is quantized when its last position is stored; until then its rows are
f32 in the caller's stage, and a query reads its own group in f32 (from the call's rows or the
stage), the groups before it quantized.

Each test drives the kernels as the forward pass does, call by call: store, attention (with the
call's key rows), then the stage update. Checked: complete blocks' bytes equal the numpy
reference's encoding whatever the split into calls; attention against a float64 reference over
exactly those keys; every split (one prefill call, decode steps, verify chunks) and 1 / 2 threads
give the same bits; a rejected draft that ran past a group's end leaves nothing behind."""
import numpy as np
import pytest

from conftest import P
from infeng.kernels.abi import KV_TYPE, KVQ_SHAPE
from infeng.quant.kvcache import POS, channel_groups, channel_scores, encode_part, roundtrip
from test_kernels_kvq import VALUE_ROUNDING, QPool

I32 = "int32_t *"
S = 2 * KVQ_SHAPE["pos"]
PAIRS = (("int4c", "int4"), ("int8c", "int8"), ("int4c", "f32"))


class ChanPool(QPool):
    """QPool with the per-sequence stage; ``call`` is one forward pass's cache work."""

    def __init__(self, lengths, bs, n_kv, hd, kt, vt, group, rng):
        super().__init__(lengths, bs, n_kv, hd, kt, vt, group, rng)
        self.stage = np.full((len(lengths), S, n_kv * hd), np.nan, np.float32)

    def call(self, kern, k, v, q, seq, pos, n_heads, window=0, nth=2):
        k, v, q = (np.ascontiguousarray(a, np.float32) for a in (k, v, q))
        seq, pos = np.ascontiguousarray(seq, np.int32), np.ascontiguousarray(pos, np.int32)
        T, ld = len(seq), self.n_kv * self.hd
        out = np.full((T, n_heads * self.hd), -7.0, np.float32)
        lib = kern.lib
        lib.ifg_kvq_store(P(kern, self.k, "void *"), P(kern, self.v, "void *"), KV_TYPE[self.kt], KV_TYPE[self.vt],
                          self.group, P(kern, k), P(kern, v), ld, P(kern, self.stage), S, P(kern, self.table, I32),
                          self.max_blocks, self.bs, P(kern, seq, I32), P(kern, pos, I32), T, self.n_kv, self.hd, nth)
        lib.ifg_kvq_attention(P(kern, out), n_heads * self.hd, P(kern, q), n_heads * self.hd,
                              P(kern, self.k, "void *"), P(kern, self.v, "void *"), KV_TYPE[self.kt],
                              KV_TYPE[self.vt], self.group, P(kern, k), ld, P(kern, self.stage), S,
                              P(kern, self.table, I32), self.max_blocks, self.bs, P(kern, seq, I32), P(kern, pos, I32),
                              T, n_heads, self.n_kv, self.hd, float(1 / np.sqrt(self.hd)), window, nth)
        lib.ifg_kvq_stage(P(kern, self.stage), S, P(kern, k), ld, P(kern, seq, I32), P(kern, pos, I32), T, self.n_kv,
                          self.hd, nth)
        return out


def _data(rng, lengths, n_kv, hd, n_heads):
    """Keys with a per-channel offset (what per-channel groups are for), values, queries."""
    out = []
    for L in lengths:
        off = rng.standard_normal(n_kv * hd).astype(np.float32) * 4
        k = (rng.standard_normal((L, n_kv * hd)) + off).astype(np.float32)
        v = rng.standard_normal((L, n_kv * hd)).astype(np.float32)
        q = rng.standard_normal((L, n_heads * hd)).astype(np.float32)
        out.append((k, v, q))
    return out


def _splits(lengths, how):
    """[(s, start, end)] calls: one prefill call per sequence, decode steps, or chunks of 5."""
    step = {"prefill": max(lengths), "decode": 1, "verify": 5}[how]
    return [(s, a, min(a + step, L)) for s, L in enumerate(lengths) for a in range(0, L, step)]


def _run(kern, pool, data, lengths, how, n_heads, window=0, nth=2, batched=False):
    """Outputs {(s, p): row} of every position, computed call by call as split by ``how``;
    ``batched``: each step's calls of all sequences in one call (a ragged batch)."""
    got = {}
    calls = _splits(lengths, how)
    groups = [[c] for c in calls]
    if batched:
        by_step: dict[int, list] = {}
        for c in calls:
            by_step.setdefault(c[1], []).append(c)
        groups = list(by_step.values())
    for g in groups:
        seq = np.concatenate([np.full(b - a, s) for s, a, b in g])
        pos = np.concatenate([np.arange(a, b) for s, a, b in g])
        k = np.concatenate([data[s][0][a:b] for s, a, b in g])
        v = np.concatenate([data[s][1][a:b] for s, a, b in g])
        q = np.concatenate([data[s][2][a:b] for s, a, b in g])
        out = pool.call(kern, k, v, q, seq, pos, n_heads, window, nth)
        for i, (s, p) in enumerate(zip(seq, pos)):
            got[(int(s), int(p))] = out[i]
    return got


def _reference(data, s, p, kt, vt, group, n_kv, hd, n_heads, window):
    """float64 attention of query p of sequence s over the keys the cache gives it: complete
    groups before p's own as quantized, the own group's rows as they are."""
    k, v, q = data[s]
    g0 = p - p % POS
    K = k[:p + 1].reshape(-1, n_kv, hd).astype(np.float64)
    qp = q[p].reshape(1, n_heads, hd)
    V = roundtrip(v[:p + 1].reshape(-1, n_kv, hd), vt, group).astype(np.float64)
    first = p + 1 - window if window > 0 and p + 1 > window else 0
    G = n_heads // n_kv
    # the complete groups' scores as the cache sums them (bf16(q·s)·code + q·min), the own group's in f64
    sc = np.concatenate([channel_scores(qp, *channel_groups(k[:g0].reshape(-1, n_kv, hd), kt), kt)[:, 0],
                         np.einsum("hd,phd->hp", qp[0].astype(np.float64), np.repeat(K[g0:], G, axis=1))], axis=1)
    out, slack = np.zeros((n_heads, hd)), np.zeros((n_heads, hd))
    for h in range(n_heads):
        w = np.exp((sc[h, first:] - sc[h, first:].max()) / np.sqrt(hd))
        out[h] = (w / w.sum()) @ V[first:, h // G]
        slack[h] = (w / w.sum()) @ np.abs(V[first:, h // G])
    return out.reshape(-1), (VALUE_ROUNDING[vt] * slack).reshape(-1)


@pytest.mark.parametrize("kt,vt", PAIRS)
@pytest.mark.parametrize("hd,ratio,group,bs", ((64, 4, 32, 16), (8, 2, 8, 32), (24, 3, 24, 48), (256, 2, 32, 16)))
def test_store_and_attention_against_reference(kern, kt, vt, hd, ratio, group, bs):
    rng = np.random.default_rng(hd + ratio + bs)
    n_kv = 2
    n_heads = n_kv * ratio
    lengths = [70, 33, 16]
    data = _data(rng, lengths, n_kv, hd, n_heads)
    pools = {how: ChanPool(lengths, bs, n_kv, hd, kt, vt, group, np.random.default_rng(3))
             for how in ("prefill", "decode", "verify")}
    outs = {how: _run(kern, pool, data, lengths, how, n_heads) for how, pool in pools.items()}
    pool = pools["decode"]
    for s, L in enumerate(lengths):
        k, v = data[s][0].reshape(L, n_kv, hd), data[s][1].reshape(L, n_kv, hd)
        for j in range(L // bs):               # complete blocks: the reference's bytes, every split
            for h in range(n_kv):
                ref_k = encode_part(k[j * bs:(j + 1) * bs, h], kt, group, True)
                ref_v = encode_part(v[j * bs:(j + 1) * bs, h], vt, group, False)
                for how, pl in pools.items():
                    b = pl.table[s, j]
                    assert pl.part("k", b, h).tobytes() == ref_k.tobytes(), how
                    assert pl.part("v", b, h).tobytes() == ref_v.tobytes(), how
        for p in range(L):
            ref, slack = _reference(data, s, p, kt, vt, group, n_kv, hd, n_heads, 0)
            got = outs["decode"][(s, p)]
            vmax = np.abs(v[:p + 1]).max()
            assert np.isfinite(got).all()
            err = np.abs(got - ref)
            assert (err <= 1e-5 * vmax + 1e-5 * np.abs(ref) + slack).all(), (s, p, err.max())
    assert pool.k.size and pool.v.size


@pytest.mark.parametrize("kt,vt", PAIRS[:2])
@pytest.mark.parametrize("window", (0, 21))
def test_same_bits_for_any_split_and_thread_count(kern, kt, vt, window):
    rng = np.random.default_rng(11 + window)
    n_kv, ratio, hd, bs = 2, 4, 64, 16
    n_heads = n_kv * ratio
    lengths = [70, 33]
    data = _data(rng, lengths, n_kv, hd, n_heads)
    ref = None
    for how in ("prefill", "decode", "verify"):
        for nth in (1, 2):
            for batched in (False, True):
                pool = ChanPool(lengths, bs, n_kv, hd, kt, vt, 32, np.random.default_rng(4))
                got = _run(kern, pool, data, lengths, how, n_heads, window, nth, batched)
                got = {key: row.tobytes() for key, row in got.items()}
                if ref is None:
                    ref = got
                    continue
                bad = [key for key in ref if got[key] != ref[key]]
                assert not bad, f"{how}, {nth} threads, batched {batched}: {len(bad)} differ, e.g. {bad[:3]}"


@pytest.mark.parametrize("kt,vt", PAIRS[:2])
def test_rejected_draft_past_a_group_end(kern, kt, vt):
    """A verify call writes positions 26..42 (17: the longest draft), 35.. are rejected and
    rewritten: the group 32..47 it completed with the rejected rows is quantized again from the
    accepted ones, and every later output equals a run that never saw the draft."""
    rng = np.random.default_rng(21)
    n_kv, ratio, hd, bs = 2, 2, 32, 32
    n_heads = n_kv * ratio
    L = 70
    (k, v, q), = _data(rng, [L], n_kv, hd, n_heads)
    clean = ChanPool([L], bs, n_kv, hd, kt, vt, 32, np.random.default_rng(5))
    ref = {}
    for a, b in ((0, 26), (26, 35), *((p, p + 1) for p in range(35, L))):
        out = clean.call(kern, k[a:b], v[a:b], q[a:b], np.zeros(b - a), np.arange(a, b), n_heads)
        ref.update({p: out[p - a] for p in range(a, b)})
    pool = ChanPool([L], bs, n_kv, hd, kt, vt, 32, np.random.default_rng(5))
    pool.call(kern, k[:26], v[:26], q[:26], np.zeros(26), np.arange(26), n_heads)
    bad_k, bad_v = k[26:43].copy(), v[26:43].copy()
    bad_k[9:] = rng.standard_normal(bad_k[9:].shape) * 50          # positions 35..42 rejected
    bad_v[9:] = rng.standard_normal(bad_v[9:].shape) * 50
    out = pool.call(kern, bad_k, bad_v, q[26:43], np.zeros(17), np.arange(26, 43), n_heads)
    for p in range(26, 35):
        assert out[p - 26].tobytes() == ref[p].tobytes()
    for p in range(35, L):
        out = pool.call(kern, k[p:p + 1], v[p:p + 1], q[p:p + 1], np.zeros(1), np.array([p]), n_heads)
        assert out[0].tobytes() == ref[p].tobytes(), p
    assert pool.k.tobytes() == clean.k.tobytes()
