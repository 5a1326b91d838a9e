/* lora_tiles.c — the tile kernels of the LoRA shrink (x·Aᵀ) and expand (h·Bᵀ), float and int8
 * (bf16 dot products: lora_tiles_bf16.h);
 * lora.c schedules them over threads and fuses them with the base projection.
 *
 * Shrink: A is stored transposed ([K][rank]), so one k's rank values are one vector: the tile
 * broadcasts x[t][k] and multiply-adds it into a vector of ranks per token, with no horizontal
 * sums, one A load and conversion shared by LO_ST tokens (an int8 A: integer dot products with x
 * rounded to int8, 4 k per instruction, lo_shrink8_tile; a decode step's adapter cost is
 * arithmetic, not bytes: with every layer's adapters cache-hot it was the same).
 * Expand: one 16-output block's outputs are a sum of rank broadcast-multiplies of 16-value rows
 * of packed Bᵀ; register tiles of LO_ET tokens × LO_EB blocks, whose weights are one contiguous
 * run of memory.
 *
 * Weights are converted in registers (bf16: shift; int8: sign-extend + convert). A prefill
 * segment uses each Bᵀ weight for hundreds of rows, so there a run of Bᵀ is converted to f32
 * once into a stack buffer that every token tile reads (LO_CONV_ROWS rows and up); the values
 * and the order of the sums are the same either way.
 * bf16_dp adapters (bf16 weights whose activations are rounded to bf16, the model's bf16_act as
 * for bf16 matrices: matmul.h's IFG_BF16_DP) go as bf16 dot products instead
 * (lo_shrinkbf_tile, lo_expandbf_tile): their A and Bᵀ hold pairs of k / ranks side by side
 * (lora.h), x is rounded to bf16 once per shrink unit and h once per row after its sum, and one
 * AVX-512 BF16 vdpbf16ps does 32 multiply-adds where the f32 FMA on converted weights did 16.
 * vdpbf16ps adds a lane's two exact products to it one at a time, the odd (upper) one first,
 * each sum rounded to nearest even (measured on this machine); AVX2 and the scalar reference do
 * exactly that with two FMAs, so the arithmetic is the same on every ISA (but for subnormals,
 * which vdpbf16ps flushes to zero).
 * Every output's summation order depends only on K and the rank: never on the thread, nor on
 * the rows beside it in its segment or batch. */
#include "lora_tiles.h"
#include "matmul.h"
#include "quant.h"
#include "simd.h"

#define LO_CONV_ROWS 8 /* segment rows from which an expand converts each Bᵀ run once */
#define LO_RMAX 128    /* largest rank whose Bᵀ runs are converted */

#ifndef IFG_SIMD
/* ---- scalar reference (the scalar build) ---------------------------------------------------- */
static inline float lo_hs(const struct ifg_lora *L, int i) { return L->h_scale ? L->h_scale[i] : 1.0f; }
/* hp[t][i] = Σ_{k0 <= k < k1} x[t][k] A[k][i] for rows [t0, t1). */
static void lo_shrink_ref(float *hp, int ldh, const float *x, int ldx, const struct ifg_lora *L,
                          int t0, int t1, int k0, int k1) {
    for (int t = t0; t < t1; t++)
        for (int i = 0; i < L->rank; i++) {
            float acc = 0.0f;
            for (int k = k0; k < k1; k++) acc += x[(size_t)t * ldx + k] * ifg_load_f32(L->a, L->a_dtype, (size_t)k * L->rank + i);
            hp[(size_t)t * ldh + i] = acc;
        }
}

/* int8 A: hp[t][i] = Σ_b d_t,b · Σ_{k in block b} q_t[k] A[k][i] for rows [t0, t1) and the
 * blocks of [k0, k1) in order, each added with one multiply-add (fmaf: the SIMD paths' fma, so
 * every ISA gets the same bits). A packed as lora.h says (bytes a + 128, 4 k of a rank in 4
 * bytes), zero past K, as q is past k1. */
static void lo_shrink8_ref(float *hp, int ldh, const struct ifg_lora_xr *xr, const struct ifg_lora *L,
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
                       ifg_load_f32(L->b, L->b_dtype, ((size_t)(n / LO_VB) * L->rank + i) * LO_VB + n % LO_VB);
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


#define lo_shrink lo_shrink_ref
#define lo_shrink8 lo_shrink8_ref
#define lo_sum lo_sum_ref
#define lo_expand lo_expand_ref
#define lo_expand8 lo_expand8_ref
#else
/* ---- SIMD (simd.h's vocabulary): written once for AVX2 and AVX-512; per-ISA tile sizes ---- */
#if defined(IFG_AVX512)
#define LO_RV 4 /* shrink: rank vectors per tile (tokens per tile: LO_ST) */
#define LO_ET 4 /* expand tile: 4 tokens × 4 blocks (4 vectors) = 16 accumulators */
#define LO_EB 4
#else /* AVX2 */
#define LO_RV 2
#define LO_ET 2 /* 2 tokens × 2 blocks (4 vectors) = 8 accumulators + 4 weights + 1 h */
#define LO_EB 2
#endif
/* r float weights (f32 / bf16) w[i..i+r) as f32, the rest zero, nothing beyond read (0 < r <= IFG_VW). */
IFG_AI ifg_vf lo_ldw_n(const void *w, int dtype, size_t i, int r) {
    return r == IFG_VW ? ifg_vload_w(w, dtype, i) : ifg_vload_w_n(w, dtype, i, r);
}
#define LO_VPB (LO_VB / IFG_VW) /* vectors per packed 16-value run */

/* Prefetch the cache lines of `bytes` bytes (a compile-time constant) LO_PF ahead of p. */
IFG_AI void lo_pf(const void *p, const int bytes) {
#pragma GCC unroll 4
    for (int o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)p + LO_PF + o, 0, LO_PFL);
}

/* Every kernel below takes its weight dtype DT as a compile-time constant (the wrappers switch
 * on it once per call), so the inner loops carry no dtype dispatch. */

/* Shrink tile: TT tokens from t × RV rank vectors from rank i0 (the last holding rl <= W ranks),
 * over k in [k0, k1): per k one A load per rank vector, TT broadcasts of x, TT·RV FMAs. A
 * decode tile of one or two tokens has too few independent FMA chains to hide the FMA latency
 * (it ran at one k per 4 cycles), so KU interleaved sets of accumulators take k, k+1, ... in
 * turn and are added at the end. KU depends on RV alone (the adapter's rank), never on TT: a
 * row's sums are then the same whatever the number of rows in its segment, as speculative
 * verification and batching need; the token tiles are sized so that KU·TT·RV accumulators fit
 * in the registers (LO_ST). */
#if defined(IFG_AVX512)
#define LO_KU(RV) ((RV) <= 2 ? 4 : 2)
#else
#define LO_KU(RV) ((RV) == 1 ? 4 : 2)
#endif
IFG_AI void lo_shrink_tile(float *hp, int ldh, const float *x, int ldx, const void *a, int R,
                          int k0, int k1, int t, int i0, int rl, const int TT, const int RV, const int DT,
                          const int FULL) {
    const int KU = LO_KU(RV);
    const size_t rs = (size_t)R * LO_ES(DT); /* bytes per k of A */
    const char *ap = (const char *)a + ((size_t)k0 * R + i0) * LO_ES(DT);
    const float *xr = x + (size_t)t * ldx + k0;
    ifg_vf acc[4][6][LO_RV];
#pragma GCC unroll 4
    for (int u = 0; u < KU; u++)
#pragma GCC unroll 12
        for (int i = 0; i < TT; i++)
#pragma GCC unroll 4
            for (int j = 0; j < RV; j++) acc[u][i][j] = ifg_vzero();
    /* one k: RV weight vectors (FULL: the last one has IFG_VW ranks too, no mask), TT broadcasts */
#define LO_SHRINK_K(u)                                                                                       \
    do {                                                                                                     \
        const char *aw = ap + (size_t)(u) * rs;                                                              \
        ifg_vf w[LO_RV];                                                                                       \
        _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++)                                                 \
            w[j] = lo_ldw_n(aw, DT, (size_t)j * IFG_VW, FULL || j < RV - 1 ? IFG_VW : rl);                       \
        _Pragma("GCC unroll 12") for (int i = 0; i < TT; i++) {                                              \
            const ifg_vf xb = ifg_vset1(xr[(size_t)i * ldx + (u)]);                                              \
            _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) acc[u][i][j] = ifg_vfma(xb, w[j], acc[u][i][j]); \
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
            ifg_vf v = acc[0][i][j];
            if (KU == 2) v = ifg_vadd(v, acc[1][i][j]);
            if (KU == 4) v = ifg_vadd(ifg_vadd(v, acc[1][i][j]), ifg_vadd(acc[2][i][j], acc[3][i][j]));
            float *o = hp + (size_t)(t + i) * ldh + i0 + j * IFG_VW;
            if (!FULL && j == RV - 1) ifg_vstore_n(o, v, rl); else ifg_vstore(o, v);
        }
}

/* Tokens per shrink tile for RV rank vectors: LO_KU(RV)·TT·RV accumulators, as many as the
 * registers allow (24 of 32 / 12 of 16). */
#if defined(IFG_AVX512)
#define LO_ST(RV) ((RV) == 1 ? 6 : (RV) == 2 ? 3 : (RV) == 3 ? 4 : 3)
#else
#define LO_ST(RV) 3
#endif

/* Rows [t0, t1) × RV rank vectors from i0: full tiles, then the remainder in tiles of 8/4/2/1. */
IFG_AI void lo_shrink_rows_f(float *hp, int ldh, const float *x, int ldx, const void *a, int R, int k0, int k1,
                            int t0, int t1, int i0, int rl, const int RV, const int DT, const int FULL) {
    int t = t0;
    for (; t + LO_ST(RV) <= t1; t += LO_ST(RV)) lo_shrink_tile(hp, ldh, x, ldx, a, R, k0, k1, t, i0, rl, LO_ST(RV), RV, DT, FULL);
    if (LO_ST(RV) > 8 && t + 8 <= t1) { lo_shrink_tile(hp, ldh, x, ldx, a, R, k0, k1, t, i0, rl, 8, RV, DT, FULL); t += 8; }
    if (LO_ST(RV) > 4 && t + 4 <= t1) { lo_shrink_tile(hp, ldh, x, ldx, a, R, k0, k1, t, i0, rl, 4, RV, DT, FULL); t += 4; }
    if (LO_ST(RV) > 2 && t + 2 <= t1) { lo_shrink_tile(hp, ldh, x, ldx, a, R, k0, k1, t, i0, rl, 2, RV, DT, FULL); t += 2; }
    for (; t < t1; t++) lo_shrink_tile(hp, ldh, x, ldx, a, R, k0, k1, t, i0, rl, 1, RV, DT, FULL);
}
IFG_AI void lo_shrink_rows(float *hp, int ldh, const float *x, int ldx, const void *a, int R, int k0, int k1,
                          int t0, int t1, int i0, int rl, const int RV, const int DT) {
    if (rl == IFG_VW) lo_shrink_rows_f(hp, ldh, x, ldx, a, R, k0, k1, t0, t1, i0, rl, RV, DT, 1);
    else lo_shrink_rows_f(hp, ldh, x, ldx, a, R, k0, k1, t0, t1, i0, rl, RV, DT, 0);
}

/* The rank block from rank i0 of R (blocks of up to LO_RV vectors): its vector count, and in *rl
 * the ranks its last vector holds. */
static inline int lo_rank_block(int R, int i0, int *rl) {
    const int left = R - i0 < LO_RV * IFG_VW ? R - i0 : LO_RV * IFG_VW, nv = (left + IFG_VW - 1) / IFG_VW;
    *rl = left - (nv - 1) * IFG_VW;
    return nv;
}

IFG_AI void lo_shrink_dt(float *hp, int ldh, const float *x, int ldx, const struct ifg_lora *L,
                        int t0, int t1, int k0, int k1, const int DT) {
    const int R = L->rank;
    for (int i0 = 0; i0 < R; i0 += LO_RV * IFG_VW) {
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
    else lo_shrink_dt(hp, ldh, x, ldx, L, t0, t1, k0, k1, IFG_F32); /* bf16_dp: lo_shrinkbf */
}

static void lo_sum(float *hb, int ldb, const float *hp, int ldh, int nkc, size_t ttot, const struct ifg_lora *L,
                   int t0, int t1) {
    const int R = L->rank;
    for (int t = t0; t < t1; t++)
        for (int i = 0; i < R; i += IFG_VW) {
            const int r = R - i < IFG_VW ? R - i : IFG_VW;
            ifg_vf s = ifg_vzero();
            for (int c = 0; c < nkc; c++) s = ifg_vadd(s, ifg_vload_n(hp + ((size_t)c * ttot + t) * ldh + i, r));
            const ifg_vf hs = L->h_scale ? ifg_vload_n(L->h_scale + i, r) : ifg_vset1(1.0f);
            ifg_vstore_n(hb + (size_t)(t - t0) * ldb + i, ifg_vmul(s, hs), r);
        }
}

/* dst[0..n) = the n packed weights at src as f32 (n a multiple of 16). */
IFG_AI void lo_cvt_run(float *dst, const void *src, size_t n, const int DT) {
    for (size_t i = 0; i < n; i += IFG_VW) ifg_vstore(dst + i, ifg_vload_w(src, DT, i));
}

/* The expands' output runs: r <= IFG_VW floats at p (fewer: the last run, masked at N). */
IFG_AI ifg_vf lo_ld_out(const float *p, int r) { return r == IFG_VW ? ifg_vload(p) : ifg_vload_n(p, r); }
/* y's run = v, times DoRA's factor d (lo_ld_out of L->dora) when the adapter has one. */
IFG_AI void lo_st_out(float *p, ifg_vf v, const struct ifg_lora *L, ifg_vf d, int r) {
    if (L->dora) v = ifg_vmul(v, d);
    if (r == IFG_VW) ifg_vstore(p, v); else ifg_vstore_n(p, v, r);
}

/* Expand tile: ET tokens from t × EB 16-blocks from nb, whose weights are the contiguous run at
 * w (weight (i, e-th block's output o) at (e*R + i)*16 + o; pf: prefetch it, it streams from
 * memory). Per rank step: EB·VPB weight vectors, ET broadcasts of h, ET·EB·VPB FMAs. */
IFG_AI void lo_expand_tile(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L, int N,
                          const void *w, int pf, int t, int nb, const int ET, const int EB, const int DT) {
    enum { NV = LO_EB * LO_VPB };
    ifg_vf acc[LO_ET][NV];
    const int R = L->rank;
#pragma GCC unroll 8
    for (int a = 0; a < ET; a++)
#pragma GCC unroll 16
        for (int j = 0; j < EB * LO_VPB; j++) acc[a][j] = ifg_vzero();
    for (int i = 0; i < R; i++) {
        ifg_vf wv[NV];
        if (pf) lo_pf((const char *)w + (size_t)i * EB * LO_VB * LO_ES(DT), EB * LO_VB * LO_ES(DT));
#pragma GCC unroll 8
        for (int e = 0; e < EB; e++)
#pragma GCC unroll 2
            for (int q = 0; q < LO_VPB; q++)
                wv[e * LO_VPB + q] = ifg_vload_w(w, DT, ((size_t)e * R + i) * LO_VB + q * IFG_VW);
#pragma GCC unroll 8
        for (int a = 0; a < ET; a++) {
            const ifg_vf hv = ifg_vset1(h[(size_t)(t + a) * ldh + i]);
#pragma GCC unroll 16
            for (int j = 0; j < EB * LO_VPB; j++) acc[a][j] = ifg_vfma(hv, wv[j], acc[a][j]);
        }
    }
#pragma GCC unroll 16
    for (int j = 0; j < EB * LO_VPB; j++) {
        const int n = nb * LO_VB + j * IFG_VW, r = N - n < IFG_VW ? N - n : IFG_VW;
        if (r <= 0) break; /* padding past N */
        const ifg_vf d = L->dora ? lo_ld_out(L->dora + n, r) : ifg_vzero();
#pragma GCC unroll 8
        for (int a = 0; a < ET; a++) {
            float *yo = y + (size_t)(t + a) * ldy + n;
            lo_st_out(yo, ifg_vadd(lo_ld_out(yo, r), acc[a][j]), L, d, r);
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

IFG_AI void lo_expand_dt(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L,
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
    default: lo_expand_dt(y, ldy, h, ldh, L, t0, t1, nb0, nb1, N, IFG_F32); break; /* bf16_dp: lo_expandbf */
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
typedef __m512i lo_w8;
IFG_AI lo_w8 lo_ld8(const uint8_t *p, int r) { /* r <= IFG_VW lanes of 4 bytes */
    return r == IFG_VW ? _mm512_loadu_si512((const void *)p) : _mm512_maskz_loadu_epi32(ifg_vmask(r), p);
}
IFG_AI ifg_vi lo_dot8(ifg_vi acc, lo_w8 w, ifg_vi x4) { return _mm512_dpbusd_epi32(acc, w, x4); }
IFG_AI ifg_vi lo_start8(int32_t corr) { return _mm512_set1_epi32(corr); }
#else
#define LO_ET8 4
#define LO_EB8 1
#define LO_EB8W 1
typedef struct { __m256i aw, ws; } lo_w8; /* |w| and w, signed */
IFG_AI lo_w8 lo_ld8(const uint8_t *p, int r) {
    const __m256i raw = r == IFG_VW ? _mm256_loadu_si256((const __m256i *)p)
                                    : _mm256_maskload_epi32((const int *)p, ifg_vmask(r));
    lo_w8 w;
    w.ws = _mm256_xor_si256(raw, _mm256_set1_epi8((char)0x80));
    w.aw = _mm256_abs_epi8(w.ws);
    return w;
}
IFG_AI ifg_vi lo_dot8(ifg_vi acc, lo_w8 w, ifg_vi x4) { /* |pair| <= 2 · 127² */
    return _mm256_add_epi32(acc, ifg_dot_s8(w.aw, w.ws, x4));
}
IFG_AI ifg_vi lo_start8(int32_t corr) { (void)corr; return _mm256_setzero_si256(); }
#endif
/* Expand tile: ET rows from t × EB 16-blocks from nb, their Bᵀ8 the run at w (block e's rank
 * quad q at (e · rank/4 + q) · 64 bytes). h rows as lo_quant_h leaves them. */
IFG_AI void lo_expand8_tile(float *y, int ldy, const float *hb, int ldh, const struct ifg_lora *L, int N,
                           const uint8_t *w, int t, int nb, const int ET, const int EB, const int R4C) {
    enum { NV = LO_EB8W * LO_VPB };
    const int R4 = R4C ? R4C : L->rank / 4; /* R4C: the rank quads as a constant (0: L's) */
    ifg_vi acc[LO_ET8][NV];
#pragma GCC unroll 8
    for (int a = 0; a < ET; a++) {
        int32_t corr;
        memcpy(&corr, hb + (size_t)(t + a) * ldh + R4 + 1, 4);
        const ifg_vi c0 = lo_start8(corr);
#pragma GCC unroll 8
        for (int j = 0; j < EB * LO_VPB; j++) acc[a][j] = c0;
    }
#pragma GCC unroll 8
    for (int q = 0; q < R4; q++) {
        lo_w8 wv[NV];
#pragma GCC unroll 8
        for (int e = 0; e < EB; e++) {
            const uint8_t *we = w + ((size_t)e * R4 + q) * 64;
            __builtin_prefetch(we + LO_PF, 0, LO_PFL);
#pragma GCC unroll 2
            for (int v = 0; v < LO_VPB; v++) wv[e * LO_VPB + v] = lo_ld8(we + v * IFG_VW * 4, IFG_VW);
        }
#pragma GCC unroll 8
        for (int a = 0; a < ET; a++) {
            const ifg_vi hv = ifg_viset1(ifg_x4((const int8_t *)(hb + (size_t)(t + a) * ldh) + 4 * q));
#pragma GCC unroll 8
            for (int j = 0; j < EB * LO_VPB; j++) acc[a][j] = lo_dot8(acc[a][j], wv[j], hv);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < EB * LO_VPB; j++) {
        const int n = nb * LO_VB + j * IFG_VW, r = N - n < IFG_VW ? N - n : IFG_VW;
        if (r <= 0) break; /* padding past N */
        const ifg_vf d = L->dora ? lo_ld_out(L->dora + n, r) : ifg_vzero();
#pragma GCC unroll 8
        for (int a = 0; a < ET; a++) {
            float *yo = y + (size_t)(t + a) * ldy + n;
            const ifg_vf dh = ifg_vset1(hb[(size_t)(t + a) * ldh + R4]);
            lo_st_out(yo, ifg_vfma(ifg_vcvt(acc[a][j]), dh, lo_ld_out(yo, r)), L, d, r);
        }
    }
}

/* Rows [t0, t1) × 16-blocks [nb0, nb1) of an expand, tiled: TILE(..., b + nb * blk, t, nb, ET, EB, C)
 * is the register tile of ET rows × EB blocks (C its rank constant). A decode segment (a row or
 * two) goes LO_EB8W blocks at a time: as many accumulators as a full tile has. */
#define LO_EXPAND_WALK(TILE, b, blk, C)                                                                  \
    do {                                                                                                \
        int nb = nb0;                                                                                   \
        if (t1 - t0 <= 2) {                                                                             \
            for (; nb < nb1; nb += nb + LO_EB8W <= nb1 ? LO_EB8W : 1) {                                 \
                if (nb + LO_EB8W <= nb1) {                                                              \
                    if (t1 - t0 == 2) TILE(y, ldy, hb, ldh, L, N, (b) + nb * (blk), t0, nb, 2, LO_EB8W, C); \
                    else TILE(y, ldy, hb, ldh, L, N, (b) + nb * (blk), t0, nb, 1, LO_EB8W, C);          \
                } else if (t1 - t0 == 2) TILE(y, ldy, hb, ldh, L, N, (b) + nb * (blk), t0, nb, 2, 1, C); \
                else TILE(y, ldy, hb, ldh, L, N, (b) + nb * (blk), t0, nb, 1, 1, C);                    \
            }                                                                                           \
            break;                                                                                      \
        }                                                                                               \
        for (; nb < nb1; nb += nb + LO_EB8 <= nb1 ? LO_EB8 : 1) {                                       \
            const int full = nb + LO_EB8 <= nb1;                                                        \
            int t = t0;                                                                                 \
            for (; t + LO_ET8 <= t1; t += LO_ET8)                                                       \
                if (full) TILE(y, ldy, hb, ldh, L, N, (b) + nb * (blk), t, nb, LO_ET8, LO_EB8, C);      \
                else TILE(y, ldy, hb, ldh, L, N, (b) + nb * (blk), t, nb, LO_ET8, 1, C);                \
            if (LO_ET8 > 2 && t + 2 <= t1) {                                                            \
                if (full) TILE(y, ldy, hb, ldh, L, N, (b) + nb * (blk), t, nb, 2, LO_EB8, C);           \
                else TILE(y, ldy, hb, ldh, L, N, (b) + nb * (blk), t, nb, 2, 1, C);                     \
                t += 2;                                                                                 \
            }                                                                                           \
            for (; t < t1; t++)                                                                         \
                if (full) TILE(y, ldy, hb, ldh, L, N, (b) + nb * (blk), t, nb, 1, LO_EB8, C);           \
                else TILE(y, ldy, hb, ldh, L, N, (b) + nb * (blk), t, nb, 1, 1, C);                     \
        }                                                                                               \
    } while (0)

/* R4C as lo_expand8_tile takes it. */
IFG_AI void lo_expand8_r(float *y, int ldy, const float *hb, int ldh, const struct ifg_lora *L,
                        int t0, int t1, int nb0, int nb1, int N, const int R4C) {
    LO_EXPAND_WALK(lo_expand8_tile, (const uint8_t *)L->b, (size_t)L->rank * LO_VB, R4C); /* bytes per 16-block */
}

static void lo_expand8(float *y, int ldy, const float *hb, int ldh, const struct ifg_lora *L,
                       int t0, int t1, int nb0, int nb1, int N) {
    /* the common ranks with their loop over rank quads unrolled: rolled (rank 32 read from L)
     * it moved the accumulators between registers every quad, 12-15 % of the expand */
    if (L->rank == 16) lo_expand8_r(y, ldy, hb, ldh, L, t0, t1, nb0, nb1, N, 4);
    else if (L->rank == 32) lo_expand8_r(y, ldy, hb, ldh, L, t0, t1, nb0, nb1, N, 8);
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
IFG_AI void lo_shrink8_tile(float *hp, int ldh, const struct ifg_lora_xr *xr, int ti, const uint8_t *a, int R, int nb,
                           int t, int i0, int rl, const int TT, const int RV, const int FULL) {
    ifg_vf acc[LO_ST8(1)][LO_RV];
#pragma GCC unroll 12
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 4
        for (int j = 0; j < RV; j++) acc[i][j] = ifg_vzero();
    const int8_t *q = xr->q + (size_t)ti * xr->ldq;
    const float *d = xr->d + (size_t)ti * xr->ldd;
    const int32_t *s = xr->s + (size_t)ti * xr->ldd;
    /* few accumulators (a decode segment's 2 rows): KU sets take the k-quads in turn, so that
     * more dot-product chains run at once (integer sums: the order does not change them) */
    const int KU = TT * RV >= 4 ? 1 : TT * RV >= 2 ? 2 : 4;
    for (int b = 0; b < nb; b++) {
        ifg_vi ia[4][LO_ST8(1)][LO_RV];
#pragma GCC unroll 12
        for (int i = 0; i < TT; i++) {
            const ifg_vi c0 = lo_start8(-128 * s[(size_t)i * xr->ldd + b]);
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
                const uint8_t *p = ab + ((size_t)c * R + j * IFG_VW) * 4;
                __builtin_prefetch(p + LO_PF, 0, LO_PFL);
                w[j] = lo_ld8(p, FULL || j < RV - 1 ? IFG_VW : rl);
            }
#pragma GCC unroll 12
            for (int i = 0; i < TT; i++) {
                const ifg_vi x4 = ifg_viset1(ifg_x4(q + (size_t)i * xr->ldq + b * IFG_QK + 4 * c));
#pragma GCC unroll 4
                for (int j = 0; j < RV; j++) ia[c % KU][i][j] = lo_dot8(ia[c % KU][i][j], w[j], x4);
            }
        }
#pragma GCC unroll 12
        for (int i = 0; i < TT; i++) {
            const ifg_vf dv = ifg_vset1(d[(size_t)i * xr->ldd + b]);
#pragma GCC unroll 4
            for (int j = 0; j < RV; j++) {
                ifg_vi v = ia[0][i][j];
#pragma GCC unroll 4
                for (int u = 1; u < KU; u++) v = ifg_viadd(v, ia[u][i][j]);
                acc[i][j] = ifg_vfma(ifg_vcvt(v), dv, acc[i][j]);
            }
        }
    }
#pragma GCC unroll 12
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 4
        for (int j = 0; j < RV; j++) {
            float *o = hp + (size_t)(t + i) * ldh + i0 + j * IFG_VW;
            if (!FULL && j == RV - 1) ifg_vstore_n(o, acc[i][j], rl); else ifg_vstore(o, acc[i][j]);
        }
}

/* Rows [t0, t1) × RV rank vectors from i0: full tiles, then the remainder in tiles of 8/4/2/1. */
IFG_AI void lo_shrink8_rows_f(float *hp, int ldh, const struct ifg_lora_xr *xr, const uint8_t *a, int R, int nb,
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
IFG_AI void lo_shrink8_rows(float *hp, int ldh, const struct ifg_lora_xr *xr, const uint8_t *a, int R, int nb,
                           int t0, int t1, int i0, int rl, const int RV) {
    if (rl == IFG_VW) lo_shrink8_rows_f(hp, ldh, xr, a, R, nb, t0, t1, i0, rl, RV, 1);
    else lo_shrink8_rows_f(hp, ldh, xr, a, R, nb, t0, t1, i0, rl, RV, 0);
}

static void lo_shrink8(float *hp, int ldh, const struct ifg_lora_xr *xr, const struct ifg_lora *L,
                       int t0, int t1, int k0, int k1) {
    const int R = L->rank, nb = (k1 - k0 + IFG_QK - 1) / IFG_QK;
    const uint8_t *a = (const uint8_t *)L->a + (size_t)k0 * R;
    for (int i0 = 0; i0 < R; i0 += LO_RV * IFG_VW) {
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

#endif

#include "lora_tiles_bf16.h" /* the bf16_dp tiles, on the helpers above */

#define LO_XRB 32 /* rows of x rounded at once for a bf16 shrink */
void ifg_lora_tile_shrink(float *hp, int ldh, const float *x, int ldx, const struct ifg_lora *L,
                          int t0, int t1, int k0, int k1) {
    if (L->a_dtype != IFG_BF16_DP) {
        lo_shrink(hp, ldh, x, ldx, L, t0, t1, k0, k1);
        return;
    }
    _Alignas(64) lo_xb xb[LO_XRB * LO_KC];
    for (int ta = t0; ta < t1; ta += LO_XRB) { /* each row's x rounded once, then every rank */
        const int tb = ta + LO_XRB < t1 ? ta + LO_XRB : t1;
        lo_round_xbf(xb, LO_KC, x, ldx, ta, tb, k0, k1);
        lo_shrinkbf(hp, ldh, xb, LO_KC, L, ta, tb, k0, k1);
    }
}
void ifg_lora_tile_shrink8(float *hp, int ldh, const struct ifg_lora_xr *xr, const struct ifg_lora *L,
                           int t0, int t1, int k0, int k1) {
    lo_shrink8(hp, ldh, xr, L, t0, t1, k0, k1);
}
void ifg_lora_tile_sum(float *hb, int ldb, const float *hp, int ldh, int nkc, size_t ttot,
                       const struct ifg_lora *L, int t0, int t1) {
    lo_sum(hb, ldb, hp, ldh, nkc, ttot, L, t0, t1);
}

/* ---- int8 adapters: h rounded to int8 for the integer expand ------------------------------ */
/* A row of summed, scaled h (R floats) rounded in place to what the int8 expand reads: bytes
 * [0, R) the int8 values, float R/4 the scale d = max|h| / 127, int32 R/4 + 1 the offset term
 * -128 · Σ q (every value read before its bytes are written; R/4 + 2 <= R for R >= 4). The
 * rounding is roundf's (ifg_round_i32 in SIMD builds: a libm call per value cost a decode step
 * 1 µs per projection). */
void ifg_lora_tile_quant_h(float *row, int R) {
    float amax = 0.0f;
    for (int i = 0; i < R; i++) {
        const float a = fabsf(row[i]);
        amax = a > amax ? a : amax;
    }
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    int8_t *q = (int8_t *)row;
    int32_t sum = 0;
#ifdef IFG_SIMD
    for (int i = 0; i < R; i += IFG_VW) { /* bytes [i, i + IFG_VW) overlap only floats already read */
        const int r = R - i < IFG_VW ? R - i : IFG_VW;
        int32_t v[IFG_VW];
        ifg_vistore(v, ifg_round_i32(ifg_vmul(ifg_vload_n(row + i, r), ifg_vset1(id))));
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

/* ---- bf16_dp adapters: h rounded to bf16 for the bf16 dot products ------------------------ */
/* A row of summed, scaled h (R floats) rounded in place to bf16, nearest even, as the bf16
 * expand reads it (lo_xb: AVX-512 the bits in bytes [0, 2R), each written after its float was
 * read; else the rounded values as f32). */
void ifg_lora_tile_round_h(float *row, int R) {
#if defined(IFG_AVX512)
    for (int i = 0; i < R; i += IFG_VW) {
        const int r = R - i < IFG_VW ? R - i : IFG_VW;
        const __m256i b = (__m256i)_mm512_cvtneps_pbh(ifg_vload_n(row + i, r));
        _mm256_mask_storeu_epi16((uint16_t *)row + i, ifg_vmask(r), b);
    }
#elif defined(IFG_AVX2)
    for (int i = 0; i < R; i += IFG_VW) {
        const int r = R - i < IFG_VW ? R - i : IFG_VW;
        ifg_vstore_n(row + i, ifg_vround_bf16(ifg_vload_n(row + i, r)), r);
    }
#else
    for (int i = 0; i < R; i++) row[i] = ifg_bf16_to_f32(ifg_f32_to_bf16(row[i]));
#endif
}

/* The expand of any adapter: int8 ones through the integer kernel, bf16_dp ones the bf16 one. */
void ifg_lora_tile_expand(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L,
                          int t0, int t1, int nb0, int nb1, int N) {
    if (L->b_dtype == IFG_LORA_I8) lo_expand8(y, ldy, h, ldh, L, t0, t1, nb0, nb1, N);
    else if (L->b_dtype == IFG_BF16_DP) lo_expandbf(y, ldy, h, ldh, L, t0, t1, nb0, nb1, N);
    else lo_expand(y, ldy, h, ldh, L, t0, t1, nb0, nb1, N);
}

