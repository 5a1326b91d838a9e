/* quant_affine_x16.c — y (=|+=) x · Wᵀ for q4_1 weights in the 16-row interleaved layout
 * (IFG_Q4_1X16, see quant_gguf.h), and the repack into it.
 *
 * x is quantized per token and 32-block as for the plain layout (ifg_quantize_x, or a shared
 * ifg_xq) in tiles of AX_TB tokens × AX_KB k (longer K: partial sums through y). Then for each
 * run of G 16-row groups and TT tokens, a register tile does per group-block:
 *  - AVX-512 (VNNI): an int32 accumulator (16 rows in one zmm) from 0, then 8 vpdpbusd: each
 *    64-byte vector of 16 rows × 4 k of nibbles (low, then high nibbles) against x's 4 int8 of
 *    those k broadcast; then one convert and one FMA with the 16 rows' d (one vcvtph2ps) times
 *    d_x, and one FMA of their m times d_x * s_x (x's block sum);
 *  - AVX2: the same as two 8-row halves, vpmaddubsw (nibbles <= 15 × |x| <= 127, low + high
 *    sum <= 3810 * 2 per int16 lane: no saturation) + vpmaddwd with ones;
 *  - scalar: plain loops over the same layout.
 * A group's outputs are 16 consecutive floats of y: no horizontal sums. Each output's summation
 * order depends only on K, never on the thread or tile: bitwise the same for any thread count. */
#include "quant_gguf.h"
#include "quant.h"
#include "simd.h"

#define AX_KB 2048 /* k chunk of x quantized at a time (multiple of 32) */
#define AX_TB 16   /* tokens quantized at a time */
#define AX_BB 320  /* bytes of a group-block: 16 × 20 */

void ifg_q4_1_interleave(void *dst, const void *src, int N, int K, int n_threads) {
    const int nb = K / 32, G = N / 16;
    IFG_PARALLEL(n_threads) {
        IFG_FOR
        for (int g = 0; g < G; g++)
            for (int r = 0; r < 16; r++) { /* one source row at a time: sequential reads */
                const uint8_t *row = (const uint8_t *)src + ((size_t)g * 16 + r) * nb * 20;
                for (int b = 0; b < nb; b++) {
                    const uint8_t *s = row + (size_t)b * 20;
                    uint8_t *o = (uint8_t *)dst + ((size_t)g * nb + b) * AX_BB;
                    memcpy(o + 2 * r, s, 2);       /* d */
                    memcpy(o + 32 + 2 * r, s + 2, 2); /* m */
                    for (int v = 0; v < 4; v++) /* byte j of row r in chunk v: low k = 8v + j, high 8v + 4 + j */
                        for (int j = 0; j < 4; j++) {
                            const int k0 = 8 * v + j, k1 = 8 * v + 4 + j; /* source nibble of k: byte k%16, high if k>=16 */
                            const uint8_t l = k0 < 16 ? s[4 + k0] & 0x0F : s[4 + k0 - 16] >> 4;
                            const uint8_t h = k1 < 16 ? s[4 + k1] & 0x0F : s[4 + k1 - 16] >> 4;
                            o[64 + 64 * v + 4 * r + j] = (uint8_t)(l | h << 4);
                        }
                }
            }
    }
}

/* Quantized x of the tile: token i's int8 at q[i*ldq + k], block b's scale and sum at d / s[i*ldd + b]. */
struct ax_x { const int8_t *q; const float *d; const int32_t *s; int ldq, ldd; };

#ifndef IFG_SIMD
/* ---- scalar reference ---- */
static void ax_tiles(float *y, int ldy, const struct ax_x *xr, const uint8_t *w, size_t gstride, int t, int tt,
                     int n0, int n1, int b0, int nb, int add) {
    for (int n = n0; n < n1; n++) {
        const int r = n % 16;
        const uint8_t *wg = w + (size_t)(n / 16) * gstride;
        for (int i = 0; i < tt; i++) {
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *blk = wg + (size_t)(b0 + b) * AX_BB;
                const int8_t *xq = xr->q + (size_t)i * xr->ldq + 32 * b;
                int32_t dot = 0;
                for (int k = 0; k < 32; k++) {
                    const uint8_t by = blk[64 + 64 * (k / 8) + 4 * r + k % 4];
                    dot += (int32_t)(k % 8 < 4 ? by & 0x0F : by >> 4) * xq[k];
                }
                uint16_t hd, hm;
                memcpy(&hd, blk + 2 * r, 2);
                memcpy(&hm, blk + 32 + 2 * r, 2);
                const float dx = xr->d[i * xr->ldd + b];
                acc += (float)dot * (ifg_f16_to_f32(hd) * dx);
                acc += ifg_f16_to_f32(hm) * (dx * (float)xr->s[i * xr->ldd + b]);
            }
            float *yo = y + (size_t)(t + i) * ldy + n;
            *yo = add ? *yo + acc : acc;
        }
    }
}
#else
IFG_AI int32_t ax_x4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }
#if defined(IFG_AVX512)
#define AX_TT 4 /* tokens per register tile */
#define AX_G 2  /* groups per register tile (prefill) */
#define AX_G1 4 /* groups per register tile (one token: more independent weight streams) */
IFG_AI void ax_tile(float *y, int ldy, const struct ax_x *xr, const uint8_t *w, size_t gstride, int t, int i0,
                   int n, int b0, int nb, int add, const int TT, const int G) {
    __m512 acc[AX_TT][AX_G1];
    const int ldq = xr->ldq, ldd = xr->ldd;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) acc[i][g] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk[AX_G1];
        __m512i ia[AX_TT][AX_G1];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) blk[g] = w + (size_t)(n / 16 + g) * gstride + (size_t)(b0 + b) * AX_BB;
#pragma GCC unroll 8
        for (int i = 0; i < TT; i++)
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) ia[i][g] = _mm512_setzero_si512();
        const int8_t *xb = xr->q + (size_t)i0 * ldq + 32 * b;
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++) {
            __m512i lo[AX_G1], hi[AX_G1];
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
                const __m512i raw = _mm512_loadu_si512((const void *)(blk[g] + 64 + 64 * v));
                lo[g] = _mm512_and_si512(raw, m4);
                hi[g] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
            }
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++) {
                const __m512i xl = _mm512_set1_epi32(ax_x4(xb + (size_t)i * ldq + 8 * v));
                const __m512i xh = _mm512_set1_epi32(ax_x4(xb + (size_t)i * ldq + 8 * v + 4));
#pragma GCC unroll 8
                for (int g = 0; g < G; g++)
                    ia[i][g] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ia[i][g], lo[g], xl), hi[g], xh);
            }
        }
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk[g]));
            const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk[g] + 32)));
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++) {
                const float dx = xr->d[(i0 + i) * ldd + b];
                acc[i][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[i][g]), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc[i][g]);
                acc[i][g] = _mm512_fmadd_ps(mw, _mm512_set1_ps(dx * (float)xr->s[(i0 + i) * ldd + b]), acc[i][g]);
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            float *yo = y + (size_t)(t + i0 + i) * ldy + n + 16 * g;
            _mm512_storeu_ps(yo, add ? _mm512_add_ps(_mm512_loadu_ps(yo), acc[i][g]) : acc[i][g]);
        }
}
#else /* AVX2 */
#define AX_TT 2
#define AX_G 1
#define AX_G1 2
IFG_AI void ax_tile(float *y, int ldy, const struct ax_x *xr, const uint8_t *w, size_t gstride, int t, int i0,
                   int n, int b0, int nb, int add, const int TT, const int G) {
    __m256 acc[AX_TT][2 * AX_G1]; /* [token][8-row half] */
    const int ldq = xr->ldq, ldd = xr->ldd, H = 2 * G;
    const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 8
        for (int h = 0; h < H; h++) acc[i][h] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk[AX_G1];
        __m256i ia[AX_TT][2 * AX_G1];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) blk[g] = w + (size_t)(n / 16 + g) * gstride + (size_t)(b0 + b) * AX_BB;
#pragma GCC unroll 8
        for (int i = 0; i < TT; i++)
#pragma GCC unroll 8
            for (int h = 0; h < H; h++) ia[i][h] = _mm256_setzero_si256();
        const int8_t *xb = xr->q + (size_t)i0 * ldq + 32 * b;
        for (int v = 0; v < 4; v++) {
            __m256i lo[2 * AX_G1], hi[2 * AX_G1];
#pragma GCC unroll 8
            for (int h = 0; h < H; h++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(blk[h / 2] + 64 + 64 * v + 32 * (h % 2)));
                lo[h] = _mm256_and_si256(raw, m4);
                hi[h] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            }
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++) {
                const __m256i xl = _mm256_set1_epi32(ax_x4(xb + (size_t)i * ldq + 8 * v));
                const __m256i xh = _mm256_set1_epi32(ax_x4(xb + (size_t)i * ldq + 8 * v + 4));
#pragma GCC unroll 8
                for (int h = 0; h < H; h++)
                    ia[i][h] = _mm256_add_epi32(ia[i][h], _mm256_madd_epi16(_mm256_add_epi16(
                        _mm256_maddubs_epi16(lo[h], xl), _mm256_maddubs_epi16(hi[h], xh)), ones));
            }
        }
#pragma GCC unroll 8
        for (int h = 0; h < H; h++) {
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk[h / 2] + 16 * (h % 2))));
            const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk[h / 2] + 32 + 16 * (h % 2))));
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++) {
                const float dx = xr->d[(i0 + i) * ldd + b];
                acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[i][h]), _mm256_mul_ps(dw, _mm256_set1_ps(dx)), acc[i][h]);
                acc[i][h] = _mm256_fmadd_ps(mw, _mm256_set1_ps(dx * (float)xr->s[(i0 + i) * ldd + b]), acc[i][h]);
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 8
        for (int h = 0; h < H; h++) {
            float *yo = y + (size_t)(t + i0 + i) * ldy + n + 8 * h;
            _mm256_storeu_ps(yo, add ? _mm256_add_ps(_mm256_loadu_ps(yo), acc[i][h]) : acc[i][h]);
        }
}
#endif

/* Every group run × token tile of rows [n0, n1) (multiples of 16), specialised per tile shape. */
#define AX_GLOOP(TTC, GC)                                                                             \
    do {                                                                                               \
        int n_ = n0;                                                                                   \
        for (; n_ + 16 * (GC) <= n1; n_ += 16 * (GC)) ax_tile(y, ldy, xr, w, gstride, t, i0, n_, b0, nb, add, TTC, GC); \
        for (; n_ < n1; n_ += 16) ax_tile(y, ldy, xr, w, gstride, t, i0, n_, b0, nb, add, TTC, 1);   \
    } while (0)

static void ax_tiles(float *y, int ldy, const struct ax_x *xr, const uint8_t *w, size_t gstride, int t, int tt,
                     int n0, int n1, int b0, int nb, int add) {
    if (tt == 1) {
        const int i0 = 0;
        AX_GLOOP(1, AX_G1);
        return;
    }
    for (int i0 = 0; i0 < tt; i0 += AX_TT) {
        const int r = tt - i0;
#if AX_TT == 4
        if (r >= 4) AX_GLOOP(4, AX_G);
        else if (r == 3) AX_GLOOP(3, AX_G);
        else if (r == 2) AX_GLOOP(2, AX_G);
        else AX_GLOOP(1, AX_G);
#else
        if (r >= 2) AX_GLOOP(2, AX_G);
        else AX_GLOOP(1, AX_G);
#endif
    }
}
#endif

void ifg_q4_1x16_mm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int T, int r0, int r1,
                         int K, int accumulate, const struct ifg_xq *xq) {
    _Alignas(64) int8_t q[AX_TB * AX_KB];
    float d[AX_TB * (AX_KB / 32)];
    int32_t s[AX_TB * (AX_KB / 32)];
    const size_t gstride = (size_t)(K / 32) * AX_BB;
    for (int t = 0; t < T; t += AX_TB) {
        const int tt = T - t < AX_TB ? T - t : AX_TB;
        for (int k0 = 0; k0 < K; k0 += AX_KB) { /* the same chunks with or without xq: the same sums */
            const int k1 = k0 + AX_KB < K ? k0 + AX_KB : K, add = accumulate || k0 > 0;
            struct ax_x xr = {q, d, s, AX_KB, AX_KB / 32};
            if (xq) {
                const size_t bx = (size_t)t * xq->ldd + (size_t)(k0 / 32);
                xr = (struct ax_x){xq->q + (size_t)t * xq->ldq + k0, xq->d + bx, xq->s + bx, xq->ldq, xq->ldd};
            } else {
                ifg_quantize_x(q, d, s, x, ldx, t, tt, k0, k1, AX_KB, AX_KB / 32);
            }
            ax_tiles(y, ldy, &xr, (const uint8_t *)w, gstride, t, tt, r0, r1, k0 / 32, (k1 - k0) / 32, add);
        }
    }
}
