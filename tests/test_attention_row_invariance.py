"""Speculative decoding is exact only if a query position's attention output has the same bits
whether it is computed alone (a decode step, T = 1) or as one of many query positions of a
prefill / verify call, and whether its K/V rows were stored one step at a time or in one call.
Checked for every KV type pair the compressed cache takes, the f32 row-layout kernel, every ISA
variant, with and without a window, for 1 and 2 threads."""
import numpy as np
import pytest

from conftest import P
from infeng.quant.kvcache import CHANNEL, KV_TYPES
from test_kernels_kvq import QPool, run

I32 = "int32_t *"
PAIRS = [(t, t) for t in KV_TYPES if t not in CHANNEL] + [("int4", "int8"), ("int8", "int4"), ("f32", "int4")]


def _rows(rng, lengths, width):
    return [(rng.standard_normal((L, width)).astype(np.float32) * 3,
             rng.standard_normal((L, width)).astype(np.float32)) for L in lengths]


def _calls(lengths, rng):
    """(seq, pos) of every position, split three ways: one call, single-query calls, and
    verify-like chunks of 5 consecutive positions."""
    seq = np.concatenate([np.full(L, s, np.int32) for s, L in enumerate(lengths)])
    pos = np.concatenate([np.arange(L, dtype=np.int32) for L in lengths])
    order = rng.permutation(len(seq))
    whole = [(seq[order], pos[order])]
    single = [(seq[i:i + 1], pos[i:i + 1]) for i in range(len(seq))]
    chunks = [(seq[i:i + 5], pos[i:i + 5]) for i in range(0, len(seq), 5)]
    return seq, pos, {"one call": whole, "decode steps": single, "verify chunks": chunks}


def _by_position(outs_calls, seq, pos):
    """{(seq, pos): output row bytes} of a list of (seq, pos, out) calls."""
    got = {}
    for s, p, out in outs_calls:
        for i in range(len(s)):
            got[(int(s[i]), int(p[i]))] = out[i].tobytes()
    return got


def _same_bits_every_split(lengths, rng, width, attend, finite=False):
    """Each query position's output, computed in every way ``_calls`` splits the positions into
    calls (``attend(q, seq, pos, nth)`` gives one call's outputs), with 1 and 2 threads, has the
    bits of the first way's (and, with ``finite``, that first way's are finite)."""
    seq, pos, calls = _calls(lengths, rng)
    q_all = rng.standard_normal((len(seq), width)).astype(np.float32)
    q_of = {(int(s), int(p)): q_all[i] for i, (s, p) in enumerate(zip(seq, pos))}
    ref = None
    for nth in (1, 2):
        for name, cl in calls.items():
            outs = []
            for s, p in cl:
                q = np.ascontiguousarray(np.stack([q_of[(int(a), int(b))] for a, b in zip(s, p)]))
                outs.append((s, p, attend(q, s, p, nth)))
            got = _by_position(outs, seq, pos)
            if ref is None:
                ref = got
                if finite:
                    assert all(np.isfinite(np.frombuffer(b, np.float32)).all() for b in got.values())
            else:
                bad = [k for k in ref if got[k] != ref[k]]
                assert not bad, f"{name}, {nth} threads: {len(bad)} positions differ, e.g. {bad[:3]}"


@pytest.mark.parametrize("kt,vt", PAIRS)
@pytest.mark.parametrize("window", (0, 21))
def test_kvq_attention_same_bits_for_any_query_count(kern, kt, vt, window):
    rng = np.random.default_rng(len(kt) * 5 + len(vt) + window)
    bs, n_kv, ratio, hd, group = 16, 2, 4, 64, 32
    n_heads = n_kv * ratio
    lengths = [70, 33]
    rows = _rows(rng, lengths, n_kv * hd)
    # stored in one call per sequence (a prefill) and one position at a time (decoding)
    pools = []
    for mode in ("prefill", "decode"):
        pool = QPool(lengths, bs, n_kv, hd, kt, vt, group, np.random.default_rng(3))
        for s, (k, v) in enumerate(rows):
            L = lengths[s]
            if mode == "prefill":
                pool.store(kern, k, v, n_kv * hd, np.full(L, s, np.int32), np.arange(L, dtype=np.int32))
            else:
                for p in range(L):
                    pool.store(kern, k[p:p + 1], v[p:p + 1], n_kv * hd, np.array([s], np.int32),
                               np.array([p], np.int32), nth=1)
        pools.append(pool)
    assert pools[0].k.tobytes() == pools[1].k.tobytes()
    assert pools[0].v.tobytes() == pools[1].v.tobytes()
    _same_bits_every_split(lengths, rng, n_heads * hd, lambda q, s, p, nth: run(
        kern, pools[0], q, n_heads * hd, s, p, n_heads, 0.125, nth, n_heads * hd, window), finite=True)


@pytest.mark.parametrize("window", (0, 21))
def test_f32_attention_same_bits_for_any_query_count(kern, window):
    rng = np.random.default_rng(9 + window)
    bs, n_kv, ratio, hd = 16, 2, 4, 48
    n_heads = n_kv * ratio
    lengths = [70, 33]
    need = [-(-L // bs) for L in lengths]
    max_blocks = max(need)
    table = np.zeros((2, max_blocks), np.int32)
    perm = rng.permutation(sum(need)).astype(np.int32)
    table[0, :need[0]], table[1, :need[1]] = perm[:need[0]], perm[need[0]:]
    kc = np.zeros((sum(need), bs, n_kv, hd), np.float32)
    vc = np.zeros_like(kc)
    for s, (k, v) in enumerate(_rows(rng, lengths, n_kv * hd)):
        L = lengths[s]
        sq, ps = np.full(L, s, np.int32), np.arange(L, dtype=np.int32)     # alive through the call
        kern.lib.ifg_kv_store(P(kern, kc), P(kern, vc), P(kern, k), P(kern, v), n_kv * hd, P(kern, table, I32),
                              max_blocks, bs, P(kern, sq, I32), P(kern, ps, I32), L, n_kv, hd, 1)

    def attend(q, s, p, nth):
        out = np.zeros_like(q)
        kern.lib.ifg_attention_window(P(kern, out), n_heads * hd, P(kern, q), n_heads * hd, P(kern, kc),
                                      P(kern, vc), P(kern, table, I32), max_blocks, bs, P(kern, s, I32),
                                      P(kern, p, I32), len(s), n_heads, n_kv, hd, 0.125, window, nth)
        return out
    _same_bits_every_split(lengths, rng, n_heads * hd, attend)
