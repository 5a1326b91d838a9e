/* quant_q5k.c — y (=|+=) x · Wᵀ for q5_k weights (see quant_gguf.h for the math, infeng/quant/q5_k.py
 * for the layout).
 *
 * Per thread (rows [r0, r1)): tokens in blocks of Q5_TB; for each k-chunk of Q5_KB the block's x
 * rows are quantized once (ifg_quantize_x: int8, d_x, block sums), then row blocks of Q5_NB rows ×
 * token tiles of Q5_TT × row tiles of Q5_NT run the micro-kernel: per super-block and row the 6-bit
 * scales and mins become two 8-lane f32 vectors d * sc and dmin * m; per token the min term is one
 * 8-lane FMA against d_x * s_x of the super-block's 8 x blocks; per 32-block c the 32 levels are
 * put together from a nibble run and bit c of qh (shifts, masks, an or), one integer dot (AVX-512
 * VNNI: vpdpbusd; AVX2: vpmaddubsw, levels <= 31, + vpmaddwd with ones) gives 8 lanes, converted
 * and FMA'd with (d * sc[c]) * d_x. Scalar: plain loops.
 * Each output's summation order depends only on K: bitwise the same for any thread count. */
#include "quant_gguf.h"
#include "quant.h"
#include "simd.h"

#define Q5_KB 2048 /* k chunk of x quantized at a time (multiple of 256) */
#define Q5_TB 16   /* tokens quantized at a time */
#define Q5_NB 64   /* rows per L2 block */
#define Q5_NBK (Q5_KB / 32)

static inline float q5_h(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return ifg_f16_to_f32(h); }

/* The 12 scale bytes → 8 scales and 8 mins (6 bits each; q4_k's packing). */
static inline void q5_scales(const uint8_t *s, uint8_t *sc, uint8_t *m) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t)((s[j + 8] & 15) | (s[j] >> 6) << 4);
        m[j + 4] = (uint8_t)((s[j + 8] >> 4) | (s[j + 4] >> 6) << 4);
    }
}
/* The 256 levels (0..31) of a block in element order. */
static inline void q5_levels_scalar(const uint8_t *blk, uint8_t *u) {
    for (int j = 0; j < 8; j++)
        for (int l = 0; l < 32; l++)
            u[32 * j + l] = (uint8_t)((blk[48 + 32 * (j / 2) + l] >> (4 * (j & 1)) & 15) | (blk[16 + l] >> j & 1) << 4);
}

void ifg_q5k_dequant_row(float *o, const uint8_t *row, int n) {
    for (int b = 0; b < n / 256; b++) {
        const uint8_t *blk = row + (size_t)b * IFG_Q5_K_BLOCK;
        const float d = q5_h(blk), dmin = q5_h(blk + 2);
        uint8_t sc[8], m[8], u[256];
        q5_scales(blk + 4, sc, m);
        q5_levels_scalar(blk, u);
        for (int i = 0; i < 256; i++) {
            const float a = d * (float)sc[i / 32], c = dmin * (float)m[i / 32];
            o[b * 256 + i] = a * (float)u[i] - c;
        }
    }
}

#ifndef IFG_SIMD
/* ---- scalar reference ---- */
static void q5_tiles(float *y, int ldy, const int8_t *xq, const float *xd, const int32_t *xs, const uint8_t *w,
                     int t, int tt, int n0, int n1, int K, int k0, int k1, int add) {
    const size_t rb = (size_t)(K / 256) * IFG_Q5_K_BLOCK;
    for (int n = n0; n < n1; n++)
        for (int i = 0; i < tt; i++) {
            float acc = 0.0f;
            for (int k = k0; k < k1; k += 256) {
                const uint8_t *blk = w + (size_t)n * rb + (size_t)(k / 256) * IFG_Q5_K_BLOCK;
                const float d = q5_h(blk), dmin = q5_h(blk + 2);
                uint8_t sc[8], m[8], u[256];
                q5_scales(blk + 4, sc, m);
                q5_levels_scalar(blk, u);
                for (int s = 0; s < 8; s++) {
                    const int b = (k - k0) / 32 + s;
                    const int8_t *xb = xq + (size_t)i * Q5_KB + 32 * b;
                    int32_t dot = 0;
                    for (int l = 0; l < 32; l++) dot += (int32_t)u[32 * s + l] * xb[l];
                    const float dx = xd[i * Q5_NBK + b];
                    acc += (d * (float)sc[s] * dx) * (float)dot - (dmin * (float)m[s]) * (dx * (float)xs[i * Q5_NBK + b]);
                }
            }
            float *yo = y + (size_t)(t + i) * ldy + n;
            *yo = add ? *yo + acc : acc;
        }
}
#else
/* ---- SIMD ---- */
#define Q5_TT 4
#if defined(IFG_AVX512)
#define Q5_NT 4
#else
#define Q5_NT 2
#endif

/* Levels of sub-block c (0..7): nibble run and bit c of qh, as 32 unsigned bytes. */
IFG_AI __m256i q5_levels(const uint8_t *blk, int c) {
    __m256i lo = _mm256_loadu_si256((const __m256i *)(blk + 48 + 32 * (c >> 1)));
    if (c & 1) lo = _mm256_srli_epi16(lo, 4);
    __m256i hi = _mm256_loadu_si256((const __m256i *)(blk + 16));
    /* bit c of each byte to bit 4 (16-bit shifts: what crosses bytes is masked off) */
    if (c < 4) hi = _mm256_slli_epi16(hi, 4 - c);
    else if (c > 4) hi = _mm256_srli_epi16(hi, c - 4);
    return _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi8(0x0F)), _mm256_and_si256(hi, _mm256_set1_epi8(0x10)));
}
IFG_AI __m256i q5_dot(__m256i u, __m256i x) {
#if defined(IFG_AVX512)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
#endif
}
IFG_AI float q5_hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

IFG_AI void q5_tile(float *y, int ldy, const int8_t *xq, const float *xd, const int32_t *xs, const uint8_t *w,
                   size_t rb, int t, int i0, int n, int k0, int k1, int add, const int TT, const int NT) {
    __m256 acc[Q5_TT][Q5_NT];
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) acc[i][j] = _mm256_setzero_ps();
    for (int k = k0; k < k1; k += 256) {
        const int b0 = (k - k0) / 32;
        const uint8_t *blk[Q5_NT];
        __m256 ds[Q5_NT], dm[Q5_NT];
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) {
            blk[j] = w + (size_t)(n + j) * rb + (size_t)(k / 256) * IFG_Q5_K_BLOCK;
            uint8_t sc[16];
            q5_scales(blk[j] + 4, sc, sc + 8);
            const __m128i sm = _mm_loadu_si128((const __m128i *)sc);
            ds[j] = _mm256_mul_ps(_mm256_set1_ps(q5_h(blk[j])), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm)));
            dm[j] = _mm256_mul_ps(_mm256_set1_ps(q5_h(blk[j] + 2)),
                                  _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))));
        }
        /* min term: acc -= (dmin * m) * (d_x * s_x), lane s = sub-block s */
#pragma GCC unroll 16
        for (int i = 0; i < TT; i++) {
            const size_t xi = (size_t)(i0 + i) * Q5_NBK + b0;
            const __m256 xsf = _mm256_mul_ps(_mm256_loadu_ps(xd + xi),
                                             _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(xs + xi))));
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++) acc[i][j] = _mm256_fnmadd_ps(dm[j], xsf, acc[i][j]);
        }
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) {
            __m256i u[Q5_NT];
            __m256 ws[Q5_NT];
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++) {
                u[j] = q5_levels(blk[j], c);
                ws[j] = _mm256_permutevar8x32_ps(ds[j], _mm256_set1_epi32(c));
            }
#pragma GCC unroll 16
            for (int i = 0; i < TT; i++) {
                const size_t xi = (size_t)(i0 + i);
                const __m256i xv = _mm256_load_si256((const __m256i *)(xq + xi * Q5_KB + 32 * (b0 + c)));
                const __m256 dx = _mm256_set1_ps(xd[xi * Q5_NBK + b0 + c]);
#pragma GCC unroll 16
                for (int j = 0; j < NT; j++)
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q5_dot(u[j], xv)), _mm256_mul_ps(ws[j], dx), acc[i][j]);
            }
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) {
            float *yo = y + (size_t)(t + i0 + i) * ldy + n + j;
            const float s = q5_hsum(acc[i][j]);
            *yo = add ? *yo + s : s;
        }
}

#define Q5_NLOOP(TTC)                                                                           \
    do {                                                                                         \
        int n_ = n0;                                                                             \
        for (; n_ + Q5_NT <= n1; n_ += Q5_NT)                                                    \
            q5_tile(y, ldy, xq, xd, xs, w, rb, t, i0, n_, k0, k1, add, TTC, Q5_NT);               \
        for (; n_ < n1; n_++) q5_tile(y, ldy, xq, xd, xs, w, rb, t, i0, n_, k0, k1, add, TTC, 1); \
    } while (0)

static void q5_tiles(float *y, int ldy, const int8_t *xq, const float *xd, const int32_t *xs, const uint8_t *w,
                     int t, int tt, int n0, int n1, int K, int k0, int k1, int add) {
    const size_t rb = (size_t)(K / 256) * IFG_Q5_K_BLOCK;
    for (int i0 = 0; i0 < tt; i0 += Q5_TT) {
        const int r = tt - i0;
        if (r >= 4) Q5_NLOOP(4);
        else if (r == 3) Q5_NLOOP(3);
        else if (r == 2) Q5_NLOOP(2);
        else Q5_NLOOP(1);
    }
}
#endif

void ifg_q5k_mm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int T, int r0, int r1,
                     int K, int accumulate) {
    _Alignas(64) int8_t xq[Q5_TB * Q5_KB];
    float xd[Q5_TB * Q5_NBK];
    int32_t xs[Q5_TB * Q5_NBK];
    for (int t = 0; t < T; t += Q5_TB) {
        const int tt = T - t < Q5_TB ? T - t : Q5_TB;
        for (int k0 = 0; k0 < K; k0 += Q5_KB) {
            const int k1 = k0 + Q5_KB < K ? k0 + Q5_KB : K, add = accumulate || k0 > 0;
            ifg_quantize_x(xq, xd, xs, x, ldx, t, tt, k0, k1, Q5_KB, Q5_NBK);
            for (int n0 = r0; n0 < r1; n0 += Q5_NB)
                q5_tiles(y, ldy, xq, xd, xs, (const uint8_t *)w, t, tt, n0, n0 + Q5_NB < r1 ? n0 + Q5_NB : r1, K,
                         k0, k1, add);
        }
    }
}
