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
 * In the forward pass phase 2 rides on the base projection (ifg_lora_matmul_part): each thread
 * computes its rows of x·Wᵀ for a slab of LO_SLAB tokens and expands into them at once, so y is
 * touched while in L2. As a pass of its own, a prefill's expand re-read and re-wrote all of y
 * (T × N floats, 23 MB for TinyLlama's w_gate at T = 1024) and cost 4× its arithmetic.
 * Weights are converted in registers only (bf16: shift; int8: sign-extend + convert); packing
 * pads rank, K and N with zeros, so weight loads are never masked, only x, y and DoRA's tails.
 * Every output's summation order depends only on K and rank, not on tiles or threads, so results
 * are bitwise identical for any thread count. Rows without an adapter are not touched. */
#include "lora.h"
#include "matmul.h"

#define LO_AI static inline __attribute__((always_inline))
#define LO_RC 32   /* rows per shrink unit: enough units to balance prefill, A group stays in L1 */
#define LO_SLAB 128 /* tokens per slab of the fused projection (see ifg_lora_matmul_part) */
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
#define LO_PF 2048            /* prefetch distance in bytes along a packed stream */
#define LO_ES(DT) ((DT) == IFG_LORA_I8 ? 1 : (DT) == IFG_BF16 ? 2 : 4)

/* Prefetch the cache lines of `bytes` bytes (a compile-time constant) LO_PF ahead of p. */
LO_AI void lo_pf(const void *p, const int bytes) {
#pragma GCC unroll 4
    for (int o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)p + LO_PF + o, 0, 3);
}

/* Every kernel below takes its weight dtype DT as a compile-time constant (the wrappers switch
 * on it once per call), so the inner loops carry no dtype dispatch. */

/* Shrink tile: TT tokens from t × the 4 rank rows of group g. Vector step v covers k in
 * [v*W, v*W + W); its 4 weight vectors are adjacent in packed A. */
LO_AI void lo_shrink_tile(float *h, int ldh, const float *x, int ldx, const struct ifg_lora *L, int K,
                          int t, int g, const int TT, const int DT) {
    lo_v acc[LO_TT][LO_RG];
    const int nv = (K + LO_W - 1) / LO_W;
    const size_t base = (size_t)g * lo_k16(K) * LO_RG * LO_VB;
#pragma GCC unroll 8
    for (int a = 0; a < TT; a++)
#pragma GCC unroll 8
        for (int b = 0; b < LO_RG; b++) acc[a][b] = lo_zero();
    for (int v = 0; v < nv; v++) {
        const int k = v * LO_W, r = K - k < LO_W ? K - k : LO_W;
        const size_t at = base + (size_t)(k / LO_VB) * LO_RG * LO_VB + k % LO_VB;
        lo_v w[LO_RG];
        if (k % LO_VB == 0) lo_pf((const char *)L->a + at * LO_ES(DT), LO_RG * LO_VB * LO_ES(DT));
#pragma GCC unroll 8
        for (int b = 0; b < LO_RG; b++) w[b] = lo_ldw(L->a, DT, at + (size_t)b * LO_VB);
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

LO_AI void lo_shrink_dt(float *h, int ldh, const float *x, int ldx, const struct ifg_lora *L,
                        int t0, int t1, int g, int K, const int DT) {
    int t = t0;
    for (; t + LO_TT <= t1; t += LO_TT) lo_shrink_tile(h, ldh, x, ldx, L, K, t, g, LO_TT, DT);
    if (LO_TT > 2 && t + 2 <= t1) { lo_shrink_tile(h, ldh, x, ldx, L, K, t, g, 2, DT); t += 2; }
    for (; t < t1; t++) lo_shrink_tile(h, ldh, x, ldx, L, K, t, g, 1, DT);
}

static void lo_shrink(float *h, int ldh, const float *x, int ldx, const struct ifg_lora *L,
                      int t0, int t1, int g, int K) {
    switch (L->a_dtype) {
    case IFG_BF16: lo_shrink_dt(h, ldh, x, ldx, L, t0, t1, g, K, IFG_BF16); break;
    case IFG_LORA_I8: lo_shrink_dt(h, ldh, x, ldx, L, t0, t1, g, K, IFG_LORA_I8); break;
    default: lo_shrink_dt(h, ldh, x, ldx, L, t0, t1, g, K, IFG_F32); break;
    }
}

/* Expand tile: ET tokens from t × EB 16-blocks from nb. The tile's weights are one contiguous
 * run (the blocks are adjacent in packed Bᵀ). Per rank step: EB·VPB weight vectors, ET
 * broadcasts of h, ET·EB·VPB FMAs. */
LO_AI void lo_expand_tile(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L, int N,
                          int t, int nb, const int ET, const int EB, const int DT) {
    enum { NV = LO_EB * LO_VPB };
    lo_v acc[LO_ET][NV];
    const int R = L->rank;
    const char *run = (const char *)L->b + (size_t)nb * R * LO_VB * LO_ES(DT);
#pragma GCC unroll 8
    for (int a = 0; a < ET; a++)
#pragma GCC unroll 16
        for (int j = 0; j < EB * LO_VPB; j++) acc[a][j] = lo_zero();
    for (int i = 0; i < R; i++) {
        lo_v w[NV];
        lo_pf(run + (size_t)i * EB * LO_VB * LO_ES(DT), EB * LO_VB * LO_ES(DT)); /* as much as a step reads */
#pragma GCC unroll 8
        for (int e = 0; e < EB; e++)
#pragma GCC unroll 2
            for (int q = 0; q < LO_VPB; q++)
                w[e * LO_VPB + q] = lo_ldw(L->b, DT, ((size_t)(nb + e) * R + i) * LO_VB + q * LO_W);
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
#define LO_ETLOOP(EB)                                                                                 \
    do {                                                                                              \
        int t = t0;                                                                                   \
        for (; t + LO_ET <= t1; t += LO_ET) lo_expand_tile(y, ldy, h, ldh, L, N, t, nb, LO_ET, EB, DT); \
        if (LO_ET > 2 && t + 2 <= t1) { lo_expand_tile(y, ldy, h, ldh, L, N, t, nb, 2, EB, DT); t += 2; } \
        for (; t < t1; t++) lo_expand_tile(y, ldy, h, ldh, L, N, t, nb, 1, EB, DT);                   \
    } while (0)

LO_AI void lo_expand_dt(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L,
                        int t0, int t1, int nb0, int nb1, int N, const int DT) {
    int nb = nb0;
    for (; nb + LO_EB <= nb1; nb += LO_EB) LO_ETLOOP(LO_EB);
    for (; nb < nb1; nb++) LO_ETLOOP(1);
}

static void lo_expand(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L,
                      int t0, int t1, int nb0, int nb1, int N) {
    switch (L->b_dtype) {
    case IFG_BF16: lo_expand_dt(y, ldy, h, ldh, L, t0, t1, nb0, nb1, N, IFG_BF16); break;
    case IFG_LORA_I8: lo_expand_dt(y, ldy, h, ldh, L, t0, t1, nb0, nb1, N, IFG_LORA_I8); break;
    default: lo_expand_dt(y, ldy, h, ldh, L, t0, t1, nb0, nb1, N, IFG_F32); break;
    }
}
#else
#define lo_shrink lo_shrink_ref
#define lo_expand lo_expand_ref
#endif

static inline int lo_rows(const struct ifg_lora *const *lora, const int32_t *seg_start, int s) {
    return lora[s] ? seg_start[s + 1] - seg_start[s] : 0;
}

void ifg_lora_shrink_part(float *h, int ldh, const float *x, int ldx, int K,
                          const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg) {
    long long units = 0; /* (segment, LO_RC-row chunk, rank group) */
    for (int s = 0; s < n_seg; s++) {
        const int rows = lo_rows(lora, seg_start, s);
        if (rows > 0) units += (long long)((rows + LO_RC - 1) / LO_RC) * (lora[s]->rank / LO_RG);
    }
    if (!units) return; /* the same for every thread: no worksharing to skip */
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
                        lo_shrink(h, ldh, x, ldx, lora[s], t0, t1, g, K);
                    }
        }
    }
}

void ifg_lora_expand_rows(float *y, int ldy, const float *h, int ldh, int N,
                          const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                          int t0, int t1, int n0, int n1) {
    const int nb0 = n0 / LO_VB, nb1 = (n1 + LO_VB - 1) / LO_VB, nn = n1 < N ? n1 : N;
    for (int s = 0; s < n_seg && n0 < n1; s++) {
        const int a = seg_start[s] > t0 ? seg_start[s] : t0, b = seg_start[s + 1] < t1 ? seg_start[s + 1] : t1;
        if (lora[s] && a < b) lo_expand(y, ldy, h, ldh, lora[s], a, b, nb0, nb1, nn);
    }
}

void ifg_lora_apply_part(float *y, int ldy, const float *x, int ldx, int N, int K,
                         const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                         float *h, int max_rank) {
    if (N <= 0) return;
    ifg_lora_shrink_part(h, max_rank, x, ldx, K, lora, seg_start, n_seg);
    const int nc = lo_team();
    IFG_FOR
    for (int c = 0; c < nc; c++) { /* thread c: whole 16-output blocks */
        int n0, n1;
        ifg_chunk(N, LO_VB, c, nc, &n0, &n1);
        ifg_lora_expand_rows(y, ldy, h, max_rank, N, lora, seg_start, n_seg, 0, seg_start[n_seg], n0, n1);
    }
}

static int lo_gcd(int a, int b) { return b ? lo_gcd(b, a % b) : a; }

void ifg_lora_matmul_part(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                          int T, int N, int K, int accumulate,
                          const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                          float *h, int max_rank, float *tmp) {
    if (T <= 0 || N <= 0) return;
    int dora = 0;
    for (int s = 0; s < n_seg; s++) dora |= lo_rows(lora, seg_start, s) > 0 && lora[s]->dora;
    ifg_lora_shrink_part(h, max_rank, x, ldx, K, lora, seg_start, n_seg);
    /* rows per thread: whole 16-output blocks and whole row groups of the base kernel */
    const int ra = ifg_matmul_row_align(wtype), align = ra / lo_gcd(ra, LO_VB) * LO_VB;
    const int tb = ifg_matmul_token_block(wtype), TS = tb * (LO_SLAB / tb > 1 ? LO_SLAB / tb : 1);
    const int via_tmp = accumulate && dora; /* DoRA scales the projection, not the residual */
    const int nc = lo_team();
    IFG_FOR
    for (int c = 0; c < nc; c++) {
        int r0, r1;
        ifg_chunk(N, align, c, nc, &r0, &r1);
        if (r0 >= r1) continue;
        for (int t0 = 0; t0 < T; t0 += TS) { /* token slabs: this slab of y is still in L2 */
            const int t1 = t0 + TS < T ? t0 + TS : T;
            if (!via_tmp) {
                ifg_matmul_rows(y + (size_t)t0 * ldy, ldy, x + (size_t)t0 * ldx, ldx, w, wtype, t1 - t0, r0, r1, K, accumulate);
                ifg_lora_expand_rows(y, ldy, h, max_rank, N, lora, seg_start, n_seg, t0, t1, r0, r1);
            } else {
                ifg_matmul_rows(tmp + (size_t)t0 * N, N, x + (size_t)t0 * ldx, ldx, w, wtype, t1 - t0, r0, r1, K, 0);
                ifg_lora_expand_rows(tmp, N, h, max_rank, N, lora, seg_start, n_seg, t0, t1, r0, r1);
                for (int t = t0; t < t1; t++)
                    for (int n = r0; n < r1; n++) y[(size_t)t * ldy + n] += tmp[(size_t)t * N + n];
            }
        }
    }
}

void ifg_lora_apply(float *y, int ldy, const float *x, int ldx, int N, int K,
                    const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                    float *h, int max_rank, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_lora_apply_part(y, ldy, x, ldx, N, K, lora, seg_start, n_seg, h, max_rank);
    }
}

void ifg_lora_matmul(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                     int T, int N, int K, int accumulate,
                     const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                     float *h, int max_rank, float *tmp, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_lora_matmul_part(y, ldy, x, ldx, w, wtype, T, N, K, accumulate, lora, seg_start, n_seg, h, max_rank, tmp);
    }
}
