"""ifg_kv_store and ifg_attention (paged KV cache, causal, GQA) for every ISA variant.

kv_store: exact placement (a copy). attention: against a float64 numpy causal softmax attention
over the same cache contents; tolerance |out - ref| <= 1e-5 * max|V| + 1e-5 * |ref| (f32 dot
products, f32 online softmax, f32 accumulation of up to 4097 rows; errors seen are ~1e-6).
Block tables are shuffled (a sequence's blocks are scattered over the pool); every cache row not
holding a position of some sequence is NaN, so any read outside 0..pos[t] of the right sequence
shows up. Thread counts 1/2/3 must give bitwise identical results (each (token, kv head) item is
computed by one thread in a fixed order).
"""
import numpy as np
import pytest

from conftest import P

I32 = "int32_t *"


class Pool:
    """A paged cache: n_blocks blocks of block_size rows of [n_kv][head_dim], block tables shuffled."""

    def __init__(self, lengths, block_size, n_kv, head_dim, rng, spare_blocks=3):
        self.bs, self.n_kv, self.hd = block_size, n_kv, head_dim
        need = [(L + block_size - 1) // block_size for L in lengths]
        self.max_blocks = max(need) + 1
        n_blocks = sum(need) + spare_blocks
        perm = rng.permutation(n_blocks).astype(np.int32)
        self.table = np.full((len(lengths), self.max_blocks), -1, np.int32)
        k = 0
        for s, nb in enumerate(need):
            self.table[s, :nb] = perm[k:k + nb]
            k += nb
        self.k = np.full((n_blocks, block_size, n_kv, head_dim), np.nan, np.float32)
        self.v = np.full_like(self.k, np.nan)
        self.lengths = lengths

    def rows(self, s, L):
        p = np.arange(L)
        return self.table[s, p // self.bs], p % self.bs

    def fill(self, rng, kscale=1.0):
        """Random K/V for positions 0..len-1 of every sequence, written directly."""
        for s, L in enumerate(self.lengths):
            b, r = self.rows(s, L)
            self.k[b, r] = (rng.standard_normal((L, self.n_kv, self.hd)) * kscale).astype(np.float32)
            self.v[b, r] = rng.standard_normal((L, self.n_kv, self.hd)).astype(np.float32)


def attention_ref(pool, q, seq, pos, n_heads, scale):
    T = q.shape[0]
    G = n_heads // pool.n_kv
    out = np.zeros((T, n_heads, pool.hd))
    for t in range(T):
        b, r = pool.rows(seq[t], pos[t] + 1)
        K = pool.k[b, r].astype(np.float64)  # [L][n_kv][hd]
        V = pool.v[b, r].astype(np.float64)
        for h in range(n_heads):
            s = K[:, h // G] @ q[t, h].astype(np.float64) * scale
            w = np.exp(s - s.max())
            out[t, h] = (w / w.sum()) @ V[:, h // G]
    return out


def run_attention(kern, pool, q, ldq, seq, pos, n_heads, scale, nth, ldo):
    T = len(seq)
    out = np.full((T, ldo), -7.0, np.float32)
    kern.lib.ifg_attention(P(kern, out), ldo, P(kern, q), ldq, P(kern, pool.k), P(kern, pool.v),
                           P(kern, pool.table, I32), pool.max_blocks, pool.bs,
                           P(kern, seq, I32), P(kern, pos, I32), T, n_heads, pool.n_kv, pool.hd,
                           scale, nth)
    return out


def ragged_batch(lengths, rng, per_seq=3):
    """Several query tokens per sequence: its last positions (a prefill chunk) and random ones."""
    seq, pos = [], []
    for s, L in enumerate(lengths):
        ps = {L - 1} | set(range(max(0, L - per_seq), L)) | set(rng.integers(0, L, size=per_seq).tolist())
        for p in sorted(ps):
            seq.append(s)
            pos.append(p)
    order = rng.permutation(len(seq))  # tokens of different sequences interleaved
    return np.array(seq, np.int32)[order], np.array(pos, np.int32)[order]


def check(out, ref, pool, n_heads, ldo):
    T = ref.shape[0]
    hd = pool.hd
    got = out[:, : n_heads * hd].reshape(T, n_heads, hd)
    vmax = np.nanmax(np.abs(pool.v))
    err = np.abs(got - ref)
    assert np.isfinite(got).all()
    assert (err <= 1e-5 * vmax + 1e-5 * np.abs(ref)).all(), err.max()
    assert (out[:, n_heads * hd:] == -7.0).all()  # row padding untouched


@pytest.mark.parametrize("head_dim", (8, 64, 128, 6, 17, 256))
@pytest.mark.parametrize("ratio", (1, 2, 8))
@pytest.mark.parametrize("block_size", (1, 16, 7))
def test_attention_ragged(kern, head_dim, ratio, block_size):
    rng = np.random.default_rng(head_dim * 100 + ratio * 10 + block_size)
    n_kv = 2 if ratio < 8 else 1
    n_heads = n_kv * ratio
    lengths = [int(x) for x in rng.integers(1, 90, size=3)] + [1, 33]
    pool = Pool(lengths, block_size, n_kv, head_dim, rng)
    pool.fill(rng, kscale=3.0 if head_dim == 6 else 1.0)
    seq, pos = ragged_batch(lengths, rng)
    T = len(seq)
    ldq, ldo = n_heads * head_dim + 5, n_heads * head_dim + 3
    q = np.full((T, ldq), np.nan, np.float32)
    q[:, : n_heads * head_dim] = rng.standard_normal((T, n_heads * head_dim)).astype(np.float32)
    scale = 1.0 / np.sqrt(head_dim)
    ref = attention_ref(pool, q[:, : n_heads * head_dim].reshape(T, n_heads, head_dim), seq, pos, n_heads, scale)
    outs = [run_attention(kern, pool, q, ldq, seq, pos, n_heads, scale, nth, ldo) for nth in (1, 2, 3)]
    check(outs[0], ref, pool, n_heads, ldo)
    for o in outs[1:]:
        assert o.tobytes() == outs[0].tobytes()


@pytest.mark.parametrize("head_dim,ratio", ((64, 2), (8, 1), (128, 8)))
def test_attention_long_context(kern, head_dim, ratio):
    """Positions up to 4096, and sharp softmax (large scores: the running max keeps moving)."""
    rng = np.random.default_rng(head_dim + ratio)
    n_kv = 2
    n_heads = n_kv * ratio
    lengths = [4097, 2500]
    pool = Pool(lengths, 16, n_kv, head_dim, rng)
    pool.fill(rng)
    # a rising trend in the keys' first component makes later rows score higher and higher
    for s, L in enumerate(lengths):
        b, r = pool.rows(s, L)
        pool.k[b, r, :, 0] += np.linspace(0, 30, L, dtype=np.float32)[:, None]
    seq = np.array([0, 1, 0, 1, 0], np.int32)
    pos = np.array([4096, 2499, 1000, 0, 31], np.int32)
    T = len(seq)
    q = rng.standard_normal((T, n_heads * head_dim)).astype(np.float32)
    q[:, ::head_dim] = np.abs(q[:, ::head_dim]) + 1.0
    scale = 1.0 / np.sqrt(head_dim)
    ref = attention_ref(pool, q.reshape(T, n_heads, head_dim), seq, pos, n_heads, scale)
    out = run_attention(kern, pool, q, n_heads * head_dim, seq, pos, n_heads, scale, 2, n_heads * head_dim)
    check(out, ref, pool, n_heads, n_heads * head_dim)


def test_attention_single_position_is_v(kern):
    """pos = 0: the output is exactly V[0] (softmax of one score is 1)."""
    rng = np.random.default_rng(1)
    pool = Pool([1], 4, 2, 64, rng)
    pool.fill(rng)
    q = rng.standard_normal((1, 4 * 64)).astype(np.float32) * 100
    out = run_attention(kern, pool, q, 256, np.zeros(1, np.int32), np.zeros(1, np.int32), 4, 0.125, 1, 256)
    b, r = pool.rows(0, 1)
    v0 = pool.v[b[0], r[0]]  # [n_kv][hd]
    np.testing.assert_array_equal(out.reshape(4, 64), np.repeat(v0, 2, axis=0))


@pytest.mark.parametrize("block_size", (1, 16, 7))
def test_kv_store(kern, block_size):
    rng = np.random.default_rng(block_size)
    n_kv, hd = 3, 10
    lengths = [20, 5, 41]
    pool = Pool(lengths, block_size, n_kv, hd, rng)
    seq = np.array([s for s, L in enumerate(lengths) for _ in range(L)], np.int32)
    pos = np.array([p for L in lengths for p in range(L)], np.int32)
    order = rng.permutation(len(seq))
    seq, pos = seq[order], pos[order]
    T = len(seq)
    ldkv = n_kv * hd + 4
    k = rng.standard_normal((T, ldkv)).astype(np.float32)
    v = rng.standard_normal((T, ldkv)).astype(np.float32)
    for nth in (1, 2, 3):
        pool.k[:] = np.nan
        pool.v[:] = np.nan
        kern.lib.ifg_kv_store(P(kern, pool.k), P(kern, pool.v), P(kern, k), P(kern, v), ldkv,
                              P(kern, pool.table, I32), pool.max_blocks, block_size,
                              P(kern, seq, I32), P(kern, pos, I32), T, n_kv, hd, nth)
        b = pool.table[seq, pos // block_size]
        r = pos % block_size
        np.testing.assert_array_equal(pool.k[b, r], k[:, : n_kv * hd].reshape(T, n_kv, hd))
        np.testing.assert_array_equal(pool.v[b, r], v[:, : n_kv * hd].reshape(T, n_kv, hd))
        assert np.isnan(pool.k).sum() == pool.k.size - T * n_kv * hd  # nothing else written


def test_store_then_attend_decode_steps(kern):
    """The engine's pattern: each step stores the new token's K/V, then attends; the output of a
    step equals attention over the whole prefix computed at once."""
    rng = np.random.default_rng(9)
    n_kv, hd, n_heads, bs = 2, 64, 4, 16
    lengths = [40, 23]
    pool = Pool(lengths, bs, n_kv, hd, rng)
    kk = [rng.standard_normal((L, n_kv * hd)).astype(np.float32) for L in lengths]
    vv = [rng.standard_normal((L, n_kv * hd)).astype(np.float32) for L in lengths]
    qq = [rng.standard_normal((L, n_heads * hd)).astype(np.float32) for L in lengths]
    scale = 0.125
    steps = []
    for p in range(max(lengths)):
        seqs = [s for s, L in enumerate(lengths) if p < L]
        seq = np.array(seqs, np.int32)
        pos = np.full(len(seqs), p, np.int32)
        k = np.stack([kk[s][p] for s in seqs])
        v = np.stack([vv[s][p] for s in seqs])
        kern.lib.ifg_kv_store(P(kern, pool.k), P(kern, pool.v), P(kern, k), P(kern, v), n_kv * hd,
                              P(kern, pool.table, I32), pool.max_blocks, bs, P(kern, seq, I32), P(kern, pos, I32),
                              len(seqs), n_kv, hd, 2)
        q = np.stack([qq[s][p] for s in seqs])
        steps.append((seq, pos, q, run_attention(kern, pool, q, n_heads * hd, seq, pos, n_heads, scale, 2, n_heads * hd)))
    for seq, pos, q, out in steps:
        ref = attention_ref(pool, q.reshape(len(seq), n_heads, hd), seq, pos, n_heads, scale)
        check(out, ref, pool, n_heads, n_heads * hd)


@pytest.mark.parametrize("window", [1, 5, 33, 100])
def test_sliding_window_reads_only_the_window(kern, window):
    """ifg_attention_window: token t attends to positions pos-window+1..pos; every row before the
    window is NaN, so a read outside it shows; window >= pos+1 is plain causal attention."""
    rng = np.random.default_rng(window)
    lengths, n_heads, n_kv, hd = [90, 41], 4, 2, 24
    pool = Pool(lengths, 7, n_kv, hd, rng)
    pool.fill(rng)
    seq = np.array([0, 0, 0, 1, 1], np.int32)
    pos = np.array([50, 70, 89, 30, 40], np.int32)
    want = np.zeros((len(seq), n_heads, hd))
    q = rng.standard_normal((len(seq), n_heads * hd)).astype(np.float32)
    for t in range(len(seq)):
        first = max(0, pos[t] + 1 - window)
        b, r = pool.rows(seq[t], pos[t] + 1)
        K, V = pool.k[b, r][first:].astype(np.float64), pool.v[b, r][first:].astype(np.float64)
        for h in range(n_heads):
            s = K[:, h // (n_heads // n_kv)] @ q[t].reshape(n_heads, hd)[h].astype(np.float64) * 0.2
            w = np.exp(s - s.max())
            want[t, h] = (w / w.sum()) @ V[:, h // (n_heads // n_kv)]
    for s in (0, 1):                           # rows before every window of the sequence: never read
        b, r = pool.rows(s, max(0, min(pos[seq == s]) + 1 - window))
        pool.k[b, r] = np.nan
        pool.v[b, r] = np.nan
    out = np.full((len(seq), n_heads * hd), -7.0, np.float32)
    kern.lib.ifg_attention_window(P(kern, out), n_heads * hd, P(kern, q), n_heads * hd, P(kern, pool.k),
                                  P(kern, pool.v), P(kern, pool.table, I32), pool.max_blocks, pool.bs,
                                  P(kern, seq, I32), P(kern, pos, I32), len(seq), n_heads, n_kv, hd, 0.2,
                                  window, 2)
    np.testing.assert_allclose(out.reshape(want.shape), want, atol=1e-5, rtol=1e-5)
