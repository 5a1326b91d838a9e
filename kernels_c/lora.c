/* lora.c — the low-rank part of mixed-adapter batches.
 *
 * Two phases over all segments at once:
 *  1. shrink: the partial sums hp[c][t] = x[t][kc..kc+LO_KC) · Aᵀ for every adapted row t and
 *     k-chunk c. A is stored transposed ([K][rank]), so one k's rank values are one vector: the
 *     tile broadcasts x[t][k] and multiply-adds it into a vector of ranks per token, with no
 *     horizontal sums, one A load and conversion shared by LO_ST tokens (an int8 A: integer dot
 *     products with x rounded to int8, 4 k per instruction, lo_shrink8_tile; a decode step's
 *     adapter cost is arithmetic, not bytes: with every layer's adapters cache-hot it was the
 *     same). Units (segment, chunk of LO_RC rows, k-chunk) are split evenly over the threads in
 *     that order: in decode (a row or two per adapter) the threads split each adapter's A by k,
 *     each reading its own part of it once; in prefill they also split the rows. One
 *     worksharing loop, one barrier.
 *  2. expand y[t] += h[t]·Bᵀ (then DoRA's row factor), where h[t] = h_scale ⊙ Σ_c hp[c][t]
 *     (chunks added in order, by each thread for the rows it expands, into a stack buffer).
 *     Threads split the 16-output blocks of packed Bᵀ; one block's outputs are a sum of rank
 *     broadcast-multiplies of 16-value rows; register tiles of LO_ET tokens × LO_EB blocks,
 *     whose weights are one contiguous run of memory.
 In the forward pass phase 2 rides on the base projection (ifg_lora_matmul_part): on the
 * interleaved int8 bases (q8_0x16 / q4_0x16) the GEMM calls the expand back (ifg_mm_epilogue)
 * for every 128 rows of a token tile as soon as they are final, so the low-rank part goes into
 * y while it is in L1 and the Bᵀ reads interleave with the base arithmetic; on other bases each
 * thread computes its rows of x·Wᵀ for a slab of LO_SLAB tokens and expands into them at once.
 * As a pass of its own, a prefill's expand re-read and re-wrote all of y (T × N floats, 23 MB
 * for TinyLlama's w_gate at T = 1024) and cost 4× its arithmetic.
 *
 * Weights are converted in registers (bf16: shift; int8: sign-extend + convert). A prefill
 * segment uses each Bᵀ weight for hundreds of rows, so there a run of Bᵀ is converted to f32
 * once into a stack buffer that every token tile reads (LO_CONV_ROWS rows and up); the values
 * and the order of the sums are the same either way. Every output's summation order depends
 * only on K, rank and the batch's segments (the k-chunks and tiles are fixed, not per thread),
 * so results are bitwise identical for any thread count. Rows without an adapter are not touched. */
#include "lora.h"
#include "matmul.h"
#include "quant.h"

#define LO_AI static inline __attribute__((always_inline))
#define LO_RC 32       /* rows per shrink unit */
#define LO_KC 512      /* k per shrink unit: each has its own partial sums */
#define LO_HB 8192     /* floats of a thread's stack buffer of summed h */
#define LO_SLAB 128    /* tokens per slab of the fused projection */
#define LO_CONV_ROWS 8 /* segment rows from which an expand converts each Bᵀ run once */
#define LO_RMAX 128    /* largest rank whose Bᵀ runs are converted */
#define LO_VB IFG_LORA_VB
#define LO_PF 2048     /* prefetch distance in bytes along a weight stream */
#define LO_PFL 3       /* its locality hint (3: all cache levels) */
#define LO_ES(DT) ((DT) == IFG_LORA_I8 ? 1 : (DT) == IFG_BF16 ? 2 : 4) /* bytes per weight */

int ifg_lora_h_rows(int T, int K) { return (K + LO_KC - 1) / LO_KC * T; }

static inline float lo_hs(const struct ifg_lora *L, int i) { return L->h_scale ? L->h_scale[i] : 1.0f; }

static inline int lo_team(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* ---- scalar reference ---------------------------------------------------------------------- */
static inline float lo_ld(const void *w, int dtype, size_t i) { return ifg_load_f32(w, dtype, i); }

/* hp[t][i] = Σ_{k0 <= k < k1} x[t][k] A[k][i] for rows [t0, t1). */
static void lo_shrink_ref(float *hp, int ldh, const float *x, int ldx, const struct ifg_lora *L,
                          int t0, int t1, int k0, int k1) {
    for (int t = t0; t < t1; t++)
        for (int i = 0; i < L->rank; i++) {
            float acc = 0.0f;
            for (int k = k0; k < k1; k++) acc += x[(size_t)t * ldx + k] * lo_ld(L->a, L->a_dtype, (size_t)k * L->rank + i);
            hp[(size_t)t * ldh + i] = acc;
        }
}

/* The rounded x of a shrink unit (lo_round_x, or the caller's ifg_xq): row t0 + i's int8 at
 * q[i * ldq + k - k0], its block b (of the unit's) scale and sum of q at d / s[i * ldd + b]. */
struct lo_xr { const int8_t *q; const float *d; const int32_t *s; int ldq, ldd; };

/* int8 A: hp[t][i] = Σ_b d_t,b · Σ_{k in block b} q_t[k] A[k][i] for rows [t0, t1) and the
 * blocks of [k0, k1) in order, each added with one multiply-add (fmaf: the SIMD paths' fma, so
 * every ISA gets the same bits). A packed as lora.h says (bytes a + 128, 4 k of a rank in 4
 * bytes), zero past K, as q is past k1. */
static void lo_shrink8_ref(float *hp, int ldh, const struct lo_xr *xr, const struct ifg_lora *L,
                           int t0, int t1, int k0, int k1) {
    const int R = L->rank, nb = (k1 - k0 + IFG_QK - 1) / IFG_QK;
    const uint8_t *a = (const uint8_t *)L->a + (size_t)k0 * R;
    for (int t = t0; t < t1; t++) {
        const int8_t *q = xr->q + (size_t)(t - t0) * xr->ldq;
        const float *d = xr->d + (size_t)(t - t0) * xr->ldd;
        for (int i = 0; i < R; i++) {
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                int32_t s = 0;
                for (int k = b * IFG_QK; k < (b + 1) * IFG_QK; k++)
                    s += (int32_t)q[k] * ((int32_t)a[((size_t)(k / 4) * R + i) * 4 + k % 4] - 128);
                acc = fmaf((float)s, d[b], acc);
            }
            hp[(size_t)t * ldh + i] = acc;
        }
    }
}

/* hb[(t - t0) * ldb + i] = h_scale[i] · Σ_c hp[c][t][i] (chunks in order) for rows [t0, t1). */
static void lo_sum_ref(float *hb, int ldb, const float *hp, int ldh, int nkc, size_t ttot,
                       const struct ifg_lora *L, int t0, int t1) {
    for (int t = t0; t < t1; t++)
        for (int i = 0; i < L->rank; i++) {
            float s = 0.0f;
            for (int c = 0; c < nkc; c++) s += hp[((size_t)c * ttot + t) * ldh + i];
            hb[(size_t)(t - t0) * ldb + i] = s * lo_hs(L, i);
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

/* int8: y[t][n] += d_t · Σ_i q_t[i] B[n][i] (then DoRA) for the outputs of 16-blocks [nb0, nb1). */
static void lo_expand8_ref(float *y, int ldy, const float *hb, int ldh, const struct ifg_lora *L,
                           int t0, int t1, int nb0, int nb1, int N) {
    const int R = L->rank, n1 = nb1 * LO_VB < N ? nb1 * LO_VB : N;
    const uint8_t *b = (const uint8_t *)L->b;
    for (int t = t0; t < t1; t++) {
        const int8_t *q = (const int8_t *)(hb + (size_t)t * ldh);
        const float d = hb[(size_t)t * ldh + R / 4];
        for (int n = nb0 * LO_VB; n < n1; n++) {
            int32_t s = 0;
            for (int i = 0; i < R; i++)
                s += ((int32_t)b[((((size_t)n / LO_VB) * (R / 4) + i / 4) * LO_VB + n % LO_VB) * 4 + i % 4] - 128) * q[i];
            const float v = y[(size_t)t * ldy + n] + (float)s * d;
            y[(size_t)t * ldy + n] = L->dora ? v * L->dora[n] : v;
        }
    }
}

#if defined(IFG_AVX512) || defined(IFG_AVX2)
/* ---- SIMD: one vector abstraction per ISA ------------------------------------------------- */
#if defined(IFG_AVX512)
#define LO_W 16
#define LO_RV 4 /* shrink: rank vectors per tile (tokens per tile: lo_st_tokens) */
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
#define LO_STI(p, v) _mm512_storeu_si512((void *)(p), v)
LO_AI lo_v lo_cvt_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
/* r float weights (f32 / bf16) w[i..i+r) as f32, the rest zero, nothing beyond read (0 < r <= 16). */
LO_AI lo_v lo_ldw_n(const void *w, int dtype, size_t i, int r) {
    if (r == LO_W)
        return dtype == IFG_BF16 ? lo_cvt_bf16(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i)))
                                 : _mm512_loadu_ps((const float *)w + i);
    return dtype == IFG_BF16 ? lo_cvt_bf16(_mm256_maskz_loadu_epi16(lo_mask(r), (const uint16_t *)w + i))
                             : _mm512_maskz_loadu_ps(lo_mask(r), (const float *)w + i);
}
#else /* AVX2 + FMA */
#define LO_W 8
#define LO_RV 2
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
#define LO_STI(p, v) _mm256_storeu_si256((__m256i *)(p), v)
LO_AI lo_v lo_cvt_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
LO_AI lo_v lo_ldw_n(const void *w, int dtype, size_t i, int r) {
    if (r == LO_W)
        return dtype == IFG_BF16 ? lo_cvt_bf16(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)))
                                 : _mm256_loadu_ps((const float *)w + i);
    if (dtype != IFG_BF16) return _mm256_maskload_ps((const float *)w + i, lo_imask(r));
    uint16_t raw[8] = {0}; /* the raw tail (AVX2 has no 16-bit masked load) */
    memcpy(raw, (const uint16_t *)w + i, (size_t)r * 2);
    return lo_cvt_bf16(_mm_loadu_si128((const __m128i *)raw));
}
#endif
#define LO_VPB (LO_VB / LO_W) /* vectors per packed 16-value run */
LO_AI lo_v lo_ldw(const void *w, int dtype, size_t i) { return lo_ldw_n(w, dtype, i, LO_W); }

/* Prefetch the cache lines of `bytes` bytes (a compile-time constant) LO_PF ahead of p. */
LO_AI void lo_pf(const void *p, const int bytes) {
#pragma GCC unroll 4
    for (int o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)p + LO_PF + o, 0, LO_PFL);
}

/* Every kernel below takes its weight dtype DT as a compile-time constant (the wrappers switch
 * on it once per call), so the inner loops carry no dtype dispatch. */

/* Shrink tile: TT tokens from t × RV rank vectors from rank i0 (the last holding rl <= W ranks),
 * over k in [k0, k1): per k one A load per rank vector, TT broadcasts of x, TT·RV FMAs. With
 * few tokens that is too few independent FMA chains to hide the FMA latency (a decode tile of
 * 2 tokens ran at one k per 4 cycles, 11 GB/s of int8 A per thread), so KU interleaved sets
 * of accumulators take k, k+1, ... in turn and are added at the end: the summation order is
 * then a function of the tile shape, which the batch fixes (not the threads). */
#define LO_KU(TT, RV) ((TT) * (RV) >= 8 ? 1 : (TT) * (RV) >= 4 ? 2 : 4)
LO_AI void lo_shrink_tile(float *hp, int ldh, const float *x, int ldx, const void *a, int R,
                          int k0, int k1, int t, int i0, int rl, const int TT, const int RV, const int DT,
                          const int FULL) {
    const int KU = LO_KU(TT, RV);
    const size_t rs = (size_t)R * LO_ES(DT); /* bytes per k of A */
    const char *ap = (const char *)a + ((size_t)k0 * R + i0) * LO_ES(DT);
    const float *xr = x + (size_t)t * ldx + k0;
    lo_v acc[4][12][LO_RV];
#pragma GCC unroll 4
    for (int u = 0; u < KU; u++)
#pragma GCC unroll 12
        for (int i = 0; i < TT; i++)
#pragma GCC unroll 4
            for (int j = 0; j < RV; j++) acc[u][i][j] = lo_zero();
    /* one k: RV weight vectors (FULL: the last one has LO_W ranks too, no mask), TT broadcasts */
#define LO_SHRINK_K(u)                                                                                       \
    do {                                                                                                     \
        const char *aw = ap + (size_t)(u) * rs;                                                              \
        lo_v w[LO_RV];                                                                                       \
        _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++)                                                 \
            w[j] = lo_ldw_n(aw, DT, (size_t)j * LO_W, FULL || j < RV - 1 ? LO_W : rl);                       \
        _Pragma("GCC unroll 12") for (int i = 0; i < TT; i++) {                                              \
            const lo_v xb = lo_set1(xr[(size_t)i * ldx + (u)]);                                              \
            _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) acc[u][i][j] = lo_fma(xb, w[j], acc[u][i][j]); \
        }                                                                                                    \
    } while (0)
    int k = k0;
    for (; k + KU <= k1; k += KU, ap += KU * rs, xr += KU) {
        __builtin_prefetch(ap + LO_PF, 0, LO_PFL);
#pragma GCC unroll 4
        for (int u = 0; u < KU; u++) LO_SHRINK_K(u);
    }
    for (; k < k1; k++, ap += rs, xr++) LO_SHRINK_K(0);
#undef LO_SHRINK_K
#pragma GCC unroll 12
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 4
        for (int j = 0; j < RV; j++) {
            lo_v v = acc[0][i][j];
            if (KU == 2) v = lo_add(v, acc[1][i][j]);
            if (KU == 4) v = lo_add(lo_add(v, acc[1][i][j]), lo_add(acc[2][i][j], acc[3][i][j]));
            float *o = hp + (size_t)(t + i) * ldh + i0 + j * LO_W;
            if (!FULL && j == RV - 1) lo_stx_m(o, v, rl); else lo_stx(o, v);
        }
}

/* Tokens per shrink tile for RV rank vectors: as many accumulators as the registers allow. */
#if defined(IFG_AVX512)
#define LO_ST(RV) ((RV) == 1 ? 12 : (RV) == 2 ? 6 : (RV) == 3 ? 4 : 3)
#else
#define LO_ST(RV) ((RV) == 1 ? 12 : 6)
#endif

/* Rows [t0, t1) × RV rank vectors from i0: full tiles, then the remainder in tiles of 8/4/2/1. */
LO_AI void lo_shrink_rows_f(float *hp, int ldh, const float *x, int ldx, const void *a, int R, int k0, int k1,
                            int t0, int t1, int i0, int rl, const int RV, const int DT, const int FULL) {
    int t = t0;
    for (; t + LO_ST(RV) <= t1; t += LO_ST(RV)) lo_shrink_tile(hp, ldh, x, ldx, a, R, k0, k1, t, i0, rl, LO_ST(RV), RV, DT, FULL);
    if (LO_ST(RV) > 8 && t + 8 <= t1) { lo_shrink_tile(hp, ldh, x, ldx, a, R, k0, k1, t, i0, rl, 8, RV, DT, FULL); t += 8; }
    if (LO_ST(RV) > 4 && t + 4 <= t1) { lo_shrink_tile(hp, ldh, x, ldx, a, R, k0, k1, t, i0, rl, 4, RV, DT, FULL); t += 4; }
    if (LO_ST(RV) > 2 && t + 2 <= t1) { lo_shrink_tile(hp, ldh, x, ldx, a, R, k0, k1, t, i0, rl, 2, RV, DT, FULL); t += 2; }
    for (; t < t1; t++) lo_shrink_tile(hp, ldh, x, ldx, a, R, k0, k1, t, i0, rl, 1, RV, DT, FULL);
}
LO_AI void lo_shrink_rows(float *hp, int ldh, const float *x, int ldx, const void *a, int R, int k0, int k1,
                          int t0, int t1, int i0, int rl, const int RV, const int DT) {
    if (rl == LO_W) lo_shrink_rows_f(hp, ldh, x, ldx, a, R, k0, k1, t0, t1, i0, rl, RV, DT, 1);
    else lo_shrink_rows_f(hp, ldh, x, ldx, a, R, k0, k1, t0, t1, i0, rl, RV, DT, 0);
}

/* The rank block from rank i0 of R (blocks of up to LO_RV vectors): its vector count, and in *rl
 * the ranks its last vector holds. */
static inline int lo_rank_block(int R, int i0, int *rl) {
    const int left = R - i0 < LO_RV * LO_W ? R - i0 : LO_RV * LO_W, nv = (left + LO_W - 1) / LO_W;
    *rl = left - (nv - 1) * LO_W;
    return nv;
}

LO_AI void lo_shrink_dt(float *hp, int ldh, const float *x, int ldx, const struct ifg_lora *L,
                        int t0, int t1, int k0, int k1, const int DT) {
    const int R = L->rank;
    for (int i0 = 0; i0 < R; i0 += LO_RV * LO_W) {
        int rl;
        switch (lo_rank_block(R, i0, &rl)) {
        case 1: lo_shrink_rows(hp, ldh, x, ldx, L->a, R, k0, k1, t0, t1, i0, rl, 1, DT); break;
#if LO_RV > 2
        case 3: lo_shrink_rows(hp, ldh, x, ldx, L->a, R, k0, k1, t0, t1, i0, rl, 3, DT); break;
        case 4: lo_shrink_rows(hp, ldh, x, ldx, L->a, R, k0, k1, t0, t1, i0, rl, 4, DT); break;
#endif
        default: lo_shrink_rows(hp, ldh, x, ldx, L->a, R, k0, k1, t0, t1, i0, rl, 2, DT); break;
        }
    }
}

static void lo_shrink(float *hp, int ldh, const float *x, int ldx, const struct ifg_lora *L,
                      int t0, int t1, int k0, int k1) {
    if (L->a_dtype == IFG_BF16) lo_shrink_dt(hp, ldh, x, ldx, L, t0, t1, k0, k1, IFG_BF16); /* int8: lo_shrink8 */
    else lo_shrink_dt(hp, ldh, x, ldx, L, t0, t1, k0, k1, IFG_F32);
}

static void lo_sum(float *hb, int ldb, const float *hp, int ldh, int nkc, size_t ttot, const struct ifg_lora *L,
                   int t0, int t1) {
    const int R = L->rank;
    for (int t = t0; t < t1; t++)
        for (int i = 0; i < R; i += LO_W) {
            const int r = R - i < LO_W ? R - i : LO_W;
            lo_v s = lo_zero();
            for (int c = 0; c < nkc; c++) s = lo_add(s, lo_ldx_m(hp + ((size_t)c * ttot + t) * ldh + i, r));
            const lo_v hs = L->h_scale ? lo_ldx_m(L->h_scale + i, r) : lo_set1(1.0f);
            lo_stx_m(hb + (size_t)(t - t0) * ldb + i, lo_mul(s, hs), r);
        }
}

/* dst[0..n) = the n packed weights at src as f32 (n a multiple of 16). */
LO_AI void lo_cvt_run(float *dst, const void *src, size_t n, const int DT) {
    for (size_t i = 0; i < n; i += LO_W) lo_stx(dst + i, lo_ldw(src, DT, i));
}

/* The expands' output runs: r <= LO_W floats at p (fewer: the last run, masked at N). */
LO_AI lo_v lo_ld_out(const float *p, int r) { return r == LO_W ? lo_ldx(p) : lo_ldx_m(p, r); }
/* y's run = v, times DoRA's factor d (lo_ld_out of L->dora) when the adapter has one. */
LO_AI void lo_st_out(float *p, lo_v v, const struct ifg_lora *L, lo_v d, int r) {
    if (L->dora) v = lo_mul(v, d);
    if (r == LO_W) lo_stx(p, v); else lo_stx_m(p, v, r);
}

/* Expand tile: ET tokens from t × EB 16-blocks from nb, whose weights are the contiguous run at
 * w (weight (i, e-th block's output o) at (e*R + i)*16 + o; pf: prefetch it, it streams from
 * memory). Per rank step: EB·VPB weight vectors, ET broadcasts of h, ET·EB·VPB FMAs. */
LO_AI void lo_expand_tile(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L, int N,
                          const void *w, int pf, int t, int nb, const int ET, const int EB, const int DT) {
    enum { NV = LO_EB * LO_VPB };
    lo_v acc[LO_ET][NV];
    const int R = L->rank;
#pragma GCC unroll 8
    for (int a = 0; a < ET; a++)
#pragma GCC unroll 16
        for (int j = 0; j < EB * LO_VPB; j++) acc[a][j] = lo_zero();
    for (int i = 0; i < R; i++) {
        lo_v wv[NV];
        if (pf) lo_pf((const char *)w + (size_t)i * EB * LO_VB * LO_ES(DT), EB * LO_VB * LO_ES(DT));
#pragma GCC unroll 8
        for (int e = 0; e < EB; e++)
#pragma GCC unroll 2
            for (int q = 0; q < LO_VPB; q++)
                wv[e * LO_VPB + q] = lo_ldw(w, DT, ((size_t)e * R + i) * LO_VB + q * LO_W);
#pragma GCC unroll 8
        for (int a = 0; a < ET; a++) {
            const lo_v hv = lo_set1(h[(size_t)(t + a) * ldh + i]);
#pragma GCC unroll 16
            for (int j = 0; j < EB * LO_VPB; j++) acc[a][j] = lo_fma(hv, wv[j], acc[a][j]);
        }
    }
#pragma GCC unroll 16
    for (int j = 0; j < EB * LO_VPB; j++) {
        const int n = nb * LO_VB + j * LO_W, r = N - n < LO_W ? N - n : LO_W;
        if (r <= 0) break; /* padding past N */
        const lo_v d = L->dora ? lo_ld_out(L->dora + n, r) : lo_zero();
#pragma GCC unroll 8
        for (int a = 0; a < ET; a++) {
            float *yo = y + (size_t)(t + a) * ldy + n;
            lo_st_out(yo, lo_add(lo_ld_out(yo, r), acc[a][j]), L, d, r);
        }
    }
}

/* All tokens [t0, t1) for EB blocks from nb, weights w of dtype D. */
#define LO_ETLOOP(EB, w, pf, D)                                                                          \
    do {                                                                                                \
        int t = t0;                                                                                     \
        for (; t + LO_ET <= t1; t += LO_ET) lo_expand_tile(y, ldy, h, ldh, L, N, w, pf, t, nb, LO_ET, EB, D); \
        if (LO_ET > 2 && t + 2 <= t1) { lo_expand_tile(y, ldy, h, ldh, L, N, w, pf, t, nb, 2, EB, D); t += 2; } \
        for (; t < t1; t++) lo_expand_tile(y, ldy, h, ldh, L, N, w, pf, t, nb, 1, EB, D);                \
    } while (0)

LO_AI void lo_expand_dt(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L,
                        int t0, int t1, int nb0, int nb1, int N, const int DT) {
    const int R = L->rank;
    const size_t blk = (size_t)R * LO_VB; /* weights per block */
    const char *b = (const char *)L->b;
    int nb = nb0;
    if (DT != IFG_F32 && t1 - t0 >= LO_CONV_ROWS && R <= LO_RMAX) { /* convert each run once */
        float bbuf[LO_EB * LO_RMAX * LO_VB] __attribute__((aligned(64)));
        for (; nb + LO_EB <= nb1; nb += LO_EB) {
            lo_cvt_run(bbuf, b + nb * blk * LO_ES(DT), LO_EB * blk, DT);
            LO_ETLOOP(LO_EB, bbuf, 0, IFG_F32);
        }
        for (; nb < nb1; nb++) {
            lo_cvt_run(bbuf, b + nb * blk * LO_ES(DT), blk, DT);
            LO_ETLOOP(1, bbuf, 0, IFG_F32);
        }
        return;
    }
    for (; nb + LO_EB <= nb1; nb += LO_EB) LO_ETLOOP(LO_EB, b + nb * blk * LO_ES(DT), 1, DT);
    for (; nb < nb1; nb++) LO_ETLOOP(1, b + nb * blk * LO_ES(DT), 1, DT);
}

static void lo_expand(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L,
                      int t0, int t1, int nb0, int nb1, int N) {
    switch (L->b_dtype) {
    case IFG_BF16: lo_expand_dt(y, ldy, h, ldh, L, t0, t1, nb0, nb1, N, IFG_BF16); break; /* int8: lo_expand8 */
    default: lo_expand_dt(y, ldy, h, ldh, L, t0, t1, nb0, nb1, N, IFG_F32); break;
    }
}

/* ---- int8 Bᵀ: integer dot products (layout and rounding in lora.h) -------------------------
 * A 32-bit lane holds 4 consecutive ranks of one output, so one instruction does 4
 * multiply-adds per lane against 4 int8 values of h broadcast. AVX-512: vpdpbusd of the stored
 * unsigned bytes (q + 128) with the signed h, the accumulator starting at -128 · Σ q_h (exact in
 * int32); AVX2: the bytes are made signed again (xor 0x80) and go through vpmaddubsw(|w|,
 * sign(h, w)) + vpmaddwd, as the q8_0 kernels do. An int8 A goes the same way with x rounded
 * per 32-block (lo_shrink8_tile). */
#if defined(IFG_AVX512)
#define LO_ET8 4 /* expand tile: tokens × 16-blocks */
#define LO_EB8 4
#define LO_EB8W 8 /* 16-blocks of a tile of 1-2 rows */
typedef __m512i lo_vi;
typedef __m512i lo_w8;
LO_AI lo_w8 lo_ld8(const uint8_t *p, int r) { /* r <= LO_W lanes of 4 bytes */
    return r == LO_W ? _mm512_loadu_si512((const void *)p) : _mm512_maskz_loadu_epi32(lo_mask(r), p);
}
LO_AI lo_vi lo_dot8(lo_vi acc, lo_w8 w, lo_vi x4) { return _mm512_dpbusd_epi32(acc, w, x4); }
LO_AI lo_vi lo_start8(int32_t corr) { return _mm512_set1_epi32(corr); }
LO_AI lo_vi lo_set4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
LO_AI lo_v lo_cvti(lo_vi v) { return _mm512_cvtepi32_ps(v); }
LO_AI lo_vi lo_addi(lo_vi a, lo_vi b) { return _mm512_add_epi32(a, b); }
#else
#define LO_ET8 4
#define LO_EB8 1
#define LO_EB8W 1
typedef __m256i lo_vi;
typedef struct { __m256i aw, ws; } lo_w8; /* |w| and w, signed */
LO_AI lo_w8 lo_ld8(const uint8_t *p, int r) {
    const __m256i raw = r == LO_W ? _mm256_loadu_si256((const __m256i *)p)
                                  : _mm256_maskload_epi32((const int *)p, lo_imask(r));
    lo_w8 w;
    w.ws = _mm256_xor_si256(raw, _mm256_set1_epi8((char)0x80));
    w.aw = _mm256_abs_epi8(w.ws);
    return w;
}
LO_AI lo_vi lo_dot8(lo_vi acc, lo_w8 w, lo_vi x4) {
    const __m256i p = _mm256_maddubs_epi16(w.aw, _mm256_sign_epi8(x4, w.ws)); /* |pair| <= 2 · 127² */
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
LO_AI lo_vi lo_start8(int32_t corr) { (void)corr; return _mm256_setzero_si256(); }
LO_AI lo_vi lo_set4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
LO_AI lo_v lo_cvti(lo_vi v) { return _mm256_cvtepi32_ps(v); }
LO_AI lo_vi lo_addi(lo_vi a, lo_vi b) { return _mm256_add_epi32(a, b); }
#endif
/* Expand tile: ET rows from t × EB 16-blocks from nb, their Bᵀ8 the run at w (block e's rank
 * quad q at (e · rank/4 + q) · 64 bytes). h rows as lo_quant_h leaves them. */
LO_AI void lo_expand8_tile(float *y, int ldy, const float *hb, int ldh, const struct ifg_lora *L, int N,
                           const uint8_t *w, int t, int nb, const int ET, const int EB, const int R4C) {
    enum { NV = LO_EB8W * LO_VPB };
    const int R4 = R4C ? R4C : L->rank / 4; /* R4C: the rank quads as a constant (0: L's) */
    lo_vi acc[LO_ET8][NV];
#pragma GCC unroll 8
    for (int a = 0; a < ET; a++) {
        int32_t corr;
        memcpy(&corr, hb + (size_t)(t + a) * ldh + R4 + 1, 4);
        const lo_vi c0 = lo_start8(corr);
#pragma GCC unroll 8
        for (int j = 0; j < EB * LO_VPB; j++) acc[a][j] = c0;
    }
    for (int q = 0; q < R4; q++) {
        lo_w8 wv[NV];
#pragma GCC unroll 8
        for (int e = 0; e < EB; e++) {
            const uint8_t *we = w + ((size_t)e * R4 + q) * 64;
            __builtin_prefetch(we + LO_PF, 0, LO_PFL);
#pragma GCC unroll 2
            for (int v = 0; v < LO_VPB; v++) wv[e * LO_VPB + v] = lo_ld8(we + v * LO_W * 4, LO_W);
        }
#pragma GCC unroll 8
        for (int a = 0; a < ET; a++) {
            const lo_vi hv = lo_set4((const int8_t *)(hb + (size_t)(t + a) * ldh) + 4 * q);
#pragma GCC unroll 8
            for (int j = 0; j < EB * LO_VPB; j++) acc[a][j] = lo_dot8(acc[a][j], wv[j], hv);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < EB * LO_VPB; j++) {
        const int n = nb * LO_VB + j * LO_W, r = N - n < LO_W ? N - n : LO_W;
        if (r <= 0) break; /* padding past N */
        const lo_v d = L->dora ? lo_ld_out(L->dora + n, r) : lo_zero();
#pragma GCC unroll 8
        for (int a = 0; a < ET; a++) {
            float *yo = y + (size_t)(t + a) * ldy + n;
            const lo_v dh = lo_set1(hb[(size_t)(t + a) * ldh + R4]);
            lo_st_out(yo, lo_fma(lo_cvti(acc[a][j]), dh, lo_ld_out(yo, r)), L, d, r);
        }
    }
}

/* Rows [t0, t1) × 16-blocks [nb0, nb1); R4C as lo_expand8_tile takes it. A decode segment (a
 * row or two) goes LO_EB8W blocks at a time: as many accumulators as a full tile has. */
LO_AI void lo_expand8_r(float *y, int ldy, const float *hb, int ldh, const struct ifg_lora *L,
                        int t0, int t1, int nb0, int nb1, int N, const int R4C) {
    const size_t blk = (size_t)L->rank * LO_VB; /* bytes per 16-block */
    const uint8_t *b = (const uint8_t *)L->b;
    int nb = nb0;
    if (t1 - t0 == 2 || t1 - t0 == 1) {
#define LO_ET8W(EB)                                                                                          \
        do {                                                                                                \
            if (t1 - t0 == 2) lo_expand8_tile(y, ldy, hb, ldh, L, N, b + nb * blk, t0, nb, 2, EB, R4C);      \
            else lo_expand8_tile(y, ldy, hb, ldh, L, N, b + nb * blk, t0, nb, 1, EB, R4C);                   \
        } while (0)
        for (; nb + LO_EB8W <= nb1; nb += LO_EB8W) LO_ET8W(LO_EB8W);
        for (; nb < nb1; nb++) LO_ET8W(1);
#undef LO_ET8W
        return;
    }
#define LO_ET8LOOP(EB)                                                                                      \
    do {                                                                                                    \
        int t = t0;                                                                                         \
        for (; t + LO_ET8 <= t1; t += LO_ET8) lo_expand8_tile(y, ldy, hb, ldh, L, N, b + nb * blk, t, nb, LO_ET8, EB, R4C); \
        if (LO_ET8 > 2 && t + 2 <= t1) { lo_expand8_tile(y, ldy, hb, ldh, L, N, b + nb * blk, t, nb, 2, EB, R4C); t += 2; } \
        for (; t < t1; t++) lo_expand8_tile(y, ldy, hb, ldh, L, N, b + nb * blk, t, nb, 1, EB, R4C);      \
    } while (0)
    for (; nb + LO_EB8 <= nb1; nb += LO_EB8) LO_ET8LOOP(LO_EB8);
    for (; nb < nb1; nb++) LO_ET8LOOP(1);
#undef LO_ET8LOOP
}

static void lo_expand8(float *y, int ldy, const float *hb, int ldh, const struct ifg_lora *L,
                       int t0, int t1, int nb0, int nb1, int N) {
    if (L->rank == 16) lo_expand8_r(y, ldy, hb, ldh, L, t0, t1, nb0, nb1, N, 4); /* the common rank, unrolled */
    else lo_expand8_r(y, ldy, hb, ldh, L, t0, t1, nb0, nb1, N, 0);
}

/* Integer shrink tile: TT rows from t × RV rank vectors from rank i0 (the last holding rl <= W
 * ranks) over the nb blocks of a unit. Per block: int32 accumulators start at -128 · Σ q (AVX2:
 * 0, lo_dot8 makes the bytes signed), 8 dot-product steps each take 4 k of every rank (one
 * weight load per rank vector, 4 bytes of x broadcast per row), then one convert and one
 * multiply-add with the block's scale. 32 k of a rank-16 adapter for 2 rows in ~20 vector
 * instructions, where the f32 shrink converted and multiply-added k by k (~130). */
#if defined(IFG_AVX512)
#define LO_ST8(RV) ((RV) == 1 ? 12 : (RV) == 2 ? 6 : (RV) == 3 ? 4 : 3)
#else
#define LO_ST8(RV) ((RV) == 1 ? 4 : 2)
#endif
LO_AI void lo_shrink8_tile(float *hp, int ldh, const struct lo_xr *xr, int ti, const uint8_t *a, int R, int nb,
                           int t, int i0, int rl, const int TT, const int RV, const int FULL) {
    lo_v acc[LO_ST8(1)][LO_RV];
#pragma GCC unroll 12
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 4
        for (int j = 0; j < RV; j++) acc[i][j] = lo_zero();
    const int8_t *q = xr->q + (size_t)ti * xr->ldq;
    const float *d = xr->d + (size_t)ti * xr->ldd;
    const int32_t *s = xr->s + (size_t)ti * xr->ldd;
    /* few accumulators (a decode segment's 2 rows): KU sets take the k-quads in turn, so that
     * more dot-product chains run at once (integer sums: the order does not change them) */
    const int KU = TT * RV >= 4 ? 1 : TT * RV >= 2 ? 2 : 4;
    for (int b = 0; b < nb; b++) {
        lo_vi ia[4][LO_ST8(1)][LO_RV];
#pragma GCC unroll 12
        for (int i = 0; i < TT; i++) {
            const lo_vi c0 = lo_start8(-128 * s[(size_t)i * xr->ldd + b]);
#pragma GCC unroll 4
            for (int j = 0; j < RV; j++) {
                ia[0][i][j] = c0;
#pragma GCC unroll 4
                for (int u = 1; u < KU; u++) ia[u][i][j] = lo_start8(0);
            }
        }
        const uint8_t *ab = a + ((size_t)b * (IFG_QK / 4) * R + i0) * 4;
#pragma GCC unroll 8
        for (int c = 0; c < IFG_QK / 4; c++) {
            lo_w8 w[LO_RV];
#pragma GCC unroll 4
            for (int j = 0; j < RV; j++) {
                const uint8_t *p = ab + ((size_t)c * R + j * LO_W) * 4;
                __builtin_prefetch(p + LO_PF, 0, LO_PFL);
                w[j] = lo_ld8(p, FULL || j < RV - 1 ? LO_W : rl);
            }
#pragma GCC unroll 12
            for (int i = 0; i < TT; i++) {
                const lo_vi x4 = lo_set4(q + (size_t)i * xr->ldq + b * IFG_QK + 4 * c);
#pragma GCC unroll 4
                for (int j = 0; j < RV; j++) ia[c % KU][i][j] = lo_dot8(ia[c % KU][i][j], w[j], x4);
            }
        }
#pragma GCC unroll 12
        for (int i = 0; i < TT; i++) {
            const lo_v dv = lo_set1(d[(size_t)i * xr->ldd + b]);
#pragma GCC unroll 4
            for (int j = 0; j < RV; j++) {
                lo_vi v = ia[0][i][j];
#pragma GCC unroll 4
                for (int u = 1; u < KU; u++) v = lo_addi(v, ia[u][i][j]);
                acc[i][j] = lo_fma(lo_cvti(v), dv, acc[i][j]);
            }
        }
    }
#pragma GCC unroll 12
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 4
        for (int j = 0; j < RV; j++) {
            float *o = hp + (size_t)(t + i) * ldh + i0 + j * LO_W;
            if (!FULL && j == RV - 1) lo_stx_m(o, acc[i][j], rl); else lo_stx(o, acc[i][j]);
        }
}

/* Rows [t0, t1) × RV rank vectors from i0: full tiles, then the remainder in tiles of 8/4/2/1. */
LO_AI void lo_shrink8_rows_f(float *hp, int ldh, const struct lo_xr *xr, const uint8_t *a, int R, int nb,
                             int t0, int t1, int i0, int rl, const int RV, const int FULL) {
    int t = t0;
#define LO_S8(TT) lo_shrink8_tile(hp, ldh, xr, t - t0, a, R, nb, t, i0, rl, TT, RV, FULL)
    for (; t + LO_ST8(RV) <= t1; t += LO_ST8(RV)) LO_S8(LO_ST8(RV));
    if (LO_ST8(RV) > 8 && t + 8 <= t1) { LO_S8(8); t += 8; }
    if (LO_ST8(RV) > 4 && t + 4 <= t1) { LO_S8(4); t += 4; }
    if (LO_ST8(RV) > 2 && t + 2 <= t1) { LO_S8(2); t += 2; }
    for (; t < t1; t++) LO_S8(1);
#undef LO_S8
}
LO_AI void lo_shrink8_rows(float *hp, int ldh, const struct lo_xr *xr, const uint8_t *a, int R, int nb,
                           int t0, int t1, int i0, int rl, const int RV) {
    if (rl == LO_W) lo_shrink8_rows_f(hp, ldh, xr, a, R, nb, t0, t1, i0, rl, RV, 1);
    else lo_shrink8_rows_f(hp, ldh, xr, a, R, nb, t0, t1, i0, rl, RV, 0);
}

static void lo_shrink8(float *hp, int ldh, const struct lo_xr *xr, const struct ifg_lora *L,
                       int t0, int t1, int k0, int k1) {
    const int R = L->rank, nb = (k1 - k0 + IFG_QK - 1) / IFG_QK;
    const uint8_t *a = (const uint8_t *)L->a + (size_t)k0 * R;
    for (int i0 = 0; i0 < R; i0 += LO_RV * LO_W) {
        int rl;
        switch (lo_rank_block(R, i0, &rl)) {
        case 1: lo_shrink8_rows(hp, ldh, xr, a, R, nb, t0, t1, i0, rl, 1); break;
#if LO_RV > 2
        case 3: lo_shrink8_rows(hp, ldh, xr, a, R, nb, t0, t1, i0, rl, 3); break;
        case 4: lo_shrink8_rows(hp, ldh, xr, a, R, nb, t0, t1, i0, rl, 4); break;
#endif
        default: lo_shrink8_rows(hp, ldh, xr, a, R, nb, t0, t1, i0, rl, 2); break;
        }
    }
}
#else
#define lo_shrink lo_shrink_ref
#define lo_shrink8 lo_shrink8_ref
#define lo_sum lo_sum_ref
#define lo_expand lo_expand_ref
#define lo_expand8 lo_expand8_ref
#endif

/* ---- int8 adapters: h rounded to int8 for the integer expand ------------------------------ */
/* A row of summed, scaled h (R floats) rounded in place to what the int8 expand reads: bytes
 * [0, R) the int8 values, float R/4 the scale d = max|h| / 127, int32 R/4 + 1 the offset term
 * -128 · Σ q (every value read before its bytes are written; R/4 + 2 <= R for R >= 4). The
 * rounding is roundf's (ifg_round_i32 in SIMD builds: a libm call per value cost a decode step
 * 1 µs per projection). */
static void lo_quant_h(float *row, int R) {
    float amax = 0.0f;
    for (int i = 0; i < R; i++) {
        const float a = fabsf(row[i]);
        amax = a > amax ? a : amax;
    }
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    int8_t *q = (int8_t *)row;
    int32_t sum = 0;
#if defined(IFG_AVX512) || defined(IFG_AVX2)
    for (int i = 0; i < R; i += LO_W) { /* bytes [i, i + LO_W) overlap only floats already read */
        const int r = R - i < LO_W ? R - i : LO_W;
        int32_t v[LO_W];
        LO_STI(v, ifg_round_i32(lo_mul(lo_ldx_m(row + i, r), lo_set1(id))));
        for (int j = 0; j < r; j++) {
            q[i + j] = (int8_t)v[j];
            sum += v[j];
        }
    }
#else
    for (int i = 0; i < R; i++) {
        const int v = (int)roundf(row[i] * id);
        q[i] = (int8_t)v;
        sum += v;
    }
#endif
    row[R / 4] = d;
    const int32_t corr = -128 * sum;
    memcpy(row + R / 4 + 1, &corr, 4);
}

/* The expand of any adapter: int8 ones through the integer kernel. */
static void lo_expand_any(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L,
                          int t0, int t1, int nb0, int nb1, int N) {
    if (L->b_dtype == IFG_LORA_I8) lo_expand8(y, ldy, h, ldh, L, t0, t1, nb0, nb1, N);
    else lo_expand(y, ldy, h, ldh, L, t0, t1, nb0, nb1, N);
}

static inline int lo_rows(const struct ifg_lora *const *lora, const int32_t *seg_start, int s) {
    return lora[s] ? seg_start[s + 1] - seg_start[s] : 0;
}

/* x[t0..t1)[k0..k1) rounded per 32-block as ifg_quantize_x does into q/d/s (strides LO_KC,
 * LO_KC / 32), a last partial block as if zero-padded (its q past k1 zero). */
static void lo_round_x(int8_t *q, float *d, int32_t *s, const float *x, int ldx, int t0, int t1, int k0, int k1) {
    const int kf = k0 + (k1 - k0) / IFG_QK * IFG_QK; /* end of the whole blocks */
    if (kf > k0) ifg_quantize_x(q, d, s, x, ldx, t0, t1 - t0, k0, kf, LO_KC, LO_KC / IFG_QK);
    if (kf == k1) return;
    for (int t = t0; t < t1; t++) {
        float tail[IFG_QK] = {0};
        memcpy(tail, x + (size_t)t * ldx + kf, sizeof(float) * (k1 - kf));
        const size_t i = (size_t)(t - t0);
        ifg_quantize_x(q + i * LO_KC + (kf - k0), d + i * (LO_KC / IFG_QK) + (kf - k0) / IFG_QK,
                       s + i * (LO_KC / IFG_QK) + (kf - k0) / IFG_QK, tail, IFG_QK, 0, 1, 0, IFG_QK, IFG_QK, 1);
    }
}

/* One shrink unit: rows [t0, t1) of segment adapter L over [k0, k1) into its chunk's partial sums. */
static void lo_shrink_unit(float *hp, int ldh, const float *x, int ldx, const struct ifg_xq *xq,
                           const struct ifg_lora *L, int t0, int t1, int k0, int k1) {
    if (L->a_dtype != IFG_LORA_I8) {
        lo_shrink(hp, ldh, x, ldx, L, t0, t1, k0, k1);
        return;
    }
    if (xq) { /* rounded once by the caller for the base's integer GEMM */
        const struct lo_xr xr = {xq->q + (size_t)t0 * xq->ldq + k0, xq->d + (size_t)t0 * xq->ldd + k0 / IFG_QK,
                                 xq->s + (size_t)t0 * xq->ldd + k0 / IFG_QK, xq->ldq, xq->ldd};
        lo_shrink8(hp, ldh, &xr, L, t0, t1, k0, k1);
        return;
    }
    int8_t q[LO_RC * LO_KC] __attribute__((aligned(64)));
    float d[LO_RC * LO_KC / IFG_QK];
    int32_t s[LO_RC * LO_KC / IFG_QK];
    lo_round_x(q, d, s, x, ldx, t0, t1, k0, k1);
    const struct lo_xr xr = {q, d, s, LO_KC, LO_KC / IFG_QK};
    lo_shrink8(hp, ldh, &xr, L, t0, t1, k0, k1);
}

void ifg_lora_shrink_part(float *h, int ldh, const float *x, int ldx, int K, const struct ifg_lora *const *lora,
                          const int32_t *seg_start, int n_seg, const struct ifg_xq *xq) {
    const int nkc = (K + LO_KC - 1) / LO_KC;
    const size_t ttot = (size_t)seg_start[n_seg];
    long long units = 0; /* (segment, LO_RC-row chunk, k-chunk) */
    for (int s = 0; s < n_seg; s++) {
        const int rows = lo_rows(lora, seg_start, s);
        if (rows > 0) units += (long long)((rows + LO_RC - 1) / LO_RC) * nkc;
    }
    if (!units) return; /* the same for every thread: no worksharing to skip */
    const int nc = lo_team();
    IFG_FOR
    for (int c = 0; c < nc; c++) { /* thread c: units [u0, u1) in (segment, rows, k) order */
        const long long u0 = units * c / nc, u1 = units * (c + 1) / nc;
        long long u = 0;
        for (int s = 0; s < n_seg && u < u1; s++) {
            const int rows = lo_rows(lora, seg_start, s);
            if (rows <= 0) continue;
            for (int r0 = 0; r0 < rows && u < u1; r0 += LO_RC)
                for (int kc = 0; kc < nkc && u < u1; kc++, u++)
                    if (u >= u0) {
                        const int t0 = seg_start[s] + r0, t1 = t0 + (rows - r0 < LO_RC ? rows - r0 : LO_RC);
                        const int k0 = kc * LO_KC, k1 = k0 + LO_KC < K ? k0 + LO_KC : K;
                        lo_shrink_unit(h + (size_t)kc * ttot * ldh, ldh, x, ldx, xq, lora[s], t0, t1, k0, k1);
                    }
        }
    }
}

/* hb[(t - t0) * ldh + i] = the summed, scaled h of every adapted row t in [t0, t1). */
static void lo_sum_rows(float *hb, const float *h, int ldh, int K, const struct ifg_lora *const *lora,
                        const int32_t *seg_start, int n_seg, int t0, int t1) {
    const int nkc = (K + LO_KC - 1) / LO_KC;
    for (int s = 0; s < n_seg; s++) {
        const int a = seg_start[s] > t0 ? seg_start[s] : t0, c = seg_start[s + 1] < t1 ? seg_start[s + 1] : t1;
        if (!lora[s] || a >= c) continue;
        lo_sum(hb + (size_t)(a - t0) * ldh, ldh, h, ldh, nkc, (size_t)seg_start[n_seg], lora[s], a, c);
        if (lora[s]->b_dtype == IFG_LORA_I8)
            for (int t = a; t < c; t++) lo_quant_h(hb + (size_t)(t - t0) * ldh, lora[s]->rank);
    }
}

/* y += h·Bᵀ (then DoRA) for rows [t0, t1) and outputs [n0, n1), hb as lo_sum_rows left it. */
static void lo_expand_rows(float *y, int ldy, const float *hb, int ldh, int N, const struct ifg_lora *const *lora,
                           const int32_t *seg_start, int n_seg, int t0, int t1, int n0, int n1) {
    for (int s = 0; s < n_seg; s++) {
        const int a = seg_start[s] > t0 ? seg_start[s] : t0, c = seg_start[s + 1] < t1 ? seg_start[s + 1] : t1;
        if (lora[s] && a < c)
            lo_expand_any(y + (size_t)a * ldy, ldy, hb + (size_t)(a - t0) * ldh, ldh, lora[s], 0, c - a, n0 / LO_VB,
                      (n1 + LO_VB - 1) / LO_VB, n1 < N ? n1 : N);
    }
}

void ifg_lora_expand_rows(float *y, int ldy, const float *h, int ldh, int N, int K,
                          const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                          int t0, int t1, int n0, int n1) {
    float hb[LO_HB] __attribute__((aligned(64))); /* h of a run of rows, chunks summed and scaled */
    const int step = LO_HB / ldh;
    for (int ta = t0; ta < t1 && n0 < n1; ta += step) {
        const int tb = ta + step < t1 ? ta + step : t1;
        lo_sum_rows(hb, h, ldh, K, lora, seg_start, n_seg, ta, tb);
        lo_expand_rows(y, ldy, hb, ldh, N, lora, seg_start, n_seg, ta, tb, n0, n1);
    }
}

void ifg_lora_apply_part(float *y, int ldy, const float *x, int ldx, int N, int K,
                         const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                         float *h, int max_rank) {
    if (N <= 0) return;
    ifg_lora_shrink_part(h, max_rank, x, ldx, K, lora, seg_start, n_seg, NULL);
    const int nc = lo_team();
    IFG_FOR
    for (int c = 0; c < nc; c++) { /* thread c: whole 16-output blocks */
        int n0, n1;
        ifg_chunk(N, LO_VB, c, nc, &n0, &n1);
        ifg_lora_expand_rows(y, ldy, h, max_rank, N, K, lora, seg_start, n_seg, 0, seg_start[n_seg], n0, n1);
    }
}

static int lo_gcd(int a, int b) { return b ? lo_gcd(b, a % b) : a; }

/* Output rows per thread of the fused projection: whole 16-output blocks and whole row groups
 * of the base kernel. */
static int lo_row_align(int wtype) {
    const int ra = ifg_matmul_row_align(wtype);
    return ra / lo_gcd(ra, LO_VB) * LO_VB;
}

/* The expand as a GEMM epilogue (ifg_mm_epilogue): called by the x16 kernels for each group
 * pair's rows of each token tile once final, so the low-rank part goes into y while it is in
 * L1 and the Bᵀ reads interleave with the base weights' arithmetic. The summed h of the token
 * tile is kept in the thread's stack buffer across the calls of that tile. */
struct lo_epi {
    struct ifg_mm_epilogue base;
    const float *h; int ldh, N, K, n_seg;
    const struct ifg_lora *const *lora; const int32_t *seg_start;
    float *hb; int *hb_rows; /* hb_rows[0..1]: the token rows summed into hb */
};

static void lo_epi_fn(const struct ifg_mm_epilogue *b, float *y, int ldy, int t0, int t1, int n0, int n1) {
    const struct lo_epi *e = (const struct lo_epi *)b;
    if ((size_t)(t1 - t0) * e->ldh > LO_HB) { /* too many rows for the buffer: sum them per call */
        ifg_lora_expand_rows(y, ldy, e->h, e->ldh, e->N, e->K, e->lora, e->seg_start, e->n_seg, t0, t1, n0, n1);
        return;
    }
    if (e->hb_rows[0] != t0 || e->hb_rows[1] != t1) { /* a new token tile: sum its h once */
        lo_sum_rows(e->hb, e->h, e->ldh, e->K, e->lora, e->seg_start, e->n_seg, t0, t1);
        e->hb_rows[0] = t0;
        e->hb_rows[1] = t1;
    }
    lo_expand_rows(y, ldy, e->hb, e->ldh, e->N, e->lora, e->seg_start, e->n_seg, t0, t1, n0, n1);
}

void ifg_lora_matmul_part(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                          int T, int N, int K, int accumulate,
                          const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                          float *h, int max_rank, float *tmp, const struct ifg_xq *xq) {
    if (T <= 0 || N <= 0) return;
    int dora = 0;
    for (int s = 0; s < n_seg; s++) dora |= lo_rows(lora, seg_start, s) > 0 && lora[s]->dora;
    ifg_lora_shrink_part(h, max_rank, x, ldx, K, lora, seg_start, n_seg, xq);
    /* rows per thread: whole 16-output blocks and whole row groups of the base kernel */
    const int align = lo_row_align(wtype);
    const int tb = ifg_matmul_token_block(wtype), TS = tb * (LO_SLAB / tb > 1 ? LO_SLAB / tb : 1);
    const int via_tmp = accumulate && dora; /* DoRA scales the projection, not the residual */
    const int nc = lo_team();
    IFG_FOR
    for (int c = 0; c < nc; c++) {
        int r0, r1;
        ifg_chunk(N, align, c, nc, &r0, &r1);
        if (r0 >= r1) continue;
        if (ifg_is_qx16(wtype) && !via_tmp) { /* the kernel calls the expand back, tile by tile */
            /* each expand prefetches the next one's Bᵀ (LO_PF ahead); the first one's, here, arrives
             * while the GEMM computes the first rows */
            for (int s = 0; s < n_seg; s++)
                if (lo_rows(lora, seg_start, s) > 0) {
                    const struct ifg_lora *L = lora[s];
                    const char *b = (const char *)L->b + (size_t)(r0 / LO_VB) * L->rank * LO_VB * LO_ES(L->b_dtype);
                    for (int o = 0; o < LO_PF; o += 64) __builtin_prefetch(b + o, 0, LO_PFL);
                }
            float hb[LO_HB] __attribute__((aligned(64)));
            int hb_rows[2] = {-1, -1};
            const struct lo_epi e = {{lo_epi_fn}, h, max_rank, N, K, n_seg, lora, seg_start, hb, hb_rows};
            ifg_qmm_x16_rows(y, ldy, x, ldx, w, wtype, T, r0, r1, K, accumulate, &e.base, xq);
            continue;
        }
        for (int t0 = 0; t0 < T; t0 += TS) { /* token slabs: this slab of y is still in cache */
            const int t1 = t0 + TS < T ? t0 + TS : T;
            float *yo = via_tmp ? tmp : y;
            const int ldo = via_tmp ? N : ldy;
            ifg_matmul_rows(yo + (size_t)t0 * ldo, ldo, x + (size_t)t0 * ldx, ldx, w, wtype, t1 - t0, r0, r1, K,
                            via_tmp ? 0 : accumulate); /* an x16 W here (DoRA via tmp) rounds its slab of x itself */
            ifg_lora_expand_rows(yo, ldo, h, max_rank, N, K, lora, seg_start, n_seg, t0, t1, r0, r1);
            if (via_tmp)
                for (int t = t0; t < t1; t++)
                    for (int n = r0; n < r1; n++) y[(size_t)t * ldy + n] += tmp[(size_t)t * N + n];
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
        ifg_lora_matmul_part(y, ldy, x, ldx, w, wtype, T, N, K, accumulate, lora, seg_start, n_seg, h, max_rank, tmp,
                             NULL);
    }
}
