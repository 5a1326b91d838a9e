/* lora.c — the low-rank part of mixed-adapter batches.
 *
 * Two phases over all segments at once, each one worksharing loop (so one barrier each, not two
 * per segment):
 *  1. shrink h[t] = (x[t]·Aᵀ) ⊙ h_scale for every adapted row t. The threads split the adapted
 *     rows evenly (a rank-16 A has too few rows to split by output: split that way, one thread
 *     did all of a segment's shrink while the others waited). Register tiles of LO_TT rows ×
 *     LO_RT rank rows: each A vector is loaded and converted once for LO_TT tokens.
 *  2. expand y[t] += h[t]·Bᵀ (then DoRA's row factor). The threads split the N outputs; Bᵀ is
 *     [rank][N], so one vector of outputs is a sum of rank broadcast-multiplies of Bᵀ rows, no
 *     horizontal reductions; register tiles of LO_ET tokens × LO_EN output vectors (per rank step
 *     LO_EN Bᵀ loads and LO_ET broadcasts feed LO_ET·LO_EN FMAs).
 * Weights are converted in registers only (bf16: shift; int8: sign-extend + convert). Every
 * output's summation order depends only on K and rank, not on tiles or threads, so results are
 * bitwise identical for any thread count. Rows without an adapter are not touched. */
#include "lora.h"

#define LO_AI static inline __attribute__((always_inline))

static inline float lo_ld(const void *w, int dtype, size_t i) {
    return dtype == IFG_LORA_I8 ? (float)((const int8_t *)w)[i] : ifg_load_f32(w, dtype, i);
}
static inline float lo_hs(const struct ifg_lora *L, int i) { return L->h_scale ? L->h_scale[i] : 1.0f; }

static inline int lo_team(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* ---- scalar reference ---------------------------------------------------------------------- */
static void lo_shrink_ref(float *h, int ldh, const float *x, int ldx, const struct ifg_lora *L,
                          int t0, int t1, int K) {
    for (int t = t0; t < t1; t++)
        for (int i = 0; i < L->rank; i++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += x[(size_t)t * ldx + k] * lo_ld(L->a, L->a_dtype, (size_t)i * K + k);
            h[(size_t)t * ldh + i] = acc * lo_hs(L, i);
        }
}

static void lo_expand_ref(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L,
                          int t0, int t1, int n0, int n1, int N) {
    for (int t = t0; t < t1; t++)
        for (int n = n0; n < n1; n++) {
            float acc = 0.0f;
            for (int i = 0; i < L->rank; i++) acc += h[(size_t)t * ldh + i] * lo_ld(L->b, L->b_dtype, (size_t)i * N + n);
            float v = y[(size_t)t * ldy + n] + acc;
            y[(size_t)t * ldy + n] = L->dora ? v * L->dora[n] : v;
        }
}

#if defined(IFG_AVX512) || defined(IFG_AVX2)
/* ---- SIMD: one vector abstraction per ISA ------------------------------------------------- */
#if defined(IFG_AVX512)
#define LO_W 16
#define LO_TT 4 /* shrink tile: 4 tokens × 4 rank rows = 16 accumulators */
#define LO_RT 4
typedef __m512 lo_v;
typedef __mmask16 lo_m;
LO_AI lo_m lo_mask(int r) { return (lo_m)((1u << r) - 1u); } /* 0 < r < 16 */
LO_AI lo_v lo_zero(void) { return _mm512_setzero_ps(); }
LO_AI lo_v lo_set1(float f) { return _mm512_set1_ps(f); }
LO_AI lo_v lo_fma(lo_v a, lo_v b, lo_v c) { return _mm512_fmadd_ps(a, b, c); }
LO_AI lo_v lo_add(lo_v a, lo_v b) { return _mm512_add_ps(a, b); }
LO_AI lo_v lo_mul(lo_v a, lo_v b) { return _mm512_mul_ps(a, b); }
LO_AI lo_v lo_ldx(const float *p) { return _mm512_loadu_ps(p); }
LO_AI lo_v lo_ldx_m(const float *p, int r) { return _mm512_maskz_loadu_ps(lo_mask(r), p); }
LO_AI void lo_stx(float *p, lo_v v) { _mm512_storeu_ps(p, v); }
LO_AI void lo_stx_m(float *p, lo_v v, int r) { _mm512_mask_storeu_ps(p, lo_mask(r), v); }
LO_AI lo_v lo_cvt_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
LO_AI lo_v lo_cvt_i8(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }
/* 16 weights w[i..) as f32 (r < LO_W: only the first r, the rest zero, nothing beyond read). */
LO_AI lo_v lo_ldw(const void *w, int dtype, size_t i, int r) {
    if (r == LO_W) {
        switch (dtype) {
        case IFG_BF16: return lo_cvt_bf16(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i)));
        case IFG_LORA_I8: return lo_cvt_i8(_mm_loadu_si128((const __m128i *)((const int8_t *)w + i)));
        default: return _mm512_loadu_ps((const float *)w + i);
        }
    }
    switch (dtype) {
    case IFG_BF16: return lo_cvt_bf16(_mm256_maskz_loadu_epi16(lo_mask(r), (const uint16_t *)w + i));
    case IFG_LORA_I8: return lo_cvt_i8(_mm_maskz_loadu_epi8(lo_mask(r), (const int8_t *)w + i));
    default: return _mm512_maskz_loadu_ps(lo_mask(r), (const float *)w + i);
    }
}
LO_AI float lo_hsum(lo_v a) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_hadd_ps(q, q);
    return _mm_cvtss_f32(_mm_hadd_ps(q, q));
}
#else /* AVX2 + FMA */
#define LO_W 8
#define LO_TT 2 /* 2 tokens × 4 rank rows = 8 accumulators + 4 weights + 1 x of 16 ymm */
#define LO_RT 4
typedef __m256 lo_v;
LO_AI __m256i lo_imask(int r) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
LO_AI lo_v lo_zero(void) { return _mm256_setzero_ps(); }
LO_AI lo_v lo_set1(float f) { return _mm256_set1_ps(f); }
LO_AI lo_v lo_fma(lo_v a, lo_v b, lo_v c) { return _mm256_fmadd_ps(a, b, c); }
LO_AI lo_v lo_add(lo_v a, lo_v b) { return _mm256_add_ps(a, b); }
LO_AI lo_v lo_mul(lo_v a, lo_v b) { return _mm256_mul_ps(a, b); }
LO_AI lo_v lo_ldx(const float *p) { return _mm256_loadu_ps(p); }
LO_AI lo_v lo_ldx_m(const float *p, int r) { return _mm256_maskload_ps(p, lo_imask(r)); }
LO_AI void lo_stx(float *p, lo_v v) { _mm256_storeu_ps(p, v); }
LO_AI void lo_stx_m(float *p, lo_v v, int r) { _mm256_maskstore_ps(p, lo_imask(r), v); }
LO_AI lo_v lo_cvt_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
LO_AI lo_v lo_cvt_i8(__m128i q) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)); }
LO_AI lo_v lo_ldw(const void *w, int dtype, size_t i, int r) {
    if (r == LO_W) {
        switch (dtype) {
        case IFG_BF16: return lo_cvt_bf16(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
        case IFG_LORA_I8: return lo_cvt_i8(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i)));
        default: return _mm256_loadu_ps((const float *)w + i);
        }
    }
    if (dtype != IFG_BF16 && dtype != IFG_LORA_I8) return _mm256_maskload_ps((const float *)w + i, lo_imask(r));
    uint16_t raw[8] = {0}; /* the raw tail (AVX2 has no 8/16-bit masked load) */
    memcpy(raw, dtype == IFG_BF16 ? (const void *)((const uint16_t *)w + i) : (const void *)((const int8_t *)w + i),
           (size_t)r * (dtype == IFG_BF16 ? 2 : 1));
    const __m128i q = _mm_loadu_si128((const __m128i *)raw);
    return dtype == IFG_BF16 ? lo_cvt_bf16(q) : lo_cvt_i8(q);
}
LO_AI float lo_hsum(lo_v a) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    q = _mm_hadd_ps(q, q);
    return _mm_cvtss_f32(_mm_hadd_ps(q, q));
}
#endif
#if defined(IFG_AVX512)
#define LO_ET 4 /* expand tile: 4 tokens × 4 output vectors = 16 accumulators */
#define LO_EN 4
#else
#define LO_ET 3 /* 3 tokens × 3 output vectors = 9 accumulators + 3 weights + 1 h */
#define LO_EN 3
#endif

/* Shrink tile: TT tokens from t × RT rank rows from i; two k-steps' accumulators are one. */
LO_AI void lo_shrink_tile(float *h, int ldh, const float *x, int ldx, const struct ifg_lora *L, int K,
                          int t, int i, const int TT, const int RT) {
    lo_v acc[LO_TT][LO_RT];
    const int dt = L->a_dtype;
#pragma GCC unroll 8
    for (int a = 0; a < TT; a++)
#pragma GCC unroll 8
        for (int b = 0; b < RT; b++) acc[a][b] = lo_zero();
    for (int k = 0; k < K; k += LO_W) {
        const int r = K - k < LO_W ? K - k : LO_W;
        lo_v w[LO_RT];
#pragma GCC unroll 8
        for (int b = 0; b < RT; b++) w[b] = lo_ldw(L->a, dt, (size_t)(i + b) * K + k, r);
#pragma GCC unroll 8
        for (int a = 0; a < TT; a++) {
            const float *xr = x + (size_t)(t + a) * ldx + k;
            const lo_v xv = r == LO_W ? lo_ldx(xr) : lo_ldx_m(xr, r);
#pragma GCC unroll 8
            for (int b = 0; b < RT; b++) acc[a][b] = lo_fma(w[b], xv, acc[a][b]);
        }
    }
#pragma GCC unroll 8
    for (int a = 0; a < TT; a++)
#pragma GCC unroll 8
        for (int b = 0; b < RT; b++) h[(size_t)(t + a) * ldh + i + b] = lo_hsum(acc[a][b]) * lo_hs(L, i + b);
}

static void lo_shrink(float *h, int ldh, const float *x, int ldx, const struct ifg_lora *L, int t0, int t1, int K) {
    int t = t0;
    for (; t + LO_TT <= t1; t += LO_TT) {
        int i = 0;
        for (; i + LO_RT <= L->rank; i += LO_RT) lo_shrink_tile(h, ldh, x, ldx, L, K, t, i, LO_TT, LO_RT);
        for (; i < L->rank; i++) lo_shrink_tile(h, ldh, x, ldx, L, K, t, i, LO_TT, 1);
    }
    for (; t < t1; t++) {
        int i = 0;
        for (; i + LO_RT <= L->rank; i += LO_RT) lo_shrink_tile(h, ldh, x, ldx, L, K, t, i, 1, LO_RT);
        for (; i < L->rank; i++) lo_shrink_tile(h, ldh, x, ldx, L, K, t, i, 1, 1);
    }
}

/* Expand tile: ET tokens from t × EN output vectors from n (EN == 1: the r <= LO_W outputs
 * [n, n+r)). Per rank step: EN Bᵀ vectors loaded, ET h values broadcast, ET·EN FMAs. */
LO_AI void lo_expand_tile(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L, int N,
                          int t, int n, int r, const int ET, const int EN) {
    lo_v acc[LO_ET][LO_EN];
#pragma GCC unroll 8
    for (int a = 0; a < ET; a++)
#pragma GCC unroll 8
        for (int b = 0; b < EN; b++) acc[a][b] = lo_zero();
    for (int i = 0; i < L->rank; i++) {
        lo_v w[LO_EN];
#pragma GCC unroll 8
        for (int b = 0; b < EN; b++) w[b] = lo_ldw(L->b, L->b_dtype, (size_t)i * N + n + b * LO_W, EN == 1 ? r : LO_W);
#pragma GCC unroll 8
        for (int a = 0; a < ET; a++) {
            const lo_v hv = lo_set1(h[(size_t)(t + a) * ldh + i]);
#pragma GCC unroll 8
            for (int b = 0; b < EN; b++) acc[a][b] = lo_fma(hv, w[b], acc[a][b]);
        }
    }
#pragma GCC unroll 8
    for (int b = 0; b < EN; b++) {
        const int rb = EN == 1 ? r : LO_W, nb = n + b * LO_W;
        const lo_v d = L->dora ? (rb == LO_W ? lo_ldx(L->dora + nb) : lo_ldx_m(L->dora + nb, rb)) : lo_zero();
#pragma GCC unroll 8
        for (int a = 0; a < ET; a++) {
            float *yo = y + (size_t)(t + a) * ldy + nb;
            lo_v v = lo_add(rb == LO_W ? lo_ldx(yo) : lo_ldx_m(yo, rb), acc[a][b]);
            if (L->dora) v = lo_mul(v, d);
            if (rb == LO_W) lo_stx(yo, v); else lo_stx_m(yo, v, rb);
        }
    }
}

/* All tokens [t0, t1) for EN output vectors from n (or the r-wide tail when EN == 1). */
#define LO_ETLOOP(EN, r)                                                                         \
    do {                                                                                          \
        int t = t0;                                                                               \
        for (; t + LO_ET <= t1; t += LO_ET) lo_expand_tile(y, ldy, h, ldh, L, N, t, n, r, LO_ET, EN); \
        if (LO_ET > 2 && t + 2 <= t1) { lo_expand_tile(y, ldy, h, ldh, L, N, t, n, r, 2, EN); t += 2; } \
        for (; t < t1; t++) lo_expand_tile(y, ldy, h, ldh, L, N, t, n, r, 1, EN);                 \
    } while (0)

static void lo_expand(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L,
                      int t0, int t1, int n0, int n1, int N) {
    int n = n0;
    for (; n + LO_EN * LO_W <= n1; n += LO_EN * LO_W) LO_ETLOOP(LO_EN, LO_W);
    for (; n < n1; n += LO_W) {
        const int r = n1 - n < LO_W ? n1 - n : LO_W;
        LO_ETLOOP(1, r);
    }
}
#define LO_ALIGN LO_W
#else
#define LO_ALIGN 16
#define lo_shrink lo_shrink_ref
#define lo_expand lo_expand_ref
#endif

void ifg_lora_apply_part(float *y, int ldy, const float *x, int ldx, int N, int K,
                         const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                         float *h, int max_rank) {
    long long adapted = 0; /* rows with an adapter: the shrink work, split evenly */
    for (int s = 0; s < n_seg; s++)
        if (lora[s] && seg_start[s + 1] > seg_start[s]) adapted += seg_start[s + 1] - seg_start[s];
    if (!adapted || N <= 0) return; /* the same for every thread: no worksharing to skip */
    const int nc = lo_team();
    IFG_FOR
    for (int c = 0; c < nc; c++) { /* thread c: adapted rows number [a0, a1) in batch order */
        const long long a0 = adapted * c / nc, a1 = adapted * (c + 1) / nc;
        long long seen = 0;
        for (int s = 0; s < n_seg && seen < a1; s++) {
            const int t0 = seg_start[s], t1 = seg_start[s + 1];
            if (!lora[s] || t1 <= t0) continue;
            const long long lo = seen > a0 ? seen : a0, hi = seen + (t1 - t0) < a1 ? seen + (t1 - t0) : a1;
            if (lo < hi) lo_shrink(h, max_rank, x, ldx, lora[s], t0 + (int)(lo - seen), t0 + (int)(hi - seen), K);
            seen += t1 - t0;
        }
    }
    IFG_FOR
    for (int c = 0; c < nc; c++) { /* thread c: outputs [n0, n1), LO_ALIGN at a time, all segments */
        const long long ng = ((long long)N + LO_ALIGN - 1) / LO_ALIGN;
        const int n0 = (int)(ng * c / nc * LO_ALIGN < N ? ng * c / nc * LO_ALIGN : N);
        const int n1 = (int)(ng * (c + 1) / nc * LO_ALIGN < N ? ng * (c + 1) / nc * LO_ALIGN : N);
        for (int s = 0; s < n_seg && n0 < n1; s++)
            if (lora[s] && seg_start[s + 1] > seg_start[s])
                lo_expand(y, ldy, h, max_rank, lora[s], seg_start[s], seg_start[s + 1], n0, n1, N);
    }
}

void ifg_lora_apply(float *y, int ldy, const float *x, int ldx, int N, int K,
                    const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                    float *h, int max_rank, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_lora_apply_part(y, ldy, x, ldx, N, K, lora, seg_start, n_seg, h, max_rank);
    }
}
