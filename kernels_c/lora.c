/* lora.c — the low-rank part of mixed-adapter batches.
 *
 * Two phases over all segments at once, each one worksharing loop (so one barrier each, not two
 * per segment):
 *  1. shrink h[t] = (x[t]·Aᵀ) ⊙ h_scale for every adapted row t. The work is cut into units of
 *     (segment, chunk of up to LO_RC rows, group of IFG_LORA_RG rank rows), split evenly over the
 *     threads in that order: in decode (a few rows per adapter) the threads split an adapter's
 *     rank groups, so each reads its own part of A once; in prefill they split the rows.
 *     A unit streams its rank group of packed A front to back (one contiguous stream) in
 *     register tiles of LO_TT rows × 4 rank rows: each A vector is loaded and converted once
 *     for LO_TT tokens.
 *  2. expand y[t] += h[t]·Bᵀ (then DoRA's row factor). The threads split the 16-output blocks of
 *     packed Bᵀ; one block's outputs are a sum of rank broadcast-multiplies of 16-value rows, no
 *     horizontal reductions; register tiles of LO_ET tokens × LO_EB blocks, whose weights are
 *     one contiguous run of memory.
 * Weights are converted in registers only (bf16: shift; int8: sign-extend + convert); packing
 * pads rank, K and N with zeros, so weight loads are never masked, only x, y and DoRA's tails.
 * Every output's summation order depends only on K and rank, not on tiles or threads, so results
 * are bitwise identical for any thread count. Rows without an adapter are not touched. */
#include "lora.h"

#define LO_AI static inline __attribute__((always_inline))
#define LO_RC 32 /* rows per shrink unit: enough units to balance prefill, A group stays in L1 */
#define LO_RG IFG_LORA_RG
#define LO_VB IFG_LORA_VB

static inline size_t lo_k16(int K) { return ((size_t)K + LO_VB - 1) / LO_VB; }
static inline float lo_hs(const struct ifg_lora *L, int i) { return L->h_scale ? L->h_scale[i] : 1.0f; }

static inline int lo_team(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* ---- scalar reference ---------------------------------------------------------------------- */
static inline float lo_ld(const void *w, int dtype, size_t i) {
    return dtype == IFG_LORA_I8 ? (float)((const int8_t *)w)[i] : ifg_load_f32(w, dtype, i);
}

/* h[t][g*4 .. g*4+4) for rows [t0, t1): rank group g of packed A. */
static void lo_shrink_ref(float *h, int ldh, const float *x, int ldx, const struct ifg_lora *L,
                          int t0, int t1, int g, int K) {
    const size_t k16 = lo_k16(K);
    for (int t = t0; t < t1; t++)
        for (int b = 0; b < LO_RG; b++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++)
                acc += x[(size_t)t * ldx + k] *
                       lo_ld(L->a, L->a_dtype, (((size_t)g * k16 + k / LO_VB) * LO_RG + b) * LO_VB + k % LO_VB);
            h[(size_t)t * ldh + g * LO_RG + b] = acc * lo_hs(L, g * LO_RG + b);
        }
}

/* y[t][n] for rows [t0, t1) and the outputs of 16-blocks [nb0, nb1) below N. */
static void lo_expand_ref(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L,
                          int t0, int t1, int nb0, int nb1, int N) {
    const int n1 = nb1 * LO_VB < N ? nb1 * LO_VB : N;
    for (int t = t0; t < t1; t++)
        for (int n = nb0 * LO_VB; n < n1; n++) {
            float acc = 0.0f;
            for (int i = 0; i < L->rank; i++)
                acc += h[(size_t)t * ldh + i] *
                       lo_ld(L->b, L->b_dtype, ((size_t)(n / LO_VB) * L->rank + i) * LO_VB + n % LO_VB);
            float v = y[(size_t)t * ldy + n] + acc;
            y[(size_t)t * ldy + n] = L->dora ? v * L->dora[n] : v;
        }
}

#if defined(IFG_AVX512) || defined(IFG_AVX2)
/* ---- SIMD: one vector abstraction per ISA ------------------------------------------------- */
#if defined(IFG_AVX512)
#define LO_W 16
#define LO_TT 4 /* shrink tile: 4 tokens × 4 rank rows = 16 accumulators */
#define LO_ET 4 /* expand tile: 4 tokens × 4 blocks (4 vectors) = 16 accumulators */
#define LO_EB 4
typedef __m512 lo_v;
typedef __mmask16 lo_m;
LO_AI lo_m lo_mask(int r) { return (lo_m)((1u << r) - 1u); } /* 0 <= r < 16 */
LO_AI lo_v lo_zero(void) { return _mm512_setzero_ps(); }
LO_AI lo_v lo_set1(float f) { return _mm512_set1_ps(f); }
LO_AI lo_v lo_fma(lo_v a, lo_v b, lo_v c) { return _mm512_fmadd_ps(a, b, c); }
LO_AI lo_v lo_add(lo_v a, lo_v b) { return _mm512_add_ps(a, b); }
LO_AI lo_v lo_mul(lo_v a, lo_v b) { return _mm512_mul_ps(a, b); }
LO_AI lo_v lo_ldx(const float *p) { return _mm512_loadu_ps(p); }
LO_AI lo_v lo_ldx_m(const float *p, int r) { return _mm512_maskz_loadu_ps(lo_mask(r), p); }
LO_AI void lo_stx(float *p, lo_v v) { _mm512_storeu_ps(p, v); }
LO_AI void lo_stx_m(float *p, lo_v v, int r) { _mm512_mask_storeu_ps(p, lo_mask(r), v); }
/* 16 packed weights w[i..i+16) as f32 (packing makes every such load whole). */
LO_AI lo_v lo_ldw(const void *w, int dtype, size_t i) {
    switch (dtype) {
    case IFG_BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i))), 16));
    case IFG_LORA_I8:
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)w + i))));
    default: return _mm512_loadu_ps((const float *)w + i);
    }
}
LO_AI float lo_hsum(lo_v a) { return _mm512_reduce_add_ps(a); }
#else /* AVX2 + FMA */
#define LO_W 8
#define LO_TT 2 /* 2 tokens × 4 rank rows = 8 accumulators + 4 weights + 1 x of 16 ymm */
#define LO_ET 2 /* 2 tokens × 2 blocks (4 vectors) = 8 accumulators + 4 weights + 1 h */
#define LO_EB 2
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
LO_AI lo_v lo_ldw(const void *w, int dtype, size_t i) {
    switch (dtype) {
    case IFG_BF16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i))), 16));
    case IFG_LORA_I8:
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i))));
    default: return _mm256_loadu_ps((const float *)w + i);
    }
}
LO_AI float lo_hsum(lo_v a) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    q = _mm_hadd_ps(q, q);
    return _mm_cvtss_f32(_mm_hadd_ps(q, q));
}
#endif
#define LO_VPB (LO_VB / LO_W) /* vectors per packed 16-value run */
static inline size_t lo_esize(int dtype) { return dtype == IFG_LORA_I8 ? 1 : ifg_dtype_size(dtype); }
#ifndef LO_PF
#define LO_PF 2048
#endif
#ifndef LO_PF_SH
#define LO_PF_SH 1
#define LO_PF_EX 1
#endif
LO_AI void lo_pf(const void *w, int dtype, size_t i) {
    if (LO_PF) __builtin_prefetch((const char *)w + i * lo_esize(dtype) + LO_PF, 0, 3);
}

/* Shrink tile: TT tokens from t × the 4 rank rows of group g. Vector step v covers k in
 * [v*W, v*W + W); its 4 weight vectors are adjacent in packed A. */
LO_AI void lo_shrink_tile(float *h, int ldh, const float *x, int ldx, const struct ifg_lora *L, int K,
                          int t, int g, const int TT) {
    lo_v acc[LO_TT][LO_RG];
    const int dt = L->a_dtype, nv = (K + LO_W - 1) / LO_W;
    const size_t base = (size_t)g * lo_k16(K) * LO_RG * LO_VB;
#pragma GCC unroll 8
    for (int a = 0; a < TT; a++)
#pragma GCC unroll 8
        for (int b = 0; b < LO_RG; b++) acc[a][b] = lo_zero();
    for (int v = 0; v < nv; v++) {
        const int k = v * LO_W, r = K - k < LO_W ? K - k : LO_W;
        const size_t at = base + (size_t)(k / LO_VB) * LO_RG * LO_VB + k % LO_VB;
        lo_v w[LO_RG];
        if (LO_PF_SH) { lo_pf(L->a, dt, at); lo_pf(L->a, dt, at + 2 * LO_VB); }
#pragma GCC unroll 8
        for (int b = 0; b < LO_RG; b++) w[b] = lo_ldw(L->a, dt, at + (size_t)b * LO_VB);
#pragma GCC unroll 8
        for (int a = 0; a < TT; a++) {
            const float *xr = x + (size_t)(t + a) * ldx + k;
            const lo_v xv = r == LO_W ? lo_ldx(xr) : lo_ldx_m(xr, r);
#pragma GCC unroll 8
            for (int b = 0; b < LO_RG; b++) acc[a][b] = lo_fma(w[b], xv, acc[a][b]);
        }
    }
#pragma GCC unroll 8
    for (int a = 0; a < TT; a++)
#pragma GCC unroll 8
        for (int b = 0; b < LO_RG; b++)
            h[(size_t)(t + a) * ldh + g * LO_RG + b] = lo_hsum(acc[a][b]) * lo_hs(L, g * LO_RG + b);
}

static void lo_shrink(float *h, int ldh, const float *x, int ldx, const struct ifg_lora *L,
                      int t0, int t1, int g, int K) {
    int t = t0;
    for (; t + LO_TT <= t1; t += LO_TT) lo_shrink_tile(h, ldh, x, ldx, L, K, t, g, LO_TT);
    if (LO_TT > 2 && t + 2 <= t1) { lo_shrink_tile(h, ldh, x, ldx, L, K, t, g, 2); t += 2; }
    for (; t < t1; t++) lo_shrink_tile(h, ldh, x, ldx, L, K, t, g, 1);
}

/* Expand tile: ET tokens from t × EB 16-blocks from nb. Per rank step: EB·VPB weight vectors
 * (adjacent runs of the blocks), ET broadcasts of h, ET·EB·VPB FMAs. */
LO_AI void lo_expand_tile(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L, int N,
                          int t, int nb, const int ET, const int EB) {
    enum { NV = LO_EB * LO_VPB };
    lo_v acc[LO_ET][NV];
    const int R = L->rank, dt = L->b_dtype;
#pragma GCC unroll 8
    for (int a = 0; a < ET; a++)
#pragma GCC unroll 16
        for (int j = 0; j < EB * LO_VPB; j++) acc[a][j] = lo_zero();
    for (int i = 0; i < R; i++) {
        lo_v w[NV];
        if (LO_PF_EX)
            for (int e = 0; e < EB; e++) lo_pf(L->b, dt, ((size_t)(nb + e) * R + i) * LO_VB);
#pragma GCC unroll 8
        for (int e = 0; e < EB; e++)
#pragma GCC unroll 2
            for (int q = 0; q < LO_VPB; q++)
                w[e * LO_VPB + q] = lo_ldw(L->b, dt, ((size_t)(nb + e) * R + i) * LO_VB + q * LO_W);
#pragma GCC unroll 8
        for (int a = 0; a < ET; a++) {
            const lo_v hv = lo_set1(h[(size_t)(t + a) * ldh + i]);
#pragma GCC unroll 16
            for (int j = 0; j < EB * LO_VPB; j++) acc[a][j] = lo_fma(hv, w[j], acc[a][j]);
        }
    }
#pragma GCC unroll 16
    for (int j = 0; j < EB * LO_VPB; j++) {
        const int n = nb * LO_VB + j * LO_W, r = N - n < LO_W ? N - n : LO_W;
        if (r <= 0) break; /* padding past N */
        const lo_v d = L->dora ? (r == LO_W ? lo_ldx(L->dora + n) : lo_ldx_m(L->dora + n, r)) : lo_zero();
#pragma GCC unroll 8
        for (int a = 0; a < ET; a++) {
            float *yo = y + (size_t)(t + a) * ldy + n;
            lo_v v = lo_add(r == LO_W ? lo_ldx(yo) : lo_ldx_m(yo, r), acc[a][j]);
            if (L->dora) v = lo_mul(v, d);
            if (r == LO_W) lo_stx(yo, v); else lo_stx_m(yo, v, r);
        }
    }
}

/* All tokens [t0, t1) for EB blocks from nb. */
#define LO_ETLOOP(EB)                                                                             \
    do {                                                                                          \
        int t = t0;                                                                               \
        for (; t + LO_ET <= t1; t += LO_ET) lo_expand_tile(y, ldy, h, ldh, L, N, t, nb, LO_ET, EB); \
        if (LO_ET > 2 && t + 2 <= t1) { lo_expand_tile(y, ldy, h, ldh, L, N, t, nb, 2, EB); t += 2; } \
        for (; t < t1; t++) lo_expand_tile(y, ldy, h, ldh, L, N, t, nb, 1, EB);                   \
    } while (0)

static void lo_expand(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L,
                      int t0, int t1, int nb0, int nb1, int N) {
    int nb = nb0;
    for (; nb + LO_EB <= nb1; nb += LO_EB) LO_ETLOOP(LO_EB);
    for (; nb < nb1; nb++) LO_ETLOOP(1);
}
#else
#define lo_shrink lo_shrink_ref
#define lo_expand lo_expand_ref
#endif

static inline int lo_rows(const struct ifg_lora *const *lora, const int32_t *seg_start, int s) {
    return lora[s] ? seg_start[s + 1] - seg_start[s] : 0;
}

void ifg_lora_apply_part(float *y, int ldy, const float *x, int ldx, int N, int K,
                         const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                         float *h, int max_rank) {
    long long units = 0; /* shrink units: (segment, LO_RC-row chunk, rank group) */
    for (int s = 0; s < n_seg; s++) {
        const int rows = lo_rows(lora, seg_start, s);
        if (rows > 0) units += (long long)((rows + LO_RC - 1) / LO_RC) * (lora[s]->rank / LO_RG);
    }
    if (!units || N <= 0) return; /* the same for every thread: no worksharing to skip */
    const int nc = lo_team();
    IFG_FOR
    for (int c = 0; c < nc; c++) { /* thread c: units [u0, u1) in (segment, chunk, group) order */
        const long long u0 = units * c / nc, u1 = units * (c + 1) / nc;
        long long u = 0;
        for (int s = 0; s < n_seg && u < u1; s++) {
            const int rows = lo_rows(lora, seg_start, s);
            if (rows <= 0) continue;
            const int ng = lora[s]->rank / LO_RG;
            for (int r0 = 0; r0 < rows && u < u1; r0 += LO_RC)
                for (int g = 0; g < ng && u < u1; g++, u++)
                    if (u >= u0) {
                        const int t0 = seg_start[s] + r0, t1 = t0 + (rows - r0 < LO_RC ? rows - r0 : LO_RC);
                        lo_shrink(h, max_rank, x, ldx, lora[s], t0, t1, g, K);
                    }
        }
    }
    IFG_FOR
    for (int c = 0; c < nc; c++) { /* thread c: 16-output blocks [nb0, nb1), all segments */
        const long long n16 = ((long long)N + LO_VB - 1) / LO_VB;
        const int nb0 = (int)(n16 * c / nc), nb1 = (int)(n16 * (c + 1) / nc);
        for (int s = 0; s < n_seg && nb0 < nb1; s++)
            if (lo_rows(lora, seg_start, s) > 0)
                lo_expand(y, ldy, h, max_rank, lora[s], seg_start[s], seg_start[s + 1], nb0, nb1, N);
    }
}

void ifg_lora_apply(float *y, int ldy, const float *x, int ldx, int N, int K,
                    const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                    float *h, int max_rank, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_lora_apply_part(y, ldy, x, ldx, N, K, lora, seg_start, n_seg, h, max_rank);
    }
}
