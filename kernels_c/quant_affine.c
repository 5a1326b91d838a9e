/* quant_affine.c — y (=|+=) x · Wᵀ for q4_1 / q5_1 weights (see quant_gguf.h for the math).
 *
 * Per thread (rows [r0, r1)): tokens in blocks of AF_TB; for each k-chunk of AF_KB the block's x
 * rows are quantized once (ifg_quantize_x: int8, d_x, block sums; or taken from a shared xq),
 * then row blocks of AF_NB rows × token tiles of AF_TT × row tiles of AF_NT run the micro-kernel.
 * Per 32-block, the NT rows' (d, m) halves are converted in one vcvtph2ps (lanes 2j, 2j+1 = row
 * j's d, m) and multiplied per token by (d_x, d_x * s_x) in alternating lanes: even lanes scale
 * the integer dot products, odd lanes are the min terms, summed across blocks in one vector
 * per token. The dot products of the unsigned levels with int8 x:
 *  - AVX-512 (VNNI): one vpdpbusd on 256 bits;
 *  - AVX2: vpmaddubsw (u8 levels <= 31 × s8 x: pair sums <= 2*31*127, no saturation) + vpmaddwd
 *    with ones;
 *  - scalar: plain loops.
 * Each output's summation order depends only on K (fixed chunk, block and lane order), so
 * results are bitwise identical for any thread count and tile. */
#include "quant_gguf.h"
#include "quant.h"
#include "simd.h"
#include "matmul.h"

#define AF_KB 2048 /* k chunk of x quantized at a time (multiple of 32) */
#define AF_TB 16   /* tokens quantized at a time */
#define AF_NB 64   /* rows per L2 block */

static inline size_t af_block_bytes(int wtype) { return wtype == IFG_Q4_1 ? 20u : 24u; }
static inline float af_h(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return ifg_f16_to_f32(h); }
static inline uint32_t af_qh(const uint8_t *blk) { uint32_t h; memcpy(&h, blk + 4, 4); return h; }

/* The 32 unsigned levels of block blk (element order) into u. */
static inline void af_levels_scalar(const uint8_t *blk, int wtype, uint8_t *u) {
    const uint8_t *nb = blk + af_block_bytes(wtype) - 16;
    const uint32_t qh = wtype == IFG_Q5_1 ? af_qh(blk) : 0;
    for (int j = 0; j < 16; j++) {
        u[j] = (uint8_t)((nb[j] & 0x0F) | ((qh >> j) & 1) << 4);
        u[j + 16] = (uint8_t)((nb[j] >> 4) | ((qh >> (j + 16)) & 1) << 4);
    }
}

void ifg_qg_dequant_row(float *o, const uint8_t *row, int dtype, int n) {
    if (dtype == IFG_Q6_K || dtype == IFG_Q5_K) {
        (dtype == IFG_Q6_K ? ifg_q6k_dequant_row : ifg_q5k_dequant_row)(o, row, n);
        return;
    }
    const size_t bb = af_block_bytes(dtype);
    for (int b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + (size_t)b * bb;
        const float d = af_h(blk), m = af_h(blk + 2);
        uint8_t u[32];
        af_levels_scalar(blk, dtype, u);
        for (int j = 0; j < 32; j++) {
            const float v = (float)u[j] * d; /* two roundings, as numpy's q * d + m */
            o[b * 32 + j] = v + m;
        }
    }
}

/* Quantized x of a token tile: token i's int8 at q[i*ldq + k], its block b's scale and sum at
 * d / s[i*ldd + b] (k, b relative to the chunk). */
struct af_x { const int8_t *q; const float *d; const int32_t *s; int ldq, ldd; };

#ifndef IFG_SIMD
/* ---- scalar reference ---- */
static void af_tiles(float *y, int ldy, const struct af_x *xr, const uint8_t *w, int wtype, int t, int tt,
                     int n0, int n1, int K, int k0, int k1, int add) {
    const size_t bb = af_block_bytes(wtype), rb = (size_t)(K / 32) * bb;
    for (int n = n0; n < n1; n++)
        for (int i = 0; i < tt; i++) {
            float acc = 0.0f, accm = 0.0f;
            for (int k = k0, b = 0; k < k1; k += 32, b++) {
                const uint8_t *blk = w + (size_t)n * rb + (size_t)(k / 32) * bb;
                uint8_t u[32];
                af_levels_scalar(blk, wtype, u);
                const int8_t *xq = xr->q + (size_t)i * xr->ldq + (k - k0);
                int32_t dot = 0;
                for (int j = 0; j < 32; j++) dot += (int32_t)u[j] * xq[j];
                const float dx = xr->d[i * xr->ldd + b];
                acc += (af_h(blk) * dx) * (float)dot;
                accm += af_h(blk + 2) * (dx * (float)xr->s[i * xr->ldd + b]);
            }
            float *yo = y + (size_t)(t + i) * ldy + n;
            *yo = add ? *yo + (acc + accm) : acc + accm;
        }
}
#else
/* ---- SIMD: 256-bit integer blocks, f32 accumulators ---- */
#define AF_TT 4
#if defined(IFG_AVX512)
#define AF_NT 4
#else
#define AF_NT 2
#endif

/* q5_1's qh as 32 bytes: byte j = 0x10 where bit j is set. */
IFG_AI __m256i af_high_bits(const uint8_t *blk) {
    const uint32_t qh = af_qh(blk);
#if defined(IFG_AVX512)
    return _mm256_maskz_mov_epi8((__mmask32)qh, _mm256_set1_epi8(0x10));
#else
    const __m256i by = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh),
                                           _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL); /* byte j: 1 << j%8 */
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(by, bit), bit), _mm256_set1_epi8(0x10));
#endif
}
IFG_AI __m256i af_levels(const uint8_t *blk, int wtype) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + af_block_bytes(wtype) - 16));
    const __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
    return wtype == IFG_Q5_1 ? _mm256_or_si256(v, af_high_bits(blk)) : v;
}
/* int32 lanes of sum(u * x), u unsigned levels, x int8. */
IFG_AI __m256i af_dot(__m256i u, __m256i x) {
#if defined(IFG_AVX512)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
#endif
}
IFG_AI float af_hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* TT tokens (rows i0.. of the tile's quantized x; outputs t + i0 + i) × NT rows from n. */
IFG_AI void af_tile(float *y, int ldy, const struct af_x *xr, const uint8_t *w, int wtype, size_t rb, int t,
                   int i0, int n, int k0, int k1, int add, const int TT, const int NT) {
    __m256 acc[AF_TT][AF_NT], accm[AF_TT];
    const size_t bb = af_block_bytes(wtype);
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++) {
        accm[i] = _mm256_setzero_ps();
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) acc[i][j] = _mm256_setzero_ps();
    }
    for (int k = k0, b = 0; k < k1; k += 32, b++) {
        __m256i u[AF_NT];
        uint32_t dm[4] = {0, 0, 0, 0};
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) {
            const uint8_t *blk = w + (size_t)(n + j) * rb + (size_t)(k / 32) * bb;
            u[j] = af_levels(blk, wtype);
            memcpy(&dm[j], blk, 4);
        }
        /* lanes 2j, 2j+1: row j's d, m */
        const __m256 wdm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dm));
#pragma GCC unroll 16
        for (int i = 0; i < TT; i++) {
            const int xi = (i0 + i) * xr->ldd + b;
            const float dx = xr->d[xi];
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xr->q + (size_t)(i0 + i) * xr->ldq + (k - k0)));
            /* even lanes d * d_x, odd lanes m * (d_x * s_x) */
            const __m256 sc = _mm256_mul_ps(wdm, _mm256_blend_ps(_mm256_set1_ps(dx),
                                                                 _mm256_set1_ps(dx * (float)xr->s[xi]), 0xAA));
            accm[i] = _mm256_add_ps(accm[i], sc);
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++)
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(af_dot(u[j], xv)),
                                            _mm256_permutevar8x32_ps(sc, _mm256_set1_epi32(2 * j)), acc[i][j]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++) {
        float mins[8];
        _mm256_storeu_ps(mins, accm[i]);
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) {
            float *yo = y + (size_t)(t + i0 + i) * ldy + n + j;
            const float s = af_hsum(acc[i][j]) + mins[2 * j + 1];
            *yo = add ? *yo + s : s;
        }
    }
}

#define AF_NLOOP(TTC)                                                                          \
    do {                                                                                        \
        int n_ = n0;                                                                            \
        for (; n_ + AF_NT <= n1; n_ += AF_NT)                                                   \
            af_tile(y, ldy, xr, w, wtype, rb, t, i0, n_, k0, k1, add, TTC, AF_NT);              \
        for (; n_ < n1; n_++) af_tile(y, ldy, xr, w, wtype, rb, t, i0, n_, k0, k1, add, TTC, 1); \
    } while (0)

static void af_tiles_t(float *y, int ldy, const struct af_x *xr, const uint8_t *w, int wtype, int t, int tt,
                       int n0, int n1, int K, int k0, int k1, int add) {
    const size_t rb = (size_t)(K / 32) * af_block_bytes(wtype);
    for (int i0 = 0; i0 < tt; i0 += AF_TT) {
        const int r = tt - i0;
        if (r >= 4) AF_NLOOP(4);
        else if (r == 3) AF_NLOOP(3);
        else if (r == 2) AF_NLOOP(2);
        else AF_NLOOP(1);
    }
}
static void af_tiles(float *y, int ldy, const struct af_x *xr, const uint8_t *w, int wtype, int t, int tt,
                     int n0, int n1, int K, int k0, int k1, int add) {
    /* one specialisation per weight type: the block decode is inlined */
    if (wtype == IFG_Q4_1) af_tiles_t(y, ldy, xr, w, IFG_Q4_1, t, tt, n0, n1, K, k0, k1, add);
    else af_tiles_t(y, ldy, xr, w, IFG_Q5_1, t, tt, n0, n1, K, k0, k1, add);
}
#endif

static void af_mm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                       int T, int r0, int r1, int K, int accumulate, const struct ifg_xq *xq) {
    _Alignas(64) int8_t q[AF_TB * AF_KB];
    float d[AF_TB * (AF_KB / 32)];
    int32_t s[AF_TB * (AF_KB / 32)];
    for (int t = 0; t < T; t += AF_TB) {
        const int tt = T - t < AF_TB ? T - t : AF_TB;
        for (int k0 = 0; k0 < K; k0 += AF_KB) { /* the same chunks with or without xq: the same sums */
            const int k1 = k0 + AF_KB < K ? k0 + AF_KB : K, add = accumulate || k0 > 0;
            struct af_x xr = {q, d, s, AF_KB, AF_KB / 32};
            if (xq) {
                const size_t b0 = (size_t)t * xq->ldd + (size_t)(k0 / 32);
                xr = (struct af_x){xq->q + (size_t)t * xq->ldq + k0, xq->d + b0, xq->s + b0, xq->ldq, xq->ldd};
            } else {
                ifg_quantize_x(q, d, s, x, ldx, t, tt, k0, k1, AF_KB, AF_KB / 32);
            }
            for (int n0 = r0; n0 < r1; n0 += AF_NB)
                af_tiles(y, ldy, &xr, (const uint8_t *)w, wtype, t, tt, n0, n0 + AF_NB < r1 ? n0 + AF_NB : r1,
                         K, k0, k1, add);
        }
    }
}

/* The one entry of every quant_gguf.h type (q6_k's kernel is in quant_q6k.c, q5_k's in
 * quant_q5k.c, q4_1x16's and q5_1x16's with the other 16-row int8 layouts in quant_x16.c). */
void ifg_qg_mm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                    int T, int r0, int r1, int K, int accumulate, const struct ifg_xq *xq) {
    if (wtype == IFG_Q6_K) ifg_q6k_mm_rows(y, ldy, x, ldx, w, T, r0, r1, K, accumulate);
    else if (wtype == IFG_Q5_K) ifg_q5k_mm_rows(y, ldy, x, ldx, w, T, r0, r1, K, accumulate);
    else if (wtype == IFG_Q4_1X16 || wtype == IFG_Q5_1X16) ifg_qmm_x16_rows(y, ldy, x, ldx, w, wtype, T, r0, r1, K, accumulate, NULL, xq);
    else if (wtype == IFG_Q6_KX16) ifg_q6k_mm_x16_rows(y, ldy, x, ldx, w, T, r0, r1, K, accumulate, xq);
    else if (wtype == IFG_Q5_KX16) ifg_q5k_mm_x16_rows(y, ldy, x, ldx, w, T, r0, r1, K, accumulate, xq);
    else af_mm_rows(y, ldy, x, ldx, w, wtype, T, r0, r1, K, accumulate, xq);
}

void ifg_matmul_xq(float *y, int ldy, const float *x, int ldx, const void *w, int wtype, int T, int N, int K,
                   int accumulate, const struct ifg_xq *xq, int n_threads) {
    IFG_PARALLEL(n_threads) { ifg_matmul_part_xq(y, ldy, x, ldx, w, wtype, T, N, K, accumulate, xq); }
}
