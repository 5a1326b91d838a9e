/* quant_q6k.c — y (=|+=) x · Wᵀ for q6_k weights (see quant_gguf.h for the math, infeng/quant/q6_k.py
 * for the layout).
 *
 * Per thread (rows [r0, r1)): tokens in blocks of Q6_TB; for each k-chunk of Q6_KB the block's x
 * rows are quantized once (ifg_quantize_x) and, per 4 consecutive int8, o = -32 * their sum is
 * kept (int16: |o| <= 32 * 508), so that an integer dot product started from o sums (q - 32) * x
 * with the unsigned 6-bit levels q. Then row blocks of Q6_NB rows × token tiles of Q6_TT × row
 * tiles of Q6_NT run the micro-kernel: per super-block and row, the 16 int8 scales times d as two
 * 8-lane f32 vectors; per 32-block c (sub-blocks 2c, 2c+1) the 32 levels are put together from
 * ql nibbles and qh bit pairs (two shifts, two masks, an or), one integer dot (AVX-512 VNNI:
 * vpdpbusd from o; AVX2: vpmaddubsw, levels <= 63 × |x| <= 127 pair sums below 2^15, vpmaddwd
 * with ones, + o) gives 8 lanes, lanes 0..3 sub-block 2c and 4..7 2c+1, converted and FMA'd with
 * (d * sc) * d_x in the matching lanes. Scalar: plain loops.
 * Each output's summation order depends only on K: bitwise the same for any thread count. */
#include "quant_gguf.h"
#include "quant.h"

#define Q6_KB 2048 /* k chunk of x quantized at a time (multiple of 256) */
#define Q6_TB 16   /* tokens quantized at a time */
#define Q6_NB 64   /* rows per L2 block */

/* The 256 levels (0..63) of a q6_k block in element order. */
static inline void q6_levels_scalar(const uint8_t *blk, uint8_t *u) {
    for (int h = 0; h < 2; h++)
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                const uint8_t lo = blk[64 * h + 32 * (c & 1) + l] >> (4 * (c >> 1)) & 0x0F;
                const uint8_t hi = blk[128 + 32 * h + l] >> (2 * c) & 3;
                u[128 * h + 32 * c + l] = (uint8_t)(lo | hi << 4);
            }
}
static inline float q6_d(const uint8_t *blk) { uint16_t h; memcpy(&h, blk + 208, 2); return ifg_f16_to_f32(h); }

void ifg_q6k_dequant_row(float *o, const uint8_t *row, int n) {
    for (int b = 0; b < n / 256; b++) {
        const uint8_t *blk = row + (size_t)b * IFG_Q6_K_BLOCK;
        const float d = q6_d(blk);
        uint8_t u[256];
        q6_levels_scalar(blk, u);
        for (int i = 0; i < 256; i++) {
            const float ds = d * (float)(int8_t)blk[192 + i / 16];
            o[b * 256 + i] = ds * (float)((int)u[i] - 32);
        }
    }
}

/* Quantized x of a token tile: token i's int8 at q[i*Q6_KB + k], its 32-block b's scale at
 * d[i*(Q6_KB/32) + b], o[i*(Q6_KB/4) + k/4] = -32 * (the sum of q at k..k+3); k relative to the chunk. */
static void q6_quantize_x(int8_t *q, float *d, int16_t *o, const float *x, int ldx, int t, int tt, int k0, int k1) {
    int32_t s[Q6_TB * (Q6_KB / 32)];
    ifg_quantize_x(q, d, s, x, ldx, t, tt, k0, k1, Q6_KB, Q6_KB / 32);
    for (int i = 0; i < tt; i++)
        for (int k = 0; k < k1 - k0; k += 4) {
            const int8_t *p = q + (size_t)i * Q6_KB + k;
            o[(size_t)i * (Q6_KB / 4) + k / 4] = (int16_t)(-32 * (p[0] + p[1] + p[2] + p[3]));
        }
}

#if !defined(IFG_AVX2) && !defined(IFG_AVX512)
/* ---- scalar reference ---- */
static void q6_tiles(float *y, int ldy, const int8_t *xq, const float *xd, const int16_t *xo, const uint8_t *w,
                     int t, int tt, int n0, int n1, int K, int k0, int k1, int add) {
    const size_t rb = (size_t)(K / 256) * IFG_Q6_K_BLOCK;
    (void)xo;
    for (int n = n0; n < n1; n++)
        for (int i = 0; i < tt; i++) {
            float acc = 0.0f;
            for (int k = k0; k < k1; k += 256) {
                const uint8_t *blk = w + (size_t)n * rb + (size_t)(k / 256) * IFG_Q6_K_BLOCK;
                const float d = q6_d(blk);
                uint8_t u[256];
                q6_levels_scalar(blk, u);
                for (int s = 0; s < 16; s++) {
                    const int8_t *xb = xq + (size_t)i * Q6_KB + (k - k0) + 16 * s;
                    int32_t dot = 0;
                    for (int l = 0; l < 16; l++) dot += ((int32_t)u[16 * s + l] - 32) * xb[l];
                    const float dx = xd[i * (Q6_KB / 32) + (k - k0) / 32 + s / 2];
                    acc += (d * (float)(int8_t)blk[192 + s] * dx) * (float)dot;
                }
            }
            float *yo = y + (size_t)(t + i) * ldy + n;
            *yo = add ? *yo + acc : acc;
        }
}
#else
/* ---- SIMD ---- */
#define Q6_AI static inline __attribute__((always_inline))
#define Q6_TT 4
#if defined(IFG_AVX512)
#define Q6_NT 4
#else
#define Q6_NT 2
#endif

/* Levels of 32-block c (0..7) of a block: ql nibble run and qh bit pair, as 32 unsigned bytes. */
Q6_AI __m256i q6_levels(const uint8_t *blk, int c) {
    const int h = c >> 2, qq = c & 3;
    __m256i lo = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32 * (qq & 1)));
    if (qq >> 1) lo = _mm256_srli_epi16(lo, 4);
    __m256i hi = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
    /* bits 2qq, 2qq+1 of each byte to bits 4, 5 (16-bit shifts: what crosses bytes is masked off) */
    if (qq == 0) hi = _mm256_slli_epi16(hi, 4);
    else if (qq == 1) hi = _mm256_slli_epi16(hi, 2);
    else if (qq == 3) hi = _mm256_srli_epi16(hi, 2);
    return _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi8(0x0F)), _mm256_and_si256(hi, _mm256_set1_epi8(0x30)));
}
/* int32 lanes of o + sum(u * x) (4 bytes per lane). */
Q6_AI __m256i q6_dot(__m256i o, __m256i u, __m256i x) {
#if defined(IFG_AVX512)
    return _mm256_dpbusd_epi32(o, u, x);
#else
    return _mm256_add_epi32(o, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
#endif
}
Q6_AI float q6_hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* TT tokens (rows i0.. of the quantized x chunk; outputs t + i0 + i) × NT rows from n, k in [k0, k1). */
Q6_AI void q6_tile(float *y, int ldy, const int8_t *xq, const float *xd, const int16_t *xo, const uint8_t *w,
                   size_t rb, int t, int i0, int n, int k0, int k1, int add, const int TT, const int NT) {
    __m256 acc[Q6_TT][Q6_NT];
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) acc[i][j] = _mm256_setzero_ps();
    for (int k = k0; k < k1; k += 256) {
        const uint8_t *blk[Q6_NT];
        __m256 ds[Q6_NT][2]; /* d * sc, sub-blocks 0..7 and 8..15 */
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) {
            blk[j] = w + (size_t)(n + j) * rb + (size_t)(k / 256) * IFG_Q6_K_BLOCK;
            const __m256 d = _mm256_set1_ps(q6_d(blk[j]));
            const __m128i sc = _mm_loadu_si128((const __m128i *)(blk[j] + 192));
            ds[j][0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
            ds[j][1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))));
        }
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) {
            const int b = (k - k0) / 32 + c; /* x's 32-block */
            const __m256i idx = _mm256_setr_epi32(2 * c % 8, 2 * c % 8, 2 * c % 8, 2 * c % 8,
                                                  (2 * c + 1) % 8, (2 * c + 1) % 8, (2 * c + 1) % 8, (2 * c + 1) % 8);
            __m256i u[Q6_NT];
            __m256 ws[Q6_NT];
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++) {
                u[j] = q6_levels(blk[j], c);
                ws[j] = _mm256_permutevar8x32_ps(ds[j][c >> 2], idx);
            }
#pragma GCC unroll 16
            for (int i = 0; i < TT; i++) {
                const size_t xi = (size_t)(i0 + i);
                const __m256i xv = _mm256_load_si256((const __m256i *)(xq + xi * Q6_KB + 32 * b));
                const __m256i o = _mm256_cvtepi16_epi32(_mm_load_si128((const __m128i *)(xo + xi * (Q6_KB / 4) + 8 * b)));
                const __m256 dx = _mm256_set1_ps(xd[xi * (Q6_KB / 32) + b]);
#pragma GCC unroll 16
                for (int j = 0; j < NT; j++)
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q6_dot(o, u[j], xv)), _mm256_mul_ps(ws[j], dx),
                                                acc[i][j]);
            }
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) {
            float *yo = y + (size_t)(t + i0 + i) * ldy + n + j;
            const float s = q6_hsum(acc[i][j]);
            *yo = add ? *yo + s : s;
        }
}

#define Q6_NLOOP(TTC)                                                                           \
    do {                                                                                         \
        int n_ = n0;                                                                             \
        for (; n_ + Q6_NT <= n1; n_ += Q6_NT)                                                    \
            q6_tile(y, ldy, xq, xd, xo, w, rb, t, i0, n_, k0, k1, add, TTC, Q6_NT);               \
        for (; n_ < n1; n_++) q6_tile(y, ldy, xq, xd, xo, w, rb, t, i0, n_, k0, k1, add, TTC, 1); \
    } while (0)

static void q6_tiles(float *y, int ldy, const int8_t *xq, const float *xd, const int16_t *xo, const uint8_t *w,
                     int t, int tt, int n0, int n1, int K, int k0, int k1, int add) {
    const size_t rb = (size_t)(K / 256) * IFG_Q6_K_BLOCK;
    for (int i0 = 0; i0 < tt; i0 += Q6_TT) {
        const int r = tt - i0;
        if (r >= 4) Q6_NLOOP(4);
        else if (r == 3) Q6_NLOOP(3);
        else if (r == 2) Q6_NLOOP(2);
        else Q6_NLOOP(1);
    }
}
#endif

void ifg_q6k_mm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int T, int r0, int r1,
                     int K, int accumulate) {
    _Alignas(64) int8_t xq[Q6_TB * Q6_KB];
    _Alignas(64) int16_t xo[Q6_TB * (Q6_KB / 4)];
    float xd[Q6_TB * (Q6_KB / 32)];
    for (int t = 0; t < T; t += Q6_TB) {
        const int tt = T - t < Q6_TB ? T - t : Q6_TB;
        for (int k0 = 0; k0 < K; k0 += Q6_KB) {
            const int k1 = k0 + Q6_KB < K ? k0 + Q6_KB : K, add = accumulate || k0 > 0;
            q6_quantize_x(xq, xd, xo, x, ldx, t, tt, k0, k1);
            for (int n0 = r0; n0 < r1; n0 += Q6_NB)
                q6_tiles(y, ldy, xq, xd, xo, (const uint8_t *)w, t, tt, n0, n0 + Q6_NB < r1 ? n0 + Q6_NB : r1, K,
                         k0, k1, add);
        }
    }
}
