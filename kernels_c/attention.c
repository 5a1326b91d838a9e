/* attention.c — paged KV cache store and causal attention (f32).
 *
 * Attention work items are (query token, kv head) pairs, dealt out cyclically
 * (schedule(static, 1): still a fixed split, but the causal triangle is balanced). An item
 * handles the query heads sharing its kv head together (up to ATTN_GMAX at a time), so each
 * K/V row is brought in from memory once per group. Positions are taken in tiles of
 * ATTN_TILE rows: scores for the tile (dot products vectorised over head_dim, four rows at a
 * time with one folded horizontal reduction), then the online-softmax update (running max m
 * and sum l per head; the accumulator is rescaled only when the max grows), then the V rows
 * are accumulated into the per-head f32 accumulator, vectorised over head_dim. One pass over
 * K/V. Each output is computed by one item in a fixed order: bitwise deterministic for any
 * thread count. */
#include "attention.h"
#include "act.h"

#define ATTN_TILE 32
#define ATTN_GMAX 16

/* ---- kernels over head_dim: s[0..4) = scale * (q . k_j); acc *= c; acc += sum_j p[j] v_j ---- */
#ifdef IFG_SIMD
/* SIMD (simd.h's vocabulary), written once for AVX2 and AVX-512. */
static inline void attn_qk4(const float *q, const float *const *k, int hd, float scale, float *s) {
    ifg_vf a0 = ifg_vzero(), a1 = ifg_vzero(), a2 = ifg_vzero(), a3 = ifg_vzero();
    const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
    int d = 0;
    for (; d + IFG_VW <= hd; d += IFG_VW) {
        const ifg_vf qv = ifg_vload(q + d);
        a0 = ifg_vfma(qv, ifg_vload(k0 + d), a0);
        a1 = ifg_vfma(qv, ifg_vload(k1 + d), a1);
        a2 = ifg_vfma(qv, ifg_vload(k2 + d), a2);
        a3 = ifg_vfma(qv, ifg_vload(k3 + d), a3);
    }
    if (d < hd) {
        const int r = hd - d;
        const ifg_vf qv = ifg_vload_n(q + d, r);
        a0 = ifg_vfma(qv, ifg_vload_n(k0 + d, r), a0);
        a1 = ifg_vfma(qv, ifg_vload_n(k1 + d, r), a1);
        a2 = ifg_vfma(qv, ifg_vload_n(k2 + d, r), a2);
        a3 = ifg_vfma(qv, ifg_vload_n(k3 + d, r), a3);
    }
    _mm_storeu_ps(s, _mm_mul_ps(ifg_vsum4(a0, a1, a2, a3), _mm_set1_ps(scale)));
}

static inline float attn_tile_max(const float *s, int nt) {
    (void)nt; /* rows past nt hold -inf */
    ifg_vf m = ifg_vmax(ifg_vload(s), ifg_vload(s + IFG_VW));
    for (int j = 2 * IFG_VW; j < ATTN_TILE; j += 2 * IFG_VW)
        m = ifg_vmax(m, ifg_vmax(ifg_vload(s + j), ifg_vload(s + j + IFG_VW)));
    return ifg_vhmax(m);
}

static inline float attn_tile_exp(float *s, int nt, float m) {
    (void)nt;
    const ifg_vf mv = ifg_vset1(m);
    ifg_vf sum = ifg_vzero();
    for (int j = 0; j < ATTN_TILE; j += IFG_VW) {
        const ifg_vf e = ifg_vexp(ifg_vsub(ifg_vload(s + j), mv));
        ifg_vstore(s + j, e);
        sum = ifg_vadd(sum, e);
    }
    return ifg_vhsum(sum);
}

static inline void attn_scale(float *a, float c, int hd) {
    const ifg_vf cv = ifg_vset1(c);
    int d = 0;
    for (; d + IFG_VW <= hd; d += IFG_VW) ifg_vstore(a + d, ifg_vmul(ifg_vload(a + d), cv));
    if (d < hd) ifg_vstore_n(a + d, ifg_vmul(ifg_vload_n(a + d, hd - d), cv), hd - d);
}

static inline void attn_pv(float *acc, const float *const *v, const float *p, int nt, int hd) {
    int d = 0;
    for (; d + 4 * IFG_VW <= hd; d += 4 * IFG_VW) {
        ifg_vf a0 = ifg_vload(acc + d), a1 = ifg_vload(acc + d + IFG_VW);
        ifg_vf a2 = ifg_vload(acc + d + 2 * IFG_VW), a3 = ifg_vload(acc + d + 3 * IFG_VW);
        for (int j = 0; j < nt; j++) {
            const ifg_vf pj = ifg_vset1(p[j]);
            const float *vj = v[j] + d;
            a0 = ifg_vfma(pj, ifg_vload(vj), a0);
            a1 = ifg_vfma(pj, ifg_vload(vj + IFG_VW), a1);
            a2 = ifg_vfma(pj, ifg_vload(vj + 2 * IFG_VW), a2);
            a3 = ifg_vfma(pj, ifg_vload(vj + 3 * IFG_VW), a3);
        }
        ifg_vstore(acc + d, a0);
        ifg_vstore(acc + d + IFG_VW, a1);
        ifg_vstore(acc + d + 2 * IFG_VW, a2);
        ifg_vstore(acc + d + 3 * IFG_VW, a3);
    }
    for (; d < hd; d += IFG_VW) {
        const int r = hd - d < IFG_VW ? hd - d : IFG_VW;
        ifg_vf a = ifg_vload_n(acc + d, r);
        for (int j = 0; j < nt; j++) a = ifg_vfma(ifg_vset1(p[j]), ifg_vload_n(v[j] + d, r), a);
        ifg_vstore_n(acc + d, a, r);
    }
}

#else
/* Scalar reference (the scalar build). */
static inline void attn_qk4_ref(const float *q, const float *const *k, int hd, float scale, float *s) {
    for (int r = 0; r < 4; r++) {
        const float *kr = k[r];
        float a = 0.0f;
        for (int d = 0; d < hd; d++) a += q[d] * kr[d];
        s[r] = a * scale;
    }
}

static inline float attn_tile_max_ref(const float *s, int nt) {
    float m = s[0];
    for (int j = 1; j < nt; j++) if (s[j] > m) m = s[j];
    return m;
}

static inline float attn_tile_exp_ref(float *s, int nt, float m) {
    float sum = 0.0f;
    for (int j = 0; j < nt; j++) { s[j] = expf(s[j] - m); sum += s[j]; }
    for (int j = nt; j < ATTN_TILE; j++) s[j] = 0.0f;
    return sum;
}

static inline void attn_scale_ref(float *a, float c, int hd) {
    for (int d = 0; d < hd; d++) a[d] *= c;
}

static inline void attn_pv_ref(float *acc, const float *const *v, const float *p, int nt, int hd) {
    for (int j = 0; j < nt; j++) {
        const float *vj = v[j];
        float pj = p[j];
        for (int d = 0; d < hd; d++) acc[d] += pj * vj[d];
    }
}
#define attn_qk4 attn_qk4_ref
#define attn_tile_max attn_tile_max_ref
#define attn_tile_exp attn_tile_exp_ref
#define attn_scale attn_scale_ref
#define attn_pv attn_pv_ref
#endif

/* Resolve the next min(left, ATTN_TILE) positions to K/V row pointers. */
static inline int attn_rows(const float *kc, const float *vc, const int32_t *bt, int bs, size_t rs, int left,
                            int *bi, int *br, const float **kr, const float **vr) {
    int nt = left < ATTN_TILE ? left : ATTN_TILE;
    for (int j = 0; j < nt; j++) {
        size_t off = ((size_t)bt[*bi] * (size_t)bs + (size_t)*br) * rs;
        kr[j] = kc + off;
        vr[j] = vc + off;
        if (++*br == bs) { *br = 0; ++*bi; }
    }
    return nt;
}

/* Ask for the next tile's K and V rows (hd floats each) to be brought into cache. */
static inline void attn_prefetch(const float *const *k, const float *const *v, int n, int hd) {
    for (int j = 0; j < n; j++)
        for (int d = 0; d < hd; d += 16) {
            __builtin_prefetch(k[j] + d, 0, 3);
            __builtin_prefetch(v[j] + d, 0, 3);
        }
}

/* One (token, kv head) item for G (<= ATTN_GMAX) query heads stored contiguously at q / out;
 * kc / vc already point at this kv head's slice of row 0 of block 0; rs is the cache row stride. */
static void attn_group(float *out, const float *q, const float *kc, const float *vc, const int32_t *bt,
                       int bs, size_t rs, int npos, int hd, int G, float scale) {
    float S[ATTN_GMAX][ATTN_TILE] __attribute__((aligned(64)));
    float acc[ATTN_GMAX][IFG_ATTN_MAX_HEAD_DIM] __attribute__((aligned(64)));
    float m[ATTN_GMAX], l[ATTN_GMAX];
    const float *kr[ATTN_TILE], *vr[ATTN_TILE];
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        memset(acc[g], 0, (size_t)hd * sizeof(float));
    }
    const float *nkr[ATTN_TILE], *nvr[ATTN_TILE];
    int bi = 0, br = 0; /* block index and row of the next position */
    int nn = attn_rows(kc, vc, bt, bs, rs, npos, &bi, &br, nkr, nvr);
    for (int p0 = 0; p0 < npos; p0 += ATTN_TILE) {
        /* this tile's rows were resolved (and prefetched) during the previous tile: a kv head's
         * rows sit one cache row (all heads) apart, too sparse for the hardware prefetcher */
        int nt = nn;
        memcpy(kr, nkr, sizeof(kr));
        memcpy(vr, nvr, sizeof(vr));
        nn = p0 + ATTN_TILE < npos ? attn_rows(kc, vc, bt, bs, rs, npos - p0 - ATTN_TILE, &bi, &br, nkr, nvr) : 0;
        attn_prefetch(nkr, nvr, nn, hd);
        int nt4 = (nt + 3) & ~3;
        for (int j = nt; j < nt4; j++) kr[j] = kr[nt - 1]; /* padding rows for the 4-row kernel */
        for (int g = 0; g < G; g++) {
            float *s = S[g];
            const float *qg = q + (size_t)g * hd;
            for (int j = 0; j < nt4; j += 4) attn_qk4(qg, kr + j, hd, scale, s + j);
            for (int j = nt; j < ATTN_TILE; j++) s[j] = -INFINITY;
            float mt = attn_tile_max(s, nt);
            if (mt > m[g]) {
                if (l[g] > 0.0f) {
                    float c = expf(m[g] - mt);
                    l[g] *= c;
                    attn_scale(acc[g], c, hd);
                }
                m[g] = mt;
            }
            l[g] += attn_tile_exp(s, nt, m[g]);
        }
        for (int g = 0; g < G; g++) attn_pv(acc[g], vr, S[g], nt, hd);
    }
    for (int g = 0; g < G; g++) {
        float inv = 1.0f / l[g];
        float *o = out + (size_t)g * hd;
        for (int d = 0; d < hd; d++) o[d] = acc[g][d] * inv;
    }
}

void ifg_attention_part(float *out, int ldo, const float *q, int ldq, const float *k_cache, const float *v_cache,
                        const int32_t *block_table, int max_blocks, int block_size,
                        const int32_t *seq, const int32_t *pos, int T, int n_heads, int n_kv_heads, int head_dim,
                        float scale) {
    if (head_dim <= 0 || head_dim > IFG_ATTN_MAX_HEAD_DIM || n_kv_heads <= 0 || n_heads % n_kv_heads) return;
    int G = n_heads / n_kv_heads;
    size_t rs = (size_t)n_kv_heads * head_dim;
    long items = (long)T * n_kv_heads;
    IFG_PRAGMA(omp for schedule(static, 1))
    for (long it = 0; it < items; it++) {
        int t = (int)(it / n_kv_heads), kvh = (int)(it % n_kv_heads);
        const int32_t *bt = block_table + (size_t)seq[t] * max_blocks;
        for (int g0 = 0; g0 < G; g0 += ATTN_GMAX) {
            int gc = G - g0 < ATTN_GMAX ? G - g0 : ATTN_GMAX;
            size_t h0 = (size_t)kvh * G + g0;
            attn_group(out + (size_t)t * ldo + h0 * head_dim, q + (size_t)t * ldq + h0 * head_dim,
                       k_cache + (size_t)kvh * head_dim, v_cache + (size_t)kvh * head_dim, bt, block_size, rs,
                       pos[t] + 1, head_dim, gc, scale);
        }
    }
}

void ifg_attention(float *out, int ldo, const float *q, int ldq, const float *k_cache, const float *v_cache,
                   const int32_t *block_table, int max_blocks, int block_size,
                   const int32_t *seq, const int32_t *pos, int T, int n_heads, int n_kv_heads, int head_dim,
                   float scale, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_attention_part(out, ldo, q, ldq, k_cache, v_cache, block_table, max_blocks, block_size, seq, pos, T,
                           n_heads, n_kv_heads, head_dim, scale);
    }
}

void ifg_kv_store_part(float *k_cache, float *v_cache, const float *k, const float *v, int ldkv,
                       const int32_t *block_table, int max_blocks, int block_size,
                       const int32_t *seq, const int32_t *pos, int T, int n_kv_heads, int head_dim) {
    size_t rs = (size_t)n_kv_heads * head_dim;
    IFG_FOR
    for (int t = 0; t < T; t++) {
        int p = pos[t];
        size_t row = (size_t)block_table[(size_t)seq[t] * max_blocks + p / block_size] * block_size + p % block_size;
        memcpy(k_cache + row * rs, k + (size_t)t * ldkv, rs * sizeof(float));
        memcpy(v_cache + row * rs, v + (size_t)t * ldkv, rs * sizeof(float));
    }
}

void ifg_kv_store(float *k_cache, float *v_cache, const float *k, const float *v, int ldkv,
                  const int32_t *block_table, int max_blocks, int block_size,
                  const int32_t *seq, const int32_t *pos, int T, int n_kv_heads, int head_dim, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_kv_store_part(k_cache, v_cache, k, v, ldkv, block_table, max_blocks, block_size, seq, pos, T,
                          n_kv_heads, head_dim);
    }
}
