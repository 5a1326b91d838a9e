"""ifg_kvq_store / ifg_kvq_attention (the compressed paged KV cache) and ifg_hadamard, for every
ISA variant, against the numpy reference of infeng.quant.kvcache.

store: the bytes the C store writes equal the reference's encoding of the same rows (same
scales, same codes: the same rounding), for every type pair. attention: against a float64
causal softmax attention over the values the reference decodes from the C-written cache, with
the f32 attention test's tolerance; block tables shuffled, unwritten parts NaN-filled, ragged
batches, GQA, windows, head_dim at SIMD tails (8, 24), thread counts 1/2/3 bitwise identical.
"""
import numpy as np
import pytest

from conftest import P
from infeng.kernels.abi import KV_TYPE
from infeng.quant.kvcache import CHANNEL, KV_TYPES, decode_part, encode_part, hadamard, part_bytes, rotation_signs, roundtrip

I32 = "int32_t *"
TYPES = tuple(t for t in KV_TYPES if t not in CHANNEL)   # per-channel keys: test_kvq_channel.py


class QPool:
    """A compressed paged cache of one layer: [n_blocks][n_kv][part] bytes per K and V."""

    def __init__(self, lengths, bs, n_kv, hd, kt, vt, group, rng, spare=3):
        self.bs, self.n_kv, self.hd, self.kt, self.vt, self.group = bs, n_kv, hd, kt, vt, group
        need = [-(-L // bs) for L in lengths]
        self.max_blocks = max(need) + 1
        self.n_blocks = sum(need) + spare
        perm = rng.permutation(self.n_blocks).astype(np.int32)
        self.table = np.full((len(lengths), self.max_blocks), -1, np.int32)
        k = 0
        for s, nb in enumerate(need):
            self.table[s, :nb] = perm[k:k + nb]
            k += nb
        self.kpb, self.vpb = part_bytes(kt, bs, hd, group), part_bytes(vt, bs, hd, group)
        # 0xFF bytes: NaN in f32/bf16 parts, so a read of an unwritten f32 position shows up
        self.k = np.full(self.n_blocks * n_kv * self.kpb, 0xFF, np.uint8)
        self.v = np.full(self.n_blocks * n_kv * self.vpb, 0xFF, np.uint8)
        self.lengths = lengths

    def store(self, kern, k, v, ldkv, seq, pos, nth=2):
        kern.lib.ifg_kvq_store(P(kern, self.k, "void *"), P(kern, self.v, "void *"), KV_TYPE[self.kt],
                               KV_TYPE[self.vt], self.group, P(kern, k), P(kern, v), ldkv, kern.ffi.NULL, 0,
                               P(kern, self.table, I32), self.max_blocks, self.bs, P(kern, seq, I32),
                               P(kern, pos, I32), len(seq), self.n_kv, self.hd, nth)

    def part(self, which, b, h):
        pb = self.kpb if which == "k" else self.vpb
        buf = self.k if which == "k" else self.v
        o = (b * self.n_kv + h) * pb
        return buf[o:o + pb]

    def values(self, which, s, L):
        """Decoded [L][n_kv][hd] of sequence s's first L positions."""
        t = self.kt if which == "k" else self.vt
        out = np.zeros((L, self.n_kv, self.hd), np.float32)
        for j in range(-(-L // self.bs)):
            b = self.table[s, j]
            n = min(self.bs, L - j * self.bs)
            for h in range(self.n_kv):
                dec = decode_part(self.part(which, b, h), t, self.bs, self.hd, self.group, which == "k")
                out[j * self.bs:j * self.bs + n, h] = dec[:n]
        return out


def fill(kern, pool, rng, kscale=1.0):
    """Random K/V rows for every position of every sequence, stored by the C store in a shuffled
    order; returns the f32 rows per sequence."""
    rows, seq, pos = [], [], []
    for s, L in enumerate(pool.lengths):
        k = (rng.standard_normal((L, pool.n_kv * pool.hd)) * kscale).astype(np.float32)
        v = rng.standard_normal((L, pool.n_kv * pool.hd)).astype(np.float32)
        rows.append((k, v))
        seq += [s] * L
        pos += list(range(L))
    order = rng.permutation(len(seq))
    seq, pos = np.array(seq, np.int32)[order], np.array(pos, np.int32)[order]
    K = np.stack([rows[s][0][p] for s, p in zip(seq, pos)])
    V = np.stack([rows[s][1][p] for s, p in zip(seq, pos)])
    pool.store(kern, K, V, pool.n_kv * pool.hd, seq, pos)
    return rows


# What a kernel's output may differ from the float64 reference by, per unit of Σ_j w_j·|v_j|: int4
# values are weighted by bf16(w·scale) (a relative 2^-8 each at most) so AVX-512 can use bf16 dot products.
VALUE_ROUNDING = {t: 2.0 ** -8 if t == "int4" else 0.0 for t in KV_TYPES}


def attention_ref(pool, q, seq, pos, n_heads, scale, window=0):
    """float64 attention over the values the cache decodes, and the slack its value rounding allows."""
    T = q.shape[0]
    G = n_heads // pool.n_kv
    out, slack = np.zeros((T, n_heads, pool.hd)), np.zeros((T, n_heads, pool.hd))
    for t in range(T):
        K = pool.values("k", seq[t], pos[t] + 1).astype(np.float64)
        V = pool.values("v", seq[t], pos[t] + 1).astype(np.float64)
        first = pos[t] + 1 - window if window > 0 and pos[t] + 1 > window else 0
        for h in range(n_heads):
            s = K[first:, h // G] @ q[t, h].astype(np.float64) * scale
            w = np.exp(s - s.max())
            out[t, h] = (w / w.sum()) @ V[first:, h // G]
            slack[t, h] = (w / w.sum()) @ np.abs(V[first:, h // G])
    return out, VALUE_ROUNDING[pool.vt] * slack


def run(kern, pool, q, ldq, seq, pos, n_heads, scale, nth, ldo, window=0):
    T = len(seq)
    out = np.full((T, ldo), -7.0, np.float32)
    kern.lib.ifg_kvq_attention(P(kern, out), ldo, P(kern, q), ldq, P(kern, pool.k, "void *"),
                               P(kern, pool.v, "void *"), KV_TYPE[pool.kt], KV_TYPE[pool.vt], pool.group,
                               kern.ffi.NULL, 0, kern.ffi.NULL, 0, P(kern, pool.table, I32), pool.max_blocks, pool.bs, P(kern, seq, I32),
                               P(kern, pos, I32), T, n_heads, pool.n_kv, pool.hd, scale, window, nth)
    return out


def queries(lengths, rng, per_seq=3):
    seq, pos = [], []
    for s, L in enumerate(lengths):
        for p in sorted({L - 1} | set(range(max(0, L - per_seq), L)) | set(rng.integers(0, L, per_seq).tolist())):
            seq.append(s)
            pos.append(p)
    order = rng.permutation(len(seq))
    return np.array(seq, np.int32)[order], np.array(pos, np.int32)[order]


@pytest.mark.parametrize("kt,vt", [(t, t) for t in TYPES] + [("int4", "int8"), ("f32", "int4"), ("bf16", "f32")])
@pytest.mark.parametrize("hd,group", ((64, 32), (64, 64), (8, 8), (24, 24), (128, 32)))
def test_store_matches_reference_bytes(kern, kt, vt, hd, group):
    rng = np.random.default_rng(hd + group)
    bs, n_kv = 32, 3
    pool = QPool([40, 32, 7], bs, n_kv, hd, kt, vt, group, rng)
    rows = fill(kern, pool, rng, kscale=5.0)
    for s, L in enumerate(pool.lengths):
        k, v = rows[s]
        for which, x, t in (("k", k, kt), ("v", v, vt)):
            x = x.reshape(L, n_kv, hd)
            # every stored position reads back as the reference's round trip, bit for bit
            got = pool.values(which, s, L)
            assert got.tobytes() == roundtrip(x, t, group).tobytes()
            # a full block's bytes are the reference encoding (scales, codes, nibble order)
            for j in range(L // bs):
                for h in range(n_kv):
                    ref = encode_part(x[j * bs:(j + 1) * bs, h], t, group, which == "k")
                    assert pool.part(which, pool.table[s, j], h).tobytes() == ref.tobytes()


@pytest.mark.parametrize("kt,vt", [(t, t) for t in TYPES] + [("int4", "int8"), ("f32", "int4")])
@pytest.mark.parametrize("hd,ratio,group,bs", ((64, 8, 32, 16), (8, 2, 8, 32), (24, 3, 24, 16), (128, 1, 32, 32),
                                               (64, 16, 64, 16), (64, 20, 32, 16)))
def test_attention_ragged(kern, kt, vt, hd, ratio, group, bs):
    rng = np.random.default_rng(hd * 7 + ratio + bs)
    n_kv = 2
    n_heads = n_kv * ratio
    lengths = [int(x) for x in rng.integers(1, 90, size=2)] + [1, 33, 48]
    pool = QPool(lengths, bs, n_kv, hd, kt, vt, group, rng)
    fill(kern, pool, rng)
    seq, pos = queries(lengths, rng)
    T = len(seq)
    ldq, ldo = n_heads * hd + 5, n_heads * hd + 3
    q = np.full((T, ldq), np.nan, np.float32)
    q[:, :n_heads * hd] = rng.standard_normal((T, n_heads * hd)).astype(np.float32)
    scale = 1.0 / np.sqrt(hd)
    ref, slack = attention_ref(pool, q[:, :n_heads * hd].reshape(T, n_heads, hd), seq, pos, n_heads, scale)
    outs = [run(kern, pool, q, ldq, seq, pos, n_heads, scale, nth, ldo) for nth in (1, 2, 3)]
    got = outs[0][:, :n_heads * hd].reshape(T, n_heads, hd)
    vmax = max(np.abs(pool.values("v", s, L)).max() for s, L in enumerate(lengths))
    assert np.isfinite(got).all()
    err = np.abs(got - ref)
    assert (err <= 1e-5 * vmax + 1e-5 * np.abs(ref) + slack).all(), err.max()
    assert (outs[0][:, n_heads * hd:] == -7.0).all()
    for o in outs[1:]:
        assert o.tobytes() == outs[0].tobytes()


@pytest.mark.parametrize("kt,vt", (("int8", "int8"), ("int4", "int4"), ("bf16", "int4")))
def test_attention_window_and_depth(kern, kt, vt):
    """A window that starts mid-block, and 4096 positions with a rising key trend (the running
    max keeps moving)."""
    rng = np.random.default_rng(5)
    hd, n_kv, ratio = 64, 2, 4
    n_heads = n_kv * ratio
    pool = QPool([4097, 300], 16, n_kv, hd, kt, vt, 32, rng)
    rows = fill(kern, pool, rng)
    # rewrite the keys of sequence 0 with a trend in channel 0
    k0 = rows[0][0].copy()
    k0[:, ::hd] += np.linspace(0, 30, 4097, dtype=np.float32)[:, None]
    p = np.arange(4097, dtype=np.int32)
    pool.store(kern, k0, rows[0][1], n_kv * hd, np.zeros(4097, np.int32), p)
    seq = np.array([0, 1, 0, 1, 0], np.int32)
    pos = np.array([4096, 299, 1000, 0, 31], np.int32)
    q = rng.standard_normal((5, n_heads * hd)).astype(np.float32)
    q[:, ::hd] = np.abs(q[:, ::hd]) + 1.0
    for window in (0, 37):
        ref, slack = attention_ref(pool, q.reshape(5, n_heads, hd), seq, pos, n_heads, 0.125, window)
        got = run(kern, pool, q, n_heads * hd, seq, pos, n_heads, 0.125, 2, n_heads * hd, window)
        err = np.abs(got.reshape(5, n_heads, hd) - ref)
        assert (err <= 1e-5 * 5 + 1e-5 * np.abs(ref) + slack).all(), err.max()


@pytest.mark.parametrize("hd", (1, 2, 8, 16, 32, 64, 128, 256))
def test_hadamard_matches_reference_and_keeps_dot_products(kern, hd):
    rng = np.random.default_rng(hd)
    rows, heads, ld = 5, 3, 3 * hd + 2
    x = rng.standard_normal((rows, ld)).astype(np.float32)
    signs = rotation_signs(hd, 11)
    y = x.copy()
    kern.lib.ifg_hadamard(P(kern, y), ld, P(kern, signs), rows, heads, hd, 2)
    ref = hadamard(x[:, :heads * hd].reshape(rows, heads, hd), signs).reshape(rows, heads * hd)
    assert y[:, :heads * hd].tobytes() == ref.tobytes()          # the same butterflies, bit for bit
    assert y[:, heads * hd:].tobytes() == x[:, heads * hd:].tobytes()
    a, b = x[:, :heads * hd].reshape(-1, hd).astype(np.float64), ref.reshape(-1, hd).astype(np.float64)
    np.testing.assert_allclose((b @ b.T), (a @ a.T), rtol=1e-5, atol=1e-4)   # orthogonal


@pytest.mark.parametrize("hd", (1, 2, 8, 16, 64, 128, 256))
def test_hadamard_transpose_matches_reference_and_inverts_the_rotation(kern, hd):
    rng = np.random.default_rng(hd + 1)
    rows, heads, ld = 4, 3, 3 * hd + 5
    x = rng.standard_normal((rows, ld)).astype(np.float32)
    signs = rotation_signs(hd, 3)
    y = x.copy()
    kern.lib.ifg_hadamard_t(P(kern, y), ld, P(kern, signs), rows, heads, hd, 2)
    ref = hadamard(x[:, :heads * hd].reshape(rows, heads, hd), signs, transpose=True).reshape(rows, heads * hd)
    assert y[:, :heads * hd].tobytes() == ref.tobytes()
    assert y[:, heads * hd:].tobytes() == x[:, heads * hd:].tobytes()
    kern.lib.ifg_hadamard(P(kern, y), ld, P(kern, signs), rows, heads, hd, 1)
    np.testing.assert_allclose(y, x, rtol=0, atol=1e-5 * max(1, np.log2(hd)))   # Rᵀ then R: the identity


def test_hadamard_leaves_a_non_power_of_two_head_alone(kern):
    """head_dim 24: the kernel leaves the data alone (the runtime refuses rotation by name)."""
    x = np.arange(48, dtype=np.float32)
    y = x.copy()
    kern.lib.ifg_hadamard(P(kern, y), 48, P(kern, np.ones(24, np.float32)), 1, 2, 24, 1)
    assert y.tobytes() == x.tobytes()


def test_rotation_spreads_an_outlier_channel():
    """Why keys are rotated before int4: one huge channel costs every other channel its
    precision; after the rotation the int4 round trip error of q·k falls."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((256, 64)).astype(np.float32)
    k[:, 3] *= 40
    q = rng.standard_normal((64,)).astype(np.float32)
    s = rotation_signs(64, 0)
    plain = np.abs(roundtrip(k, "int4", 32) @ q - k @ q).mean()
    rot = np.abs(roundtrip(hadamard(k, s), "int4", 32) @ hadamard(q, s) - k @ q).mean()
    assert rot < 0.6 * plain


def test_value_rotation_spreads_an_outlier_channel():
    """Why values are rotated too: an attention output (a weighted mean of values) over int4
    values whose one channel is large loses every other channel's precision; stored rotated and
    rotated back, its error falls."""
    rng = np.random.default_rng(1)
    v = rng.standard_normal((256, 64)).astype(np.float32)
    v[:, 5] *= 30
    p = rng.random(256).astype(np.float32)
    p /= p.sum()
    s = rotation_signs(64, 0)
    plain = np.abs(p @ roundtrip(v, "int4", 32) - p @ v)[np.arange(64) != 5].mean()
    rot = np.abs(hadamard(p @ roundtrip(hadamard(v, s), "int4", 32), s, transpose=True) - p @ v)[np.arange(64) != 5].mean()
    assert rot < 0.6 * plain
