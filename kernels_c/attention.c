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
#if defined(IFG_AVX512)
static inline void attn_qk4(const float *q, const float *const *k, int hd, float scale, float *s) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
    int d = 0;
    for (; d + 16 <= hd; d += 16) {
        __m512 qv = _mm512_loadu_ps(q + d);
        a0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k0 + d), a0);
        a1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k1 + d), a1);
        a2 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k2 + d), a2);
        a3 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k3 + d), a3);
    }
    if (d < hd) {
        __mmask16 m = ifg_tailmask16(hd - d);
        __m512 qv = _mm512_maskz_loadu_ps(m, q + d);
        a0 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k0 + d), a0);
        a1 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k1 + d), a1);
        a2 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k2 + d), a2);
        a3 = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k3 + d), a3);
    }
    /* fold four vectors into one __m128 of their sums */
    __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512d u01 = _mm512_castps_pd(t01), u23 = _mm512_castps_pd(t23);
    __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(u01, u23)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(u01, u23)));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(s, _mm_mul_ps(r, _mm_set1_ps(scale)));
}

static inline float attn_tile_max(const float *s, int nt) {
    (void)nt; /* rows past nt hold -inf */
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_loadu_ps(s), _mm512_loadu_ps(s + 16)));
}

static inline float attn_tile_exp(float *s, int nt, float m) {
    (void)nt;
    __m512 mv = _mm512_set1_ps(m);
    __m512 e0 = ifg_exp16(_mm512_sub_ps(_mm512_loadu_ps(s), mv));
    __m512 e1 = ifg_exp16(_mm512_sub_ps(_mm512_loadu_ps(s + 16), mv));
    _mm512_storeu_ps(s, e0);
    _mm512_storeu_ps(s + 16, e1);
    return _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
}

static inline void attn_scale(float *a, float c, int hd) {
    __m512 cv = _mm512_set1_ps(c);
    for (int d = 0; d < hd; d += 16) {
        __mmask16 m = ifg_tailmask16(hd - d);
        _mm512_mask_storeu_ps(a + d, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + d), cv));
    }
}

static inline void attn_pv(float *acc, const float *const *v, const float *p, int nt, int hd) {
    int d = 0;
    for (; d + 64 <= hd; d += 64) {
        __m512 a0 = _mm512_loadu_ps(acc + d), a1 = _mm512_loadu_ps(acc + d + 16);
        __m512 a2 = _mm512_loadu_ps(acc + d + 32), a3 = _mm512_loadu_ps(acc + d + 48);
        for (int j = 0; j < nt; j++) {
            __m512 pj = _mm512_set1_ps(p[j]);
            const float *vj = v[j] + d;
            a0 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vj), a0);
            a1 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vj + 16), a1);
            a2 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vj + 32), a2);
            a3 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vj + 48), a3);
        }
        _mm512_storeu_ps(acc + d, a0);
        _mm512_storeu_ps(acc + d + 16, a1);
        _mm512_storeu_ps(acc + d + 32, a2);
        _mm512_storeu_ps(acc + d + 48, a3);
    }
    for (; d < hd; d += 16) {
        __mmask16 m = ifg_tailmask16(hd - d);
        __m512 a = _mm512_maskz_loadu_ps(m, acc + d);
        for (int j = 0; j < nt; j++)
            a = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_maskz_loadu_ps(m, v[j] + d), a);
        _mm512_mask_storeu_ps(acc + d, m, a);
    }
}

#elif defined(IFG_AVX2)
static inline void attn_qk4(const float *q, const float *const *k, int hd, float scale, float *s) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
    int d = 0;
    for (; d + 8 <= hd; d += 8) {
        __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + d), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + d), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + d), a3);
    }
    if (d < hd) {
        __m256i m = ifg_tailmask8(hd - d);
        __m256 qv = _mm256_maskload_ps(q + d, m);
        a0 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + d, m), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k1 + d, m), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k2 + d, m), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k3 + d, m), a3);
    }
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(s, _mm_mul_ps(r, _mm_set1_ps(scale)));
}

static inline float attn_tile_max(const float *s, int nt) {
    (void)nt;
    __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_loadu_ps(s), _mm256_loadu_ps(s + 8)),
                             _mm256_max_ps(_mm256_loadu_ps(s + 16), _mm256_loadu_ps(s + 24)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

static inline float attn_tile_exp(float *s, int nt, float m) {
    (void)nt;
    __m256 mv = _mm256_set1_ps(m), sum = _mm256_setzero_ps();
    for (int j = 0; j < ATTN_TILE; j += 8) {
        __m256 e = ifg_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

static inline void attn_scale(float *a, float c, int hd) {
    __m256 cv = _mm256_set1_ps(c);
    int d = 0;
    for (; d + 8 <= hd; d += 8) _mm256_storeu_ps(a + d, _mm256_mul_ps(_mm256_loadu_ps(a + d), cv));
    for (; d < hd; d++) a[d] *= c;
}

static inline void attn_pv(float *acc, const float *const *v, const float *p, int nt, int hd) {
    int d = 0;
    for (; d + 32 <= hd; d += 32) {
        __m256 a0 = _mm256_loadu_ps(acc + d), a1 = _mm256_loadu_ps(acc + d + 8);
        __m256 a2 = _mm256_loadu_ps(acc + d + 16), a3 = _mm256_loadu_ps(acc + d + 24);
        for (int j = 0; j < nt; j++) {
            __m256 pj = _mm256_broadcast_ss(p + j);
            const float *vj = v[j] + d;
            a0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj), a0);
            a1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8), a1);
            a2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 16), a2);
            a3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 24), a3);
        }
        _mm256_storeu_ps(acc + d, a0);
        _mm256_storeu_ps(acc + d + 8, a1);
        _mm256_storeu_ps(acc + d + 16, a2);
        _mm256_storeu_ps(acc + d + 24, a3);
    }
    for (; d < hd; d += 8) {
        __m256i m = ifg_tailmask8(hd - d < 8 ? hd - d : 8);
        __m256 a = _mm256_maskload_ps(acc + d, m);
        for (int j = 0; j < nt; j++)
            a = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), _mm256_maskload_ps(v[j] + d, m), a);
        _mm256_maskstore_ps(acc + d, m, a);
    }
}

#else /* scalar reference */
static inline void attn_qk4(const float *q, const float *const *k, int hd, float scale, float *s) {
    for (int r = 0; r < 4; r++) {
        const float *kr = k[r];
        float a = 0.0f;
        for (int d = 0; d < hd; d++) a += q[d] * kr[d];
        s[r] = a * scale;
    }
}

static inline float attn_tile_max(const float *s, int nt) {
    float m = s[0];
    for (int j = 1; j < nt; j++) if (s[j] > m) m = s[j];
    return m;
}

static inline float attn_tile_exp(float *s, int nt, float m) {
    float sum = 0.0f;
    for (int j = 0; j < nt; j++) { s[j] = expf(s[j] - m); sum += s[j]; }
    for (int j = nt; j < ATTN_TILE; j++) s[j] = 0.0f;
    return sum;
}

static inline void attn_scale(float *a, float c, int hd) {
    for (int d = 0; d < hd; d++) a[d] *= c;
}

static inline void attn_pv(float *acc, const float *const *v, const float *p, int nt, int hd) {
    for (int j = 0; j < nt; j++) {
        const float *vj = v[j];
        float pj = p[j];
        for (int d = 0; d < hd; d++) acc[d] += pj * vj[d];
    }
}
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

/* One (token, kv head) item for G (<= ATTN_GMAX) query heads stored contiguously at q / out,
 * over positions first..first+npos-1; kc / vc already point at this kv head's slice of row 0 of
 * block 0; rs is the cache row stride. */
static void attn_group(float *out, const float *q, const float *kc, const float *vc, const int32_t *bt,
                       int bs, size_t rs, int first, int npos, int hd, int G, float scale) {
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
    int bi = first / bs, br = first % bs; /* block index and row of the next position */
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
    ifg_attention_window_part(out, ldo, q, ldq, k_cache, v_cache, block_table, max_blocks, block_size, seq, pos, T,
                              n_heads, n_kv_heads, head_dim, scale, 0);
}

void ifg_attention_window_part(float *out, int ldo, const float *q, int ldq, const float *k_cache,
                               const float *v_cache, const int32_t *block_table, int max_blocks, int block_size,
                               const int32_t *seq, const int32_t *pos, int T, int n_heads, int n_kv_heads,
                               int head_dim, float scale, int window) {
    if (head_dim <= 0 || head_dim > IFG_ATTN_MAX_HEAD_DIM || n_kv_heads <= 0 || n_heads % n_kv_heads) return;
    int G = n_heads / n_kv_heads;
    size_t rs = (size_t)n_kv_heads * head_dim;
    long items = (long)T * n_kv_heads;
    IFG_PRAGMA(omp for schedule(static, 1))
    for (long it = 0; it < items; it++) {
        int t = (int)(it / n_kv_heads), kvh = (int)(it % n_kv_heads);
        const int32_t *bt = block_table + (size_t)seq[t] * max_blocks;
        int first = window > 0 && pos[t] + 1 > window ? pos[t] + 1 - window : 0;
        for (int g0 = 0; g0 < G; g0 += ATTN_GMAX) {
            int gc = G - g0 < ATTN_GMAX ? G - g0 : ATTN_GMAX;
            size_t h0 = (size_t)kvh * G + g0;
            attn_group(out + (size_t)t * ldo + h0 * head_dim, q + (size_t)t * ldq + h0 * head_dim,
                       k_cache + (size_t)kvh * head_dim, v_cache + (size_t)kvh * head_dim, bt, block_size, rs,
                       first, pos[t] + 1 - first, head_dim, gc, scale);
        }
    }
}

void ifg_attention(float *out, int ldo, const float *q, int ldq, const float *k_cache, const float *v_cache,
                   const int32_t *block_table, int max_blocks, int block_size,
                   const int32_t *seq, const int32_t *pos, int T, int n_heads, int n_kv_heads, int head_dim,
                   float scale, int n_threads) {
    ifg_attention_window(out, ldo, q, ldq, k_cache, v_cache, block_table, max_blocks, block_size, seq, pos, T,
                         n_heads, n_kv_heads, head_dim, scale, 0, n_threads);
}

void ifg_attention_window(float *out, int ldo, const float *q, int ldq, const float *k_cache, const float *v_cache,
                          const int32_t *block_table, int max_blocks, int block_size,
                          const int32_t *seq, const int32_t *pos, int T, int n_heads, int n_kv_heads, int head_dim,
                          float scale, int window, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_attention_window_part(out, ldo, q, ldq, k_cache, v_cache, block_table, max_blocks, block_size, seq, pos,
                                  T, n_heads, n_kv_heads, head_dim, scale, window);
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
