/* quant.c — y (=|+=) x · Wᵀ for q8_0 / q4_0 / q5_0 weights: x quantized to int8 per 32-block, integer
 * block dot products, one f32 multiply-add per block with d_w * d_x.
 *
 * Work of one thread (rows [r0, r1)): tokens in blocks of QX_TB; for each k-chunk of QX_KB the
 * chunk of the block's x rows is quantized once into a stack buffer (int8 + f32 scales), then
 * row blocks of QX_NB rows (their weights stay in L2) × token tiles of QX_TT × row tiles of
 * QX_NT run the micro-kernel, QX_TT × QX_NT vector accumulators, each weight block decoded to
 * signed int8 in registers once and used for every token of the tile. Partial sums of
 * successive k-chunks go through y. T == 1 (decode) is the same path with one-token tiles.
 *
 * Block dot products (32 int8 × 32 int8 → int32 lanes):
 *  - scalar: plain loops;
 *  - AVX2: vpmaddubsw(|w|, sign(x, w)) then vpmaddwd with ones (|w| <= 128, |x| <= 127: the
 *    int16 pair sums stay below 32767, no saturation);
 *  - AVX-512 build (has AVX512-VNNI): vpdpbusd on 256-bit vectors with the weights made
 *    unsigned (q8_0: w + 128; q4_0: the raw nibbles, w + 8; q5_0: the 5-bit levels, w + 16) and
 *    the offset taken out through
 *    the accumulator's start value, -off * sum(x_q) (x's block sums come with its
 *    quantization): per token × row × block one vpdpbusd, one convert, one vpermps (the
 *    row's scale from a 4-row vector of fp16 scales converted at once) and one FMA. Against
 *    the |w| / sign(x, w) form it replaced: q8_0 GEMV ~15% and q4_0 ~40% less time (A/B on a
 *    loaded 2-core machine, ratios to bf16 in the same process, three rounds).
 * q4_0 nibbles are unpacked with low nibbles → elements 0..15, high → 16..31; q5_0 the same,
 * with bit j of qh spread to bit 4 of byte j (AVX2: qh broadcast, byte-shuffled so byte j holds
 * qh's byte j/8, tested against the bit j%8; AVX-512: a masked move with qh as the mask).
 *
 * Each output's summation order depends only on K (chunk, block and lane order are fixed), so
 * results are bitwise identical for any thread count. */
#include "quant.h"

#define QX_KB 2048 /* k chunk quantized at a time (multiple of 32) */
#define QX_TB 16   /* tokens quantized at a time */
#define QX_NB 64   /* rows per L2 block */
#define QX_NBK (QX_KB / IFG_QK)

/* Quantize x[t][k0..k1) for tt tokens: q[i*ldq + k - k0], d[i*ldd + b], and the block sums
 * s[i*ldd + b] = sum of the block's q. Every ISA quantizes x bit for bit identically (and as
 * infeng.quant.quantize_activations): d = amax / 127, q = roundf(x * (1 / d)), rounding half
 * away from zero (the SIMD paths: ifg_round_i32; a prefill spent a third of its time in the
 * scalar loop's roundf / fmaxf calls). */
void ifg_quantize_x(int8_t *q, float *d, int32_t *s, const float *x, int ldx, int t, int tt,
                    int k0, int k1, int ldq, int ldd) {
    for (int i = 0; i < tt; i++) {
        const float *xr = x + (size_t)(t + i) * ldx;
        for (int k = k0, b = 0; k < k1; k += IFG_QK, b++) {
            int8_t *qo = q + (size_t)i * ldq + (k - k0);
#if defined(IFG_AVX512)
            const __m512 x0 = _mm512_loadu_ps(xr + k), x1 = _mm512_loadu_ps(xr + k + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            const float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
            const __m512 vid = _mm512_set1_ps(id);
            const __m512i q0 = ifg_round_i32(_mm512_mul_ps(x0, vid)), q1 = ifg_round_i32(_mm512_mul_ps(x1, vid));
            _mm_storeu_si128((__m128i *)qo, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(qo + 16), _mm512_cvtepi32_epi8(q1));
            d[i * ldd + b] = dd;
            s[i * ldd + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#elif defined(IFG_AVX2)
            const __m256 sign = _mm256_set1_ps(-0.0f);
            __m256 xv[4], m = _mm256_setzero_ps();
            for (int j = 0; j < 4; j++) {
                xv[j] = _mm256_loadu_ps(xr + k + 8 * j);
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, xv[j]));
            }
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
            const float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
            const __m256 vid = _mm256_set1_ps(id);
            __m256i qi[4], sum = _mm256_setzero_si256();
            for (int j = 0; j < 4; j++) {
                qi[j] = ifg_round_i32(_mm256_mul_ps(xv[j], vid));
                sum = _mm256_add_epi32(sum, qi[j]);
            }
            /* int32 → int8 (values within ±127: no saturation); packs work per 128-bit lane */
            const __m256i w01 = _mm256_packs_epi32(qi[0], qi[1]), w23 = _mm256_packs_epi32(qi[2], qi[3]);
            const __m256i q8 = _mm256_packs_epi16(w01, w23);
            _mm256_storeu_si256((__m256i *)qo, _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
            d[i * ldd + b] = dd;
            s[i * ldd + b] = _mm_cvtsi128_si32(s4);
#else
            float amax = 0.0f;
            for (int j = 0; j < IFG_QK; j++) amax = fmaxf(amax, fabsf(xr[k + j]));
            const float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
            d[i * ldd + b] = dd;
            int32_t sum = 0;
            for (int j = 0; j < IFG_QK; j++) { qo[j] = (int8_t)roundf(xr[k + j] * id); sum += qo[j]; }
            s[i * ldd + b] = sum;
#endif
        }
    }
}
static void qx_quantize(int8_t *q, float *d, int32_t *s, const float *x, int ldx, int t, int tt, int k0, int k1) {
    ifg_quantize_x(q, d, s, x, ldx, t, tt, k0, k1, QX_KB, QX_NBK);
}

static inline size_t q_block_bytes(int wtype) { return ifg_quant_block_bytes(wtype); }
/* Offset of the nibbles in a q4_0 / q5_0 block (q5_0: after d and the 4 bytes of qh). */
static inline size_t q_nib_off(int wtype) { return wtype == IFG_Q5_0 ? 6 : 2; }
static inline uint32_t q5_qh(const uint8_t *blk) { uint32_t h; memcpy(&h, blk + 2, 4); return h; }
static inline float q_scale(const uint8_t *blk) {
    uint16_t h; memcpy(&h, blk, 2); return ifg_f16_to_f32(h);
}

#ifndef IFG_SIMD
/* ---- scalar reference (the scalar build) ---- */
static inline int32_t q_dot_block(const uint8_t *blk, int wtype, const int8_t *xq) {
    int32_t s = 0;
    if (wtype == IFG_Q8_0) {
        const int8_t *qw = (const int8_t *)(blk + 2);
        for (int j = 0; j < IFG_QK; j++) s += (int32_t)qw[j] * xq[j];
    } else if (wtype == IFG_Q5_0) {
        const uint8_t *nb = blk + 6;
        const uint32_t qh = q5_qh(blk);
        for (int j = 0; j < 16; j++) {
            s += ((int32_t)((nb[j] & 0x0F) | ((qh >> j) & 1) << 4) - 16) * xq[j];
            s += ((int32_t)((nb[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - 16) * xq[j + 16];
        }
    } else {
        const uint8_t *nb = blk + 2;
        for (int j = 0; j < 16; j++) {
            s += ((int32_t)(nb[j] & 0x0F) - 8) * xq[j];
            s += ((int32_t)(nb[j] >> 4) - 8) * xq[j + 16];
        }
    }
    return s;
}

static void qx_tiles_ref(float *y, int ldy, const int8_t *xq, const float *xd, const int32_t *xs, const uint8_t *w,
                         int wtype, int t, int tt, int n0, int n1, int K, int k0, int k1, int add) {
    const size_t rb = (size_t)(K / IFG_QK) * q_block_bytes(wtype), bb = q_block_bytes(wtype);
    (void)xs;
    for (int n = n0; n < n1; n++) {
        for (int i = 0; i < tt; i++) {
            float acc = 0.0f;
            for (int k = k0, b = 0; k < k1; k += IFG_QK, b++) {
                const uint8_t *blk = w + (size_t)n * rb + (size_t)(k / IFG_QK) * bb;
                acc += (q_scale(blk) * xd[i * QX_NBK + b]) *
                       (float)q_dot_block(blk, wtype, xq + (size_t)i * QX_KB + (k - k0));
            }
            float *yo = y + (size_t)(t + i) * ldy + n;
            *yo = add ? *yo + acc : acc;
        }
    }
}
#define qx_tiles qx_tiles_ref
#else
/* ---- SIMD: 256-bit integer blocks, f32 accumulators; per-ISA dot products ---- */
#if defined(IFG_AVX512)
#define QX_TT 4
#define QX_NT 4
#else
#define QX_TT 4
#define QX_NT 2
#endif

/* q5_0's qh as 32 bytes: byte j = 0x10 where bit j is set. */
IFG_AI __m256i q5_high_bits(const uint8_t *blk) {
    const uint32_t qh = q5_qh(blk);
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
/* The unsigned levels of a q4_0 (0..15) or q5_0 (0..31) block, element order. */
IFG_AI __m256i q_levels(const uint8_t *blk, int wtype) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + q_nib_off(wtype)));
    const __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
    return wtype == IFG_Q5_0 ? _mm256_or_si256(v, q5_high_bits(blk)) : v;
}
/* One weight block as 32 signed int8. */
IFG_AI __m256i q_load_w(const uint8_t *blk, int wtype) {
    if (wtype == IFG_Q8_0) return _mm256_loadu_si256((const __m256i *)(blk + 2));
    return _mm256_sub_epi8(q_levels(blk, wtype), _mm256_set1_epi8(wtype == IFG_Q5_0 ? 16 : 8));
}
IFG_AI float q_scale_v(const uint8_t *blk) {
    uint16_t h; memcpy(&h, blk, 2); return _cvtsh_ss(h);
}

/* TT tokens (from t; quantized x at xq/xd, row i of the tile = token t + i) × NT rows (from n). */
#if defined(IFG_AVX512)
/* AVX-512 VNNI: weights as unsigned bytes (q8_0: w + 128; q4_0 / q5_0: the levels q = w + 8 /
 * w + 16) so
 * vpdpbusd(u, x) takes them directly: sum(u * x) = sum(w * x) + off * sum(x), and the
 * accumulator starts at -off * sum(x) (lane 0; exact in int32). The NT rows' fp16 scales are
 * converted in one vector and times d_x per token; lane j is broadcast with vpermps. */
IFG_AI __m256i q_load_u(const uint8_t *blk, int wtype) {
    if (wtype == IFG_Q8_0)
        return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(blk + 2)), _mm256_set1_epi8((char)0x80));
    return q_levels(blk, wtype);
}
IFG_AI void q_tile(float *y, int ldy, const int8_t *xq, const float *xd, const int32_t *xs, const uint8_t *w,
               int wtype, size_t rb, int t, int i0, int n, int k0, int k1, int add, const int TT, const int NT) {
    __m256 acc[QX_TT][QX_NT];
    const size_t bb = q_block_bytes(wtype);
    const int off = wtype == IFG_Q8_0 ? 128 : wtype == IFG_Q5_0 ? 16 : 8;
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) acc[i][j] = _mm256_setzero_ps();
    for (int k = k0, b = 0; k < k1; k += IFG_QK, b++) {
        __m256i u[QX_NT];
        __m128i h = _mm_setzero_si128();
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) {
            const uint8_t *blk = w + (size_t)(n + j) * rb + (size_t)(k / IFG_QK) * bb;
            u[j] = q_load_u(blk, wtype);
            uint16_t hj;
            memcpy(&hj, blk, 2);
            h = _mm_insert_epi16(h, hj, j);
        }
        const __m128 dw = _mm_cvtph_ps(h);
#pragma GCC unroll 16
        for (int i = 0; i < TT; i++) {
            const int xi = (i0 + i) * QX_NBK + b;
            const __m256i xv = _mm256_load_si256((const __m256i *)(xq + (size_t)(i0 + i) * QX_KB + (k - k0)));
            const __m256i init = _mm256_zextsi128_si256(_mm_cvtsi32_si128(-off * xs[xi]));
            const __m256 sc = _mm256_castps128_ps256(_mm_mul_ps(dw, _mm_set1_ps(xd[xi])));
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++)
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_dpbusd_epi32(init, u[j], xv)),
                                            _mm256_permutexvar_ps(_mm256_set1_epi32(j), sc), acc[i][j]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) {
            float *yo = y + (size_t)(t + i0 + i) * ldy + n + j;
            const float s = ifg_hsum256(acc[i][j]);
            *yo = add ? *yo + s : s;
        }
}
#else
IFG_AI void q_tile(float *y, int ldy, const int8_t *xq, const float *xd, const int32_t *xs, const uint8_t *w,
               int wtype, size_t rb, int t, int i0, int n, int k0, int k1, int add, const int TT, const int NT) {
    (void)xs;
    __m256 acc[QX_TT][QX_NT];
    const size_t bb = q_block_bytes(wtype);
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) acc[i][j] = _mm256_setzero_ps();
    for (int k = k0, b = 0; k < k1; k += IFG_QK, b++) {
        __m256i wv[QX_NT], aw[QX_NT];
        float dw[QX_NT];
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) {
            const uint8_t *blk = w + (size_t)(n + j) * rb + (size_t)(k / IFG_QK) * bb;
            wv[j] = q_load_w(blk, wtype);
            aw[j] = _mm256_sign_epi8(wv[j], wv[j]);
            dw[j] = q_scale_v(blk);
        }
#pragma GCC unroll 16
        for (int i = 0; i < TT; i++) {
            const __m256i xv = _mm256_load_si256((const __m256i *)(xq + (size_t)(i0 + i) * QX_KB + (k - k0)));
            const float dx = xd[(i0 + i) * QX_NBK + b];
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++)
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ifg_dot_s8(aw[j], wv[j], xv)),
                                            _mm256_set1_ps(dw[j] * dx), acc[i][j]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) {
            float *yo = y + (size_t)(t + i0 + i) * ldy + n + j;
            const float s = ifg_hsum256(acc[i][j]);
            *yo = add ? *yo + s : s;
        }
}
#endif

#define QX_NLOOP(TTC)                                                                          \
    do {                                                                                        \
        int n_ = n0;                                                                            \
        for (; n_ + QX_NT <= n1; n_ += QX_NT)                                                   \
            q_tile(y, ldy, xq, xd, xs, w, wtype, rb, t, i0, n_, k0, k1, add, TTC, QX_NT);          \
        for (; n_ < n1; n_++) q_tile(y, ldy, xq, xd, xs, w, wtype, rb, t, i0, n_, k0, k1, add, TTC, 1); \
    } while (0)


static void qx_tiles_t(float *y, int ldy, const int8_t *xq, const float *xd, const int32_t *xs, const uint8_t *w,
                       int wtype, int t, int tt, int n0, int n1, int K, int k0, int k1, int add) {
    const size_t rb = (size_t)(K / IFG_QK) * q_block_bytes(wtype);
    for (int i0 = 0; i0 < tt; i0 += QX_TT) {
        const int r = tt - i0;
        if (r >= 4) QX_NLOOP(4);
        else if (r == 3) QX_NLOOP(3);
        else if (r == 2) QX_NLOOP(2);
        else QX_NLOOP(1);
    }
}
static void qx_tiles(float *y, int ldy, const int8_t *xq, const float *xd, const int32_t *xs, const uint8_t *w,
                     int wtype, int t, int tt, int n0, int n1, int K, int k0, int k1, int add) {
    /* one specialisation per weight type: the block decode is inlined */
    if (wtype == IFG_Q8_0) qx_tiles_t(y, ldy, xq, xd, xs, w, IFG_Q8_0, t, tt, n0, n1, K, k0, k1, add);
    else if (wtype == IFG_Q5_0) qx_tiles_t(y, ldy, xq, xd, xs, w, IFG_Q5_0, t, tt, n0, n1, K, k0, k1, add);
    else qx_tiles_t(y, ldy, xq, xd, xs, w, IFG_Q4_0, t, tt, n0, n1, K, k0, k1, add);
}
#endif

void ifg_dequant_row(float *o, const uint8_t *row, int dtype, int n) {
    const size_t bb = q_block_bytes(dtype);
    for (int b = 0; b < n / IFG_QK; b++) {
        const uint8_t *blk = row + (size_t)b * bb;
        const float d = q_scale(blk);
        float *ob = o + (size_t)b * IFG_QK;
        if (dtype == IFG_Q8_0) {
            for (int j = 0; j < IFG_QK; j++) ob[j] = (float)((const int8_t *)(blk + 2))[j] * d;
        } else if (dtype == IFG_Q5_0) {
            const uint32_t qh = q5_qh(blk);
            for (int j = 0; j < 16; j++) {
                ob[j] = (float)((int)((blk[6 + j] & 0x0F) | ((qh >> j) & 1) << 4) - 16) * d;
                ob[j + 16] = (float)((int)((blk[6 + j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - 16) * d;
            }
        } else {
            for (int j = 0; j < 16; j++) {
                ob[j] = (float)((int)(blk[2 + j] & 0x0F) - 8) * d;
                ob[j + 16] = (float)((int)(blk[2 + j] >> 4) - 8) * d;
            }
        }
    }
}

void ifg_qmm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                  int T, int r0, int r1, int K, int accumulate) {
    _Alignas(64) int8_t xq[QX_TB * QX_KB];
    float xd[QX_TB * QX_NBK];
    int32_t xs[QX_TB * QX_NBK];
    for (int t = 0; t < T; t += QX_TB) {
        const int tt = T - t < QX_TB ? T - t : QX_TB;
        for (int k0 = 0; k0 < K; k0 += QX_KB) {
            const int k1 = k0 + QX_KB < K ? k0 + QX_KB : K, add = accumulate || k0 > 0;
            qx_quantize(xq, xd, xs, x, ldx, t, tt, k0, k1);
            for (int n0 = r0; n0 < r1; n0 += QX_NB) {
                const int n1 = n0 + QX_NB < r1 ? n0 + QX_NB : r1;
                qx_tiles(y, ldy, xq, xd, xs, (const uint8_t *)w, wtype, t, tt, n0, n1, K, k0, k1, add);
            }
        }
    }
}
