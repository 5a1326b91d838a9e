/* sample.c — argmax (vectorised) and temperature / top-k / top-p sampling.
 *
 * Order: tokens sorted by s = logits/temperature (f32) descending, ties by ascending index;
 * exp is monotone, so this is descending probability (HF sorts the scaled logits too). The
 * order key is recomputed from the logits (one f32 division) so that probs can hold the
 * masses e = exp(s - max s), summed in f64.
 *
 * Nothing is ever fully sorted. One vector pass computes the masses and a histogram of them
 * over SMP_B buckets of s (bucket order = token order). top-k walks the bucket counts and
 * quickselects by rank inside the bucket holding the k-th token; the top-p cut and the
 * inverse-CDF draw walk the bucket masses, gather the one bucket holding the crossing point
 * (a vector pass) and run a "weighted quickselect" inside it (partition, sum the mass before
 * the pivot, recurse into the side holding the crossing). A few O(n) vector passes plus work
 * on one bucket; a depth budget falls back to heapsort (worst case O(n log n)). */
#include "sample.h"
#include "act.h"

static int smp_argmax_ref(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

#ifdef IFG_SIMD
/* The maximum (NaN skipped), then the first lane equal to it. */
static int smp_argmax(const float *x, int n) {
    if (n < IFG_VW) return smp_argmax_ref(x, n);
    int i = 0;
    ifg_vf mv = ifg_vset1(-INFINITY);
    for (; i + IFG_VW <= n; i += IFG_VW) mv = ifg_vmax(ifg_vload(x + i), mv);
    float m = ifg_vhmax(mv);
    for (; i < n; i++) if (x[i] > m) m = x[i];
    const ifg_vf mb = ifg_vset1(m);
    for (i = 0; i + IFG_VW <= n; i += IFG_VW) {
        const unsigned k = ifg_vmbits(ifg_vcmpeq(ifg_vload(x + i), mb));
        if (k) return i + __builtin_ctz(k);
    }
    for (; i < n; i++) if (x[i] == m) return i;
    return 0; /* all NaN */
}
#else
#define smp_argmax smp_argmax_ref
#endif

int ifg_argmax(const float *x, int n) { return smp_argmax(x, n); }

struct smp_ctx { const float *l; const float *e; float T; };

static inline float smp_key(const struct smp_ctx *c, int32_t a) { return c->l[a] / c->T; }
/* does token a (key sa) come before token b (key sb)? */
static inline int smp_before_k(float sa, int32_t a, float sb, int32_t b) {
    return sa > sb || (sa == sb && a < b);
}
static inline int smp_before(const struct smp_ctx *c, int32_t a, int32_t b) {
    return smp_before_k(smp_key(c, a), a, smp_key(c, b), b);
}

static void smp_insertion_sort(const struct smp_ctx *c, int32_t *idx, int lo, int hi) {
    for (int i = lo + 1; i < hi; i++) {
        int32_t a = idx[i];
        float sa = smp_key(c, a);
        int j = i;
        while (j > lo && smp_before_k(sa, a, smp_key(c, idx[j - 1]), idx[j - 1])) { idx[j] = idx[j - 1]; j--; }
        idx[j] = a;
    }
}

static void smp_sift(const struct smp_ctx *c, int32_t *h, int root, int n) {
    for (;;) {
        int ch = 2 * root + 1;
        if (ch >= n) return;
        if (ch + 1 < n && smp_before(c, h[ch], h[ch + 1])) ch++; /* the later one */
        if (!smp_before(c, h[root], h[ch])) return;
        int32_t t = h[root]; h[root] = h[ch]; h[ch] = t;
        root = ch;
    }
}

/* Full sort of idx[lo..hi) in token order, O(m log m) worst case, no allocation. */
static void smp_heapsort(const struct smp_ctx *c, int32_t *idx, int lo, int hi) {
    int32_t *h = idx + lo;
    int n = hi - lo;
    for (int i = n / 2 - 1; i >= 0; i--) smp_sift(c, h, i, n);
    for (int end = n - 1; end > 0; end--) {
        int32_t t = h[0]; h[0] = h[end]; h[end] = t;
        smp_sift(c, h, 0, end);
    }
}

static void smp_sort(const struct smp_ctx *c, int32_t *idx, int lo, int hi) {
    if (hi - lo <= 16) smp_insertion_sort(c, idx, lo, hi);
    else smp_heapsort(c, idx, lo, hi);
}

/* Partition idx[lo..hi) (hi - lo >= 3) around a median-of-three pivot: returns its final
 * position p; idx[lo..p) come before it, idx[p+1..hi) after; *mass = their e summed (f64). */
static int smp_partition(const struct smp_ctx *c, int32_t *idx, int lo, int hi, double *mass) {
    int mid = lo + (hi - lo) / 2;
    int32_t t;
#define SMP_SWAP(a, b) (t = idx[a], idx[a] = idx[b], idx[b] = t)
    if (smp_before(c, idx[mid], idx[lo])) SMP_SWAP(mid, lo);
    if (smp_before(c, idx[hi - 1], idx[lo])) SMP_SWAP(hi - 1, lo);
    if (smp_before(c, idx[hi - 1], idx[mid])) SMP_SWAP(hi - 1, mid);
    SMP_SWAP(mid, hi - 1);
    int32_t pv = idx[hi - 1];
    float sp = smp_key(c, pv);
    int st = lo;
    double s = 0.0;
    for (int i = lo; i < hi - 1; i++) {
        int32_t a = idx[i];
        if (smp_before_k(smp_key(c, a), a, sp, pv)) {
            idx[i] = idx[st]; idx[st] = a; st++;
            s += c->e[a];
        }
    }
    idx[hi - 1] = idx[st]; idx[st] = pv;
#undef SMP_SWAP
    *mass = s;
    return st;
}

static int smp_budget(int n) {
    int b = 8;
    while (n > 1) { n >>= 1; b += 2; }
    return b;
}

/* Rearrange idx[0..n) so that idx[0..k) are the first k tokens of the order (in any order). */
static void smp_select_k(const struct smp_ctx *c, int32_t *idx, int n, int k) {
    if (k >= n) return;
    int lo = 0, hi = n, budget = smp_budget(n);
    while (hi - lo > 16) {
        if (budget-- == 0) { smp_heapsort(c, idx, lo, hi); return; }
        double s;
        int p = smp_partition(c, idx, lo, hi, &s);
        if (p == k || p == k - 1) return;
        if (p < k) lo = p + 1; else hi = p;
    }
    smp_insertion_sort(c, idx, lo, hi);
}

static inline int smp_cross(double v, double target, int strict) { return strict ? v > target : v >= target; }

/* Weighted selection over idx[lo..hi): the first token x of the order whose inclusive cumulative
 * mass crosses target (> if strict, >= otherwise). idx is rearranged so that idx[lo..j) are
 * exactly the tokens before x and idx[j] = x; returns j and *cum = mass of idx[lo..j]. Returns
 * -1 when the whole segment never crosses. */
static int smp_wselect(const struct smp_ctx *c, int32_t *idx, int lo, int hi, double target, int strict,
                       double *cum) {
    if (hi <= lo) return -1;
    const float *e = c->e;
    if (smp_cross(0.0, target, strict)) { /* the first token already crosses */
        int b = lo;
        for (int i = lo + 1; i < hi; i++) if (smp_before(c, idx[i], idx[b])) b = i;
        int32_t t = idx[lo]; idx[lo] = idx[b]; idx[b] = t;
        *cum = e[idx[lo]];
        return lo;
    }
    double base = 0.0; /* mass of idx[lo0..lo), all before the segment; never crosses */
    int budget = smp_budget(hi - lo);
    while (hi - lo > 16 && budget-- > 0) {
        double s;
        int p = smp_partition(c, idx, lo, hi, &s);
        double through = base + s + e[idx[p]];
        if (smp_cross(base + s, target, strict)) hi = p;
        else if (smp_cross(through, target, strict)) { *cum = through; return p; }
        else { base = through; lo = p + 1; }
    }
    smp_sort(c, idx, lo, hi);
    for (int i = lo; i < hi; i++) {
        base += e[idx[i]];
        if (smp_cross(base, target, strict)) { *cum = base; return i; }
    }
    return -1;
}

/* ---- buckets: token i goes to bucket floor((m - s_i) * W) (clamped to SMP_B - 1; NaN → last),
 * a monotone function of s, so bucket order agrees with the token order. The span W covers
 * [max s, min finite s] (at most 104, past which exp underflows to 0), so the buckets adapt to
 * the temperature. One pass computes every mass and fills the per-bucket mass and count;
 * a query then walks the buckets, gathers the one bucket it needs and selects inside it. */
#define SMP_B 2048

/* The first and last buckets can hold most tokens (equal logits; -inf or far-below-max logits):
 * their updates rotate over 8 spare slots each (folded back afterwards), so that a run of
 * tokens in one bucket is not one long chain of dependent read-modify-writes. */
#define SMP_SPARE (SMP_B + 16)
struct smp_hist { double mass[SMP_SPARE]; int32_t cnt[SMP_SPARE]; };

static inline int smp_slot(int b, int lane) { /* branch-free */
    int r = lane & 7;
    return b + (b == SMP_B - 1) * (1 + r) + (b == 0) * (SMP_B + 8 + r);
}
static inline void smp_hist_add(struct smp_hist *h, int slot, float e) {
    h->mass[slot] += e;
    h->cnt[slot]++;
}

static void smp_hist_fold(struct smp_hist *h) {
    for (int j = 0; j < 8; j++) {
        h->mass[SMP_B - 1] += h->mass[SMP_B + j];
        h->cnt[SMP_B - 1] += h->cnt[SMP_B + j];
        h->mass[0] += h->mass[SMP_B + 8 + j];
        h->cnt[0] += h->cnt[SMP_B + 8 + j];
    }
}

static inline int smp_bucket1(float l, float T, float m, float W) {
    float x = (m - l / T) * W;
    return x < (float)(SMP_B - 1) ? (int)x : SMP_B - 1;
}

/* The smallest of lo and the logits [i0, n) above -inf. */
static float smp_min_finite_ref(const float *l, int i0, int n, float lo) {
    for (int i = i0; i < n; i++) if (l[i] > -INFINITY && l[i] < lo) lo = l[i];
    return lo;
}

/* e[i] = exp(l[i]/T - m) (libm) for i in [i0, n), into the bucket histogram of the masses. */
static void smp_exp_hist_ref(const float *l, int i0, int n, float T, float m, float W, float *e, struct smp_hist *h) {
    for (int i = i0; i < n; i++) {
        e[i] = expf(l[i] / T - m);
        smp_hist_add(h, smp_slot(smp_bucket1(l[i], T, m, W), i), e[i]);
    }
}

/* The tokens of bucket b among [i0, n) with e in [elo, ehi], in index order (see smp_gather). */
static int smp_gather_ref(const float *l, const float *e, int i0, int n, float T, float m, float W, int b,
                          float elo, float ehi, int32_t *out) {
    int c = 0;
    for (int i = i0; i < n; i++)
        if (e[i] >= elo && e[i] <= ehi && smp_bucket1(l[i], T, m, W) == b) out[c++] = i;
    return c;
}

#ifdef IFG_SIMD
/* smp_bucket1 of every lane (NaN → SMP_B - 1: min returns its second operand). */
IFG_AI ifg_vi smp_bucketv(ifg_vf l, ifg_vf T, ifg_vf m, ifg_vf W) {
    const ifg_vf x = ifg_vmul(ifg_vsub(m, ifg_vdiv(l, T)), W);
    return ifg_vcvtt(ifg_vmin(x, ifg_vset1((float)(SMP_B - 1))));
}

/* Smallest logit above -inf (+inf if none). */
static float smp_min_finite(const float *l, int n) {
    int i = 0;
    ifg_vf acc = ifg_vset1(INFINITY);
    const ifg_vf ninf = ifg_vset1(-INFINITY);
    for (; i + IFG_VW <= n; i += IFG_VW) {
        const ifg_vf v = ifg_vload(l + i);
        acc = ifg_vmin(ifg_vblend(ifg_vcmpeq(v, ninf), v, acc), acc); /* -inf and NaN skipped */
    }
    return smp_min_finite_ref(l, i, n, ifg_vhmin(acc));
}

/* e[i] = exp(l[i]/T - m) and the bucket histogram of the masses: the vector exp (act.h) in every
 * lane, AVX2's tail in libm's, as the variants always did. */
static void smp_exp_hist(const float *l, int n, float T, float m, float W, float *e, struct smp_hist *h) {
    const ifg_vf tv = ifg_vset1(T), mv = ifg_vset1(m), wv = ifg_vset1(W);
    int32_t bk[IFG_VW];
    float ev[IFG_VW];
    /* spare slots in the vector domain: smp_slot(b, lane) for the first and last buckets */
    const ifg_vi lane7 = ifg_viand(ifg_viota(), ifg_viset1(7));
    const ifg_vi lastoff = ifg_viadd(lane7, ifg_viset1(1)), firstoff = ifg_viadd(lane7, ifg_viset1(SMP_B + 8));
    const ifg_vi blast = ifg_viset1(SMP_B - 1), bfirst = ifg_viset1(0);
    int i = 0;
    const int vend = IFG_VTAIL_MASKED ? n : n - n % IFG_VW;
    for (; i < vend; i += IFG_VW) {
        const int r = n - i < IFG_VW ? n - i : IFG_VW;
        const ifg_vf lv = r == IFG_VW ? ifg_vload(l + i) : ifg_vload_n(l + i, r);
        const ifg_vf v = ifg_vexp(ifg_vsub(ifg_vdiv(lv, tv), mv));
        if (r == IFG_VW) ifg_vstore(e + i, v); /* (AVX2's masked store is slow) */
        else ifg_vstore_n(e + i, v, r);
        ifg_vstore(ev, v);
        ifg_vi b = smp_bucketv(lv, tv, mv, wv);
        b = ifg_viadd_eq(b, blast, lastoff);
        b = ifg_viadd_eq(b, bfirst, firstoff);
        ifg_vistore(bk, b);
        for (int j = 0; j < r; j++) smp_hist_add(h, bk[j], ev[j]);
    }
    smp_exp_hist_ref(l, i, n, T, m, W, e, h);
}

/* The cheap test on e for a vector at a time, the bucket only where it passes. */
static int smp_gather_range(const float *l, const float *e, int n, float T, float m, float W, int b,
                            float elo, float ehi, int32_t *out) {
    const ifg_vf tv = ifg_vset1(T), mv = ifg_vset1(m), wv = ifg_vset1(W);
    const ifg_vf lov = ifg_vset1(elo), hiv = ifg_vset1(ehi);
    const ifg_vi bv = ifg_viset1(b);
    int c = 0, i = 0;
    for (; i + IFG_VW <= n; i += IFG_VW) {
        const ifg_vf ev = ifg_vload(e + i);
        unsigned k = ifg_vmbits(ifg_vmand(ifg_vcmpge(ev, lov), ifg_vcmple(ev, hiv)));
        if (!k) continue;
        k &= ifg_vieq_bits(smp_bucketv(ifg_vload(l + i), tv, mv, wv), bv);
        while (k) { out[c++] = i + __builtin_ctz(k); k &= k - 1; }
    }
    return c + smp_gather_ref(l, e, i, n, T, m, W, b, elo, ehi, out + c);
}
#else
#define smp_min_finite(l, n) smp_min_finite_ref(l, 0, n, INFINITY)
#define smp_exp_hist(l, n, T, m, W, e, h) smp_exp_hist_ref(l, 0, n, T, m, W, e, h)
#define smp_gather_range(l, e, n, T, m, W, b, elo, ehi, out) smp_gather_ref(l, e, 0, n, T, m, W, b, elo, ehi, out)
#endif

/* The tokens of bucket b, in index order, into out; returns how many. A token's mass e = exp(-d)
 * and its bucket floor(d * W) come from the same f32 d = m - s, so only tokens whose e lies in
 * the bucket's e-range (widened by 1e-4 in the exponent, far more than the rounding of d, of
 * d * W and of exp) can be in it: that cheap test on e skips the division for almost all. */
static int smp_gather(const float *l, const float *e, int n, float T, float m, float W, int b, int32_t *out) {
    float elo = -1.0f, ehi = INFINITY;
    if (W > 0.0f) {
        double w = 1.0 / (double)W;
        double lo = b < SMP_B - 1 ? exp(-(b + 1) * w - 1e-4) : 0.0;
        if (lo >= 1e-37) elo = (float)lo * (1.0f - 1e-6f); /* (tiny masses may have been flushed to 0) */
        if (b > 0) ehi = (float)exp(-b * w + 1e-4) * (1.0f + 1e-6f);
    }
    return smp_gather_range(l, e, n, T, m, W, b, elo, ehi, out);
}

/* The kept set: every token of buckets [0, nb), then idx[p0 .. p0+pl) (kept tokens of bucket
 * nb, in any order); idx[used ..) is free. */
struct smp_state {
    struct smp_ctx c;
    const struct smp_hist *h;
    int n;
    float m, W;
    int32_t *idx;
    int nb, p0, pl, used;
};

/* First kept token whose inclusive cumulative mass crosses target: returns 1 and its slot *pos
 * (idx[*start .. *pos) are then the kept tokens of its bucket before it), its bucket and the
 * mass *through it; 0 if the kept set never crosses. */
static int smp_crossing(struct smp_state *st, double target, int strict, int *pos, int *start, int *bucket,
                        double *through) {
    const struct smp_hist *h = st->h;
    double cum = 0.0, c2;
    for (int b = 0; b < st->nb; b++) {
        double nc = cum + h->mass[b];
        if (smp_cross(nc, target, strict)) {
            int s0 = st->used;
            int cb = smp_gather(st->c.l, st->c.e, st->n, st->c.T, st->m, st->W, b, st->idx + s0);
            int j = smp_wselect(&st->c, st->idx, s0, s0 + cb, target - cum, strict, &c2);
            if (j >= 0) { *pos = j; *start = s0; *bucket = b; *through = cum + c2; return 1; }
        }
        cum = nc; /* (a bucket whose members' sum fell just short by rounding is passed over) */
    }
    if (st->pl > 0) {
        int j = smp_wselect(&st->c, st->idx, st->p0, st->p0 + st->pl, target - cum, strict, &c2);
        if (j >= 0) { *pos = j; *start = st->p0; *bucket = st->nb; *through = cum + c2; return 1; }
    }
    return 0;
}

static int smp_last_positive(const struct smp_ctx *c, const int32_t *idx, int lo, int hi) {
    int32_t best = -1;
    for (int i = lo; i < hi; i++)
        if (c->e[idx[i]] > 0.0f && (best < 0 || smp_before(c, best, idx[i]))) best = idx[i];
    return best;
}

int ifg_sample(const float *logits, int n, float temperature, int top_k, float top_p, float coin,
               float *probs, int32_t *idx) {
    if (n <= 1) return 0;
    if (!(temperature > 0.0f)) return ifg_argmax(logits, n);
    int am = ifg_argmax(logits, n);
    /* x/T is monotone, so max(logits/T) = max(logits)/T exactly */
    float m = logits[am] / temperature;
    if (top_k == 1) { /* the first token of the order: an earlier index whose s rounds to m too */
        for (int i = 0; i < am; i++) if (logits[i] / temperature == m) return i;
        return am;
    }
    float span = m - smp_min_finite(logits, n) / temperature;
    if (!(span <= 104.0f)) span = 104.0f; /* exp(-104) is 0 in f32: no finer buckets needed past it */
    float W = span > 0.0f ? (float)(SMP_B - 1) / span : 0.0f;
    struct smp_hist h;
    memset(&h, 0, sizeof h);
    smp_exp_hist(logits, n, temperature, m, W, probs, &h);
    smp_hist_fold(&h);
    double z = 0.0;
    for (int b = 0; b < SMP_B; b++) z += h.mass[b];
    if (!(z > 0.0) || !(z < INFINITY)) return am; /* NaN / inf logits */

    struct smp_state st = {{logits, probs, temperature}, &h, n, m, W, idx, SMP_B, 0, 0, 0};
    if (top_k > 0 && top_k < n) {
        int c = 0, b = 0;
        while (c + h.cnt[b] < top_k) c += h.cnt[b++];
        int cb = smp_gather(logits, probs, n, temperature, m, W, b, idx);
        int r = top_k - c < cb ? top_k - c : cb; /* (always top_k - c: hist and gather agree) */
        smp_select_k(&st.c, idx, cb, r);
        st.nb = b;
        st.pl = st.used = r;
        z = 0.0;
        for (int i = 0; i < b; i++) z += h.mass[i];
        for (int i = 0; i < st.pl; i++) z += probs[idx[i]];
    }
    int pos, start, bucket;
    double through;
    if (top_p < 1.0f && smp_crossing(&st, (double)top_p * z, 0, &pos, &start, &bucket, &through)) {
        st.nb = bucket;
        st.p0 = start;
        st.pl = pos - start + 1;
        st.used = st.p0 + st.pl;
        z = through;
    }
    if (smp_crossing(&st, (double)coin * z, 1, &pos, &start, &bucket, &through)) return idx[pos];
    /* coin * z at or past the total (coin >= 1): the last kept token with positive mass */
    int t = st.pl > 0 ? smp_last_positive(&st.c, idx, st.p0, st.p0 + st.pl) : -1;
    for (int b = st.nb - 1; t < 0 && b >= 0; b--) {
        if (!(h.mass[b] > 0.0)) continue;
        int cb = smp_gather(logits, probs, n, temperature, m, W, b, idx + st.used);
        t = smp_last_positive(&st.c, idx, st.used, st.used + cb);
    }
    return t >= 0 ? t : am;
}
