/* quant_q6kx16.c — y (=|+=) x · Wᵀ for q6_k weights in the 16-row interleaved layout
 * (IFG_Q6_KX16, layout in quant_gguf.h), and the repack into it from GGUF order.
 *
 * The scheme of quant_kx16.c (q4_kx16) with q6_k's levels and 16-weight scales: x in tiles of
 * quantized int8 (x16_plan / x16_fill: a shared ifg_xq, or quantized here), plus per token and
 * 16 k the sum of x's int8 times 32 (q6_k's levels are q - 32 with q unsigned 0..63: the
 * integer dot sums q·x and subtracts it). Per 16-row group and super-block, one 32-byte load
 * gives the 16 rows' d; per 16-weight sub-block, 16 bytes their int8 scales. A 32-block's levels
 * are two 64-byte vectors of low nibbles per 16 k (16 rows × 4 k each in low and high nibbles,
 * as q4_0x16's) and two 64-byte vectors of 2-bit high parts, shifted into bits 4..5:
 *  - AVX-512 (VNNI): 4 vpdpbusd per sub-block and token into a zeroed int32 vector, minus the
 *    token's 32·Σx, one convert, one FMA with (d·sc)·d_x (decode: sc·d_x per sub-block, d once
 *    per super-block, four groups in flight);
 *  - AVX2: two 8-row halves, vpmaddubsw (levels <= 63 × |x| <= 127: two pair sums <= 32004 fit
 *    int16) + vpmaddwd with ones;
 *  - scalar: plain loops over the same layout.
 * From X16R_T tokens of an x tile on (SIMD), q6x_rep_tiles unpacks each pair of groups × 512 k
 * once (q6x_repack) and runs quant_x16.h's shared tile over all the tile's tokens instead.
 * Each output's summation order depends only on K (a K chunk of a large batch goes on from the
 * partial sum in y): bitwise the same for any thread count, batch size or tile. */
#include "quant_gguf.h"
#include "quant_x16.h"

#define Q6X_GB (16 * IFG_Q6_K_BLOCK) /* one group-block: 16 rows × one super-block, 3360 bytes */
#define Q6X_SC 32                    /* offsets in a group-block: the int8 scales, */
#define Q6X_QL 288                   /* the low nibbles (256 bytes per 32 k), */
#define Q6X_QH 2336                  /* the high 2-bit parts (128 bytes per 32 k) */
#define Q6X_NS (X16R_TB * X16_K / 16) /* 16-k sums of a tile (x16r_plan's are the largest) */

/* o[i * ld + j] = 32 · Σ of token i's int8 over k = 16j..16j+15 of the tile. */
static void q6x_sums(int32_t *o, int ld, const struct x16_tile *xt, int tt, int kw) {
    for (int i = 0; i < tt; i++)
        for (int j = 0; j < kw / 16; j++) {
            const int8_t *q = xt->q + (size_t)i * xt->ldq + 16 * j;
            int32_t s = 0;
            for (int k = 0; k < 16; k++) s += q[k];
            o[i * ld + j] = 32 * s;
        }
}

#ifndef IFG_SIMD
/* ---- scalar reference (the scalar build) ---- */
/* Level (0..63) of row r, element k (0..255) of group-block gb. */
static int q6x_level(const uint8_t *gb, int r, int k) {
    const int c = k / 32, e = k % 32;
    const int lo = x16_nibble(gb + Q6X_QL + 256 * c, r, e);
    const int hb = gb[Q6X_QH + 128 * c + 64 * (e % 8 / 4) + 4 * r + e % 4];
    return lo | (hb >> (2 * (e / 8)) & 3) << 4;
}
static void q6x_tiles(float *y, int ldy, const struct x16_tile *xt, const int32_t *xs, int lds,
                      const uint8_t *w, size_t gstride, int t, int tt, int n0, int n1, int nsb, int add) {
    for (int n = n0; n < n1; n++) {
        const int r = n % 16;
        const uint8_t *wg = w + (size_t)(n / 16) * gstride;
        for (int i = 0; i < tt; i++) {
            float *yo = y + (size_t)(t + i) * ldy + n;
            float acc = add ? *yo : 0.0f; /* a K chunk after the first, or accumulate: the sum goes on from y */
            for (int b = 0; b < nsb; b++) {
                const uint8_t *gb = wg + (size_t)b * Q6X_GB;
                uint16_t h;
                memcpy(&h, gb + 2 * r, 2);
                const float d = ifg_f16_to_f32(h);
                for (int s = 0; s < 16; s++) {
                    const int8_t *xq = xt->q + (size_t)i * xt->ldq + 256 * b + 16 * s;
                    int32_t dot = 0;
                    for (int k = 0; k < 16; k++) dot += q6x_level(gb, r, 16 * s + k) * xq[k];
                    dot -= xs[i * lds + 16 * b + s];
                    const float sc = (float)(int8_t)gb[Q6X_SC + 16 * s + r];
                    acc += (float)dot * ((d * sc) * xt->d[i * xt->ldd + 8 * b + s / 2]);
                }
            }
            *yo = acc;
        }
    }
}
#else
/* ---- SIMD ---- */
#if defined(IFG_AVX512)
#define Q6T 8  /* tokens per register tile (prefill) */
typedef __m512i q6v;
IFG_AI q6v q6v_load(const uint8_t *p) { return _mm512_loadu_si512((const void *)p); }
IFG_AI q6v q6v_and(q6v a, q6v b) { return _mm512_and_si512(a, b); }
IFG_AI q6v q6v_or(q6v a, q6v b) { return _mm512_or_si512(a, b); }
IFG_AI q6v q6v_srl(q6v a, int n) { return _mm512_srli_epi16(a, n); }
IFG_AI q6v q6v_sll(q6v a, int n) { return _mm512_slli_epi16(a, n); }
IFG_AI q6v q6v_set8(int v) { return _mm512_set1_epi8((char)v); }
IFG_AI void q6v_store(uint8_t *p, q6v a) { _mm512_store_si512((void *)p, a); }
#else
#define Q6T 2
typedef __m256i q6v;
IFG_AI q6v q6v_load(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
IFG_AI q6v q6v_and(q6v a, q6v b) { return _mm256_and_si256(a, b); }
IFG_AI q6v q6v_or(q6v a, q6v b) { return _mm256_or_si256(a, b); }
IFG_AI q6v q6v_srl(q6v a, int n) { return _mm256_srli_epi16(a, n); }
IFG_AI q6v q6v_sll(q6v a, int n) { return _mm256_slli_epi16(a, n); }
IFG_AI q6v q6v_set8(int v) { return _mm256_set1_epi8((char)v); }
IFG_AI void q6v_store(uint8_t *p, q6v a) { _mm256_store_si256((__m256i *)p, a); }
#endif

/* The levels (0..63) of chunk v (0..3) of 32-block c for the rows at byte offset o (0; AVX2's
 * second half: 32): low nibbles k = 8v + j in *lo, high k = 8v + 4 + j in *hi. The 2-bit parts
 * of chunk v sit at bits 2v..2v+1 and go to bits 4..5 (16-bit shifts: what crosses a byte is
 * masked off). */
IFG_AI void q6x_levels(const uint8_t *gb, int c, int v, int o, q6v *lo, q6v *hi) {
    const q6v raw = q6v_load(gb + Q6X_QL + 256 * c + 64 * v + o), m4 = q6v_set8(0x0F), m30 = q6v_set8(0x30);
    q6v h0 = q6v_load(gb + Q6X_QH + 128 * c + o), h1 = q6v_load(gb + Q6X_QH + 128 * c + 64 + o);
    if (v == 0) { h0 = q6v_sll(h0, 4); h1 = q6v_sll(h1, 4); }
    else if (v == 1) { h0 = q6v_sll(h0, 2); h1 = q6v_sll(h1, 2); }
    else if (v == 3) { h0 = q6v_srl(h0, 2); h1 = q6v_srl(h1, 2); }
    *lo = q6v_or(q6v_and(raw, m4), q6v_and(h0, m30));
    *hi = q6v_or(q6v_and(q6v_srl(raw, 4), m4), q6v_and(h1, m30));
}

#if defined(IFG_AVX512)
/* TT tokens (tile rows i0..) × one group (rows n..n+15). */
IFG_AI void q6x_tile(float *y, int ldy, const struct x16_tile *xt, const int32_t *xs, int lds, const uint8_t *w,
                     size_t gstride, int t, int i0, int n, int nsb, int add, const int TT, const int PF) {
    __m512 acc[Q6T];
    const int ldq = xt->ldq, ldd = xt->ldd, G = 1, pf = PF && i0 == 0 ? xt->pf : 0;
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++) acc[i] = add ? _mm512_loadu_ps(y + (size_t)(t + i0 + i) * ldy + n) : _mm512_setzero_ps();
    for (int b = 0; b < nsb; b++) {
        const uint8_t *gb[1] = {w + (size_t)(n / 16) * gstride + (size_t)b * Q6X_GB};
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)gb[0]));
        for (int s = 0; s < 16; s++) {
            const __m512 ws = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                   _mm_loadu_si128((const __m128i *)(gb[0] + Q6X_SC + 16 * s)))));
            __m512i ia[Q6T];
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++) ia[i] = _mm512_setzero_si512();
            const int8_t *xb = xt->q + (size_t)i0 * ldq + 256 * b + 16 * s;
#pragma GCC unroll 2
            for (int u = 0; u < 2; u++) {
                const int v = 2 * (s % 2) + u;
                X16_PREFETCH(gb, Q6X_QL + 256 * (s / 2) + 64 * v);
                X16_PREFETCH(gb, Q6X_QH + 128 * (s / 2) + 64 * u);
                __m512i lo, hi;
                q6x_levels(gb[0], s / 2, v, 0, &lo, &hi);
#pragma GCC unroll 8
                for (int i = 0; i < TT; i++) {
                    const __m512i xl = _mm512_set1_epi32(ifg_x4(xb + (size_t)i * ldq + 8 * u));
                    const __m512i xh = _mm512_set1_epi32(ifg_x4(xb + (size_t)i * ldq + 8 * u + 4));
                    ia[i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ia[i], lo, xl), hi, xh);
                }
            }
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++) {
                const __m512i dot = _mm512_sub_epi32(ia[i], _mm512_set1_epi32(xs[(i0 + i) * lds + 16 * b + s]));
                const __m512 dx = _mm512_set1_ps(xt->d[(i0 + i) * ldd + 8 * b + s / 2]);
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, dx), acc[i]);
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++) {
        _mm512_storeu_ps(y + (size_t)(t + i0 + i) * ldy + n, acc[i]);
    }
}

#else /* AVX2: a group as two 8-row halves */
IFG_AI void q6x_tile(float *y, int ldy, const struct x16_tile *xt, const int32_t *xs, int lds, const uint8_t *w,
                     size_t gstride, int t, int i0, int n, int nsb, int add, const int TT, const int PF) {
    __m256 acc[Q6T][2];
    const int ldq = xt->ldq, ldd = xt->ldd, G = 1, pf = PF && i0 == 0 ? xt->pf : 0;
    const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
        for (int h = 0; h < 2; h++)
            acc[i][h] = add ? _mm256_loadu_ps(y + (size_t)(t + i0 + i) * ldy + n + 8 * h) : _mm256_setzero_ps();
    for (int b = 0; b < nsb; b++) {
        const uint8_t *gb[1] = {w + (size_t)(n / 16) * gstride + (size_t)b * Q6X_GB};
        __m256 d[2];
        for (int h = 0; h < 2; h++) d[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb[0] + 16 * h)));
        for (int s = 0; s < 16; s++) {
            __m256 ws[2];
            __m256i ia[Q6T][2];
            for (int h = 0; h < 2; h++)
                ws[h] = _mm256_mul_ps(d[h], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                               _mm_loadl_epi64((const __m128i *)(gb[0] + Q6X_SC + 16 * s + 8 * h)))));
            const int8_t *xb = xt->q + (size_t)i0 * ldq + 256 * b + 16 * s;
#pragma GCC unroll 2
            for (int u = 0; u < 2; u++) {
                const int v = 2 * (s % 2) + u;
                X16_PREFETCH(gb, Q6X_QL + 256 * (s / 2) + 64 * v);
                X16_PREFETCH(gb, Q6X_QH + 128 * (s / 2) + 64 * u);
                __m256i lo[2], hi[2];
                for (int h = 0; h < 2; h++) q6x_levels(gb[0], s / 2, v, 32 * h, &lo[h], &hi[h]);
#pragma GCC unroll 8
                for (int i = 0; i < TT; i++) {
                    const __m256i xl = _mm256_set1_epi32(ifg_x4(xb + (size_t)i * ldq + 8 * u));
                    const __m256i xh = _mm256_set1_epi32(ifg_x4(xb + (size_t)i * ldq + 8 * u + 4));
                    for (int h = 0; h < 2; h++) {
                        const __m256i p = _mm256_madd_epi16(
                            _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], xl), _mm256_maddubs_epi16(hi[h], xh)), ones);
                        ia[i][h] = u == 0 ? p : _mm256_add_epi32(ia[i][h], p);
                    }
                }
            }
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++) {
                const __m256i o = _mm256_set1_epi32(xs[(i0 + i) * lds + 16 * b + s]);
                const __m256 dx = _mm256_set1_ps(xt->d[(i0 + i) * ldd + 8 * b + s / 2]);
                for (int h = 0; h < 2; h++)
                    acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(ia[i][h], o)),
                                                _mm256_mul_ps(ws[h], dx), acc[i][h]);
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
        for (int h = 0; h < 2; h++) {
            _mm256_storeu_ps(y + (size_t)(t + i0 + i) * ldy + n + 8 * h, acc[i][h]);
        }
}
#endif

/* ---- decode (one token): a function of its own (compiled among the prefill tiles, q4_k's GEMV
 * streamed ~30 % slower), the prefill tiles' float steps in their order (a token's output is
 * bitwise the same in a batch as alone), fewer instructions per weight byte: a 32-block's two
 * vectors of 2-bit parts are loaded once for its four chunks of low nibbles. ---- */
#ifndef Q6X_PFD
#define Q6X_PFD Q6X_GB /* prefetch distance: the same place one group-block on (the low nibbles and the
                          2-bit parts are two regions of it: a fixed byte distance runs ahead in one
                          and lags in the other) */
#endif
#if defined(IFG_AVX512)
#ifndef Q6G1
#define Q6G1 2 /* groups in flight (4: 12 streams of weights, ~10 % slower from DRAM) */
#endif
/* The 2-bit parts of chunk v (bits 2v..2v+1 of each byte of h) at bits 4..5, the rest zero
 * (16-bit shifts: what crosses a byte is masked off). */
IFG_AI __m512i q6x_h4(__m512i h, const int v) {
    const __m512i m30 = _mm512_set1_epi8(0x30);
    return _mm512_and_si512(v == 0 ? _mm512_slli_epi16(h, 4) : v == 1 ? _mm512_slli_epi16(h, 2)
                            : v == 2 ? h : _mm512_srli_epi16(h, 2), m30);
}

IFG_AI void q6x_dtile(float *y, const struct x16_tile *xt, const int32_t *xs, const uint8_t *w, size_t gstride,
                      int n, int nsb, int add, const int G, const int PF) {
    __m512 acc[Q6G1];
    const __m512i m4 = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) acc[g] = add ? _mm512_loadu_ps(y + n + 16 * g) : _mm512_setzero_ps();
    for (int b = 0; b < nsb; b++) {
        const uint8_t *gb[Q6G1];
        __m512 d[Q6G1];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            gb[g] = w + (size_t)(n / 16 + g) * gstride + (size_t)b * Q6X_GB;
            d[g] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)gb[g]));
#pragma GCC unroll 5
            for (int j = 0; j < 5; j++) _mm_prefetch((const char *)gb[g] + Q6X_PFD + 64 * j, X16_PF_HINT(PF));
        }
        for (int c = 0; c < 8; c++) {
            __m512i h0[Q6G1], h1[Q6G1];
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
                const uint8_t *qh = gb[g] + Q6X_QH + 128 * c;
                _mm_prefetch((const char *)qh + Q6X_PFD, X16_PF_HINT(PF));
                _mm_prefetch((const char *)qh + Q6X_PFD + 64, X16_PF_HINT(PF));
                h0[g] = _mm512_loadu_si512((const void *)qh);
                h1[g] = _mm512_loadu_si512((const void *)(qh + 64));
            }
#pragma GCC unroll 2
            for (int u = 0; u < 2; u++) {
                const int s = 2 * c + u;
                const int8_t *xb = xt->q + 256 * b + 16 * s;
                const __m512i o = _mm512_set1_epi32(xs[16 * b + s]);
                const __m512 dx = _mm512_set1_ps(xt->d[8 * b + c]);
                __m512i ia[Q6G1];
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) ia[g] = _mm512_setzero_si512();
#pragma GCC unroll 2
                for (int e = 0; e < 2; e++) {
                    const int v = 2 * u + e;
                    const __m512i xl = _mm512_set1_epi32(ifg_x4(xb + 8 * e)), xh = _mm512_set1_epi32(ifg_x4(xb + 8 * e + 4));
#pragma GCC unroll 8
                    for (int g = 0; g < G; g++) {
                        const uint8_t *ql = gb[g] + Q6X_QL + 256 * c + 64 * v;
                        _mm_prefetch((const char *)ql + Q6X_PFD, X16_PF_HINT(PF));
                        const __m512i raw = _mm512_loadu_si512((const void *)ql);
                        const __m512i lo = _mm512_or_si512(_mm512_and_si512(raw, m4), q6x_h4(h0[g], v));
                        const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(raw, 4), m4), q6x_h4(h1[g], v));
                        ia[g] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ia[g], lo, xl), hi, xh);
                    }
                }
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) {
                    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                        _mm_loadu_si128((const __m128i *)(gb[g] + Q6X_SC + 16 * s))));
                    acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(ia[g], o)),
                                             _mm512_mul_ps(_mm512_mul_ps(d[g], sc), dx), acc[g]);
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) _mm512_storeu_ps(y + n + 16 * g, acc[g]);
}
#else /* AVX2: a group as two 8-row halves */
#ifndef Q6G1
#define Q6G1 2 /* groups in flight (1: ~10-20 % slower from DRAM) */
#endif
IFG_AI __m256i q6x_h4(__m256i h, const int v) {
    const __m256i m30 = _mm256_set1_epi8(0x30);
    return _mm256_and_si256(v == 0 ? _mm256_slli_epi16(h, 4) : v == 1 ? _mm256_slli_epi16(h, 2)
                            : v == 2 ? h : _mm256_srli_epi16(h, 2), m30);
}

IFG_AI void q6x_dtile(float *y, const struct x16_tile *xt, const int32_t *xs, const uint8_t *w, size_t gstride,
                      int n, int nsb, int add, const int G, const int PF) {
    __m256 acc[2 * Q6G1];
    const int H = 2 * G;
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
#pragma GCC unroll 8
    for (int h = 0; h < H; h++) acc[h] = add ? _mm256_loadu_ps(y + n + 8 * h) : _mm256_setzero_ps();
    for (int b = 0; b < nsb; b++) {
        const uint8_t *gb[Q6G1];
        __m256 d[2 * Q6G1];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            gb[g] = w + (size_t)(n / 16 + g) * gstride + (size_t)b * Q6X_GB;
#pragma GCC unroll 5
            for (int j = 0; j < 5; j++) _mm_prefetch((const char *)gb[g] + Q6X_PFD + 64 * j, X16_PF_HINT(PF));
        }
#pragma GCC unroll 8
        for (int h = 0; h < H; h++) d[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb[h / 2] + 16 * (h % 2))));
        for (int c = 0; c < 8; c++) {
            __m256i h0[2 * Q6G1], h1[2 * Q6G1];
#pragma GCC unroll 8
            for (int h = 0; h < H; h++) {
                const uint8_t *qh = gb[h / 2] + Q6X_QH + 128 * c + 32 * (h % 2);
                if (h % 2 == 0) {
                    _mm_prefetch((const char *)qh + Q6X_PFD, X16_PF_HINT(PF));
                    _mm_prefetch((const char *)qh + Q6X_PFD + 64, X16_PF_HINT(PF));
                }
                h0[h] = _mm256_loadu_si256((const __m256i *)qh);
                h1[h] = _mm256_loadu_si256((const __m256i *)(qh + 64));
            }
#pragma GCC unroll 2
            for (int u = 0; u < 2; u++) {
                const int s = 2 * c + u;
                const int8_t *xb = xt->q + 256 * b + 16 * s;
                __m256i ia[2 * Q6G1];
#pragma GCC unroll 2
                for (int e = 0; e < 2; e++) {
                    const int v = 2 * u + e;
                    const __m256i xl = _mm256_set1_epi32(ifg_x4(xb + 8 * e)), xh = _mm256_set1_epi32(ifg_x4(xb + 8 * e + 4));
#pragma GCC unroll 8
                    for (int h = 0; h < H; h++) {
                        const uint8_t *ql = gb[h / 2] + Q6X_QL + 256 * c + 64 * v + 32 * (h % 2);
                        if (h % 2 == 0) _mm_prefetch((const char *)ql + Q6X_PFD, X16_PF_HINT(PF));
                        const __m256i raw = _mm256_loadu_si256((const __m256i *)ql);
                        const __m256i lo = _mm256_or_si256(_mm256_and_si256(raw, m4), q6x_h4(h0[h], v));
                        const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), q6x_h4(h1[h], v));
                        const __m256i p = _mm256_madd_epi16(
                            _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)), ones);
                        ia[h] = e == 0 ? p : _mm256_add_epi32(ia[h], p);
                    }
                }
                const __m256i o = _mm256_set1_epi32(xs[16 * b + s]);
                const __m256 dx = _mm256_set1_ps(xt->d[8 * b + c]);
#pragma GCC unroll 8
                for (int h = 0; h < H; h++) {
                    const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                        _mm_loadl_epi64((const __m128i *)(gb[h / 2] + Q6X_SC + 16 * s + 8 * (h % 2)))));
                    acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(ia[h], o)),
                                             _mm256_mul_ps(_mm256_mul_ps(d[h], sc), dx), acc[h]);
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int h = 0; h < H; h++) _mm256_storeu_ps(y + n + 8 * h, acc[h]);
}
#endif

/* Token t's outputs [n0, n1) (a multiple of 16 each), Q6G1 groups at a time. */
IFG_AI void q6x_gemv_t(float *yt, const struct x16_tile *xt, const int32_t *xs, const uint8_t *w, size_t gstride,
                       int n0, int n1, int nsb, int add, const int PF) {
    int n = n0;
    for (; n + 16 * Q6G1 <= n1; n += 16 * Q6G1) q6x_dtile(yt, xt, xs, w, gstride, n, nsb, add, Q6G1, PF);
    for (; n < n1; n += 16) q6x_dtile(yt, xt, xs, w, gstride, n, nsb, add, 1, PF);
}
__attribute__((noinline)) static void q6x_gemv(float *y, int ldy, const struct x16_tile *xt, const int32_t *xs,
                                               const uint8_t *w, size_t gstride, int t, int n0, int n1, int nsb, int add) {
    if (ifg_prefetch_level() == 2) q6x_gemv_t(y + (size_t)t * ldy, xt, xs, w, gstride, n0, n1, nsb, add, 2);
    else q6x_gemv_t(y + (size_t)t * ldy, xt, xs, w, gstride, n0, n1, nsb, add, 1);
}

IFG_AI void q6x_tiles_t(float *y, int ldy, const struct x16_tile *xt, const int32_t *xs, int lds, const uint8_t *w,
                        size_t gstride, int t, int tt, int n0, int n1, int nsb, int add, const int PF) {
    for (int n = n0; n < n1; n += 16)
        for (int i0 = 0; i0 < tt; i0 += Q6T) {
            const int r = tt - i0;
#define Q6X_CASE(TTC) q6x_tile(y, ldy, xt, xs, lds, w, gstride, t, i0, n, nsb, add, TTC, PF)
            X16_TSWITCH(r, Q6T, Q6X_CASE);
#undef Q6X_CASE
        }
}
/* nsb (<= X16R_K / 256) group-blocks from gb0 into group g of rp (quant_x16.h): the 6-bit
 * levels as bytes (q6x_levels, k order) and per 16-weight sub-block d*sc, lane by lane
 * q6x_tile's product. */
static void q6x_repack(struct x16_rep *rp, int g, const uint8_t *gb0, int nsb) {
    for (int b = 0; b < nsb; b++) {
        const uint8_t *gb = gb0 + (size_t)b * Q6X_GB;
        for (int h = 0; h < 2; h++) {
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb + 16 * h)));
            for (int s = 0; s < 16; s++)
                _mm256_store_ps(rp->ws[g][16 * b + s] + 8 * h, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                                    _mm_loadl_epi64((const __m128i *)(gb + Q6X_SC + 16 * s + 8 * h))))));
        }
        for (int c = 0; c < 8; c++)
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) /* chunk v: k = 8v + j (lo), 8v + 4 + j (hi) of 32-block c */
                for (int o = 0; o < 64; o += (int)sizeof(q6v)) {
                    q6v lo, hi;
                    q6x_levels(gb, c, v, o, &lo, &hi);
                    q6v_store(rp->lv[g] + 64 * (8 * (8 * b + c) + 2 * v) + o, lo);
                    q6v_store(rp->lv[g] + 64 * (8 * (8 * b + c) + 2 * v + 1) + o, hi);
                }
    }
}

/* Large batches (tt >= X16R_T): each X16R_G groups' K piece repacked once, then every token of
 * the x tile against it (a function of its own, away from the decode tile). */
__attribute__((noinline)) static void q6x_rep_tiles(float *y, int ldy, const struct x16_tile *xt, const int32_t *xs,
                                                    int lds, const uint8_t *w, size_t gstride, int t, int tt, int n0,
                                                    int n1, int nsb, int add) {
    struct x16_rep rp;
    const int PB = X16R_K / 256; /* group-blocks per piece */
    for (int n = n0; n < n1; n += 16 * X16R_G) {
        const int ng = (n1 - n) / 16 < X16R_G ? (n1 - n) / 16 : X16R_G;
        for (int b0 = 0; b0 < nsb; b0 += PB) {
            const int nb = nsb - b0 < PB ? nsb - b0 : PB;
            for (int g = 0; g < ng; g++) q6x_repack(&rp, g, w + (size_t)(n / 16 + g) * gstride + (size_t)b0 * Q6X_GB, nb);
            x16r_tiles(y, ldy, xt, xs, lds, &rp, ng, t, tt, n, 256 * b0, 16 * nb, add || b0 > 0, 16, 0, 6);
        }
    }
}

static void q6x_tiles(float *y, int ldy, const struct x16_tile *xt, const int32_t *xs, int lds,
                      const uint8_t *w, size_t gstride, int t, int tt, int n0, int n1, int nsb, int add) {
    if (tt == 1) q6x_gemv(y, ldy, xt, xs, w, gstride, t, n0, n1, nsb, add);
    else if (tt >= X16R_T) q6x_rep_tiles(y, ldy, xt, xs, lds, w, gstride, t, tt, n0, n1, nsb, add);
    else if (xt->pf) q6x_tiles_t(y, ldy, xt, xs, lds, w, gstride, t, tt, n0, n1, nsb, add, 1);
    else q6x_tiles_t(y, ldy, xt, xs, lds, w, gstride, t, tt, n0, n1, nsb, add, 0);
}
#endif

void ifg_q6k_mm_x16_rows(float *y, int ldy, const float *x, int ldx, const void *w, int T, int r0, int r1,
                         int K, int accumulate, const struct ifg_xq *xq) {
    struct x16_tile xt;
    int32_t xs[Q6X_NS];
    const size_t gstride = (size_t)(K / 256) * Q6X_GB;
    int tb, kw;
    xt.pf = x16r_plan(T, K, xq, &tb, &kw);
    for (int t = 0; t < T; t += tb) {
        const int tt = T - t < tb ? T - t : tb;
        for (int k0 = 0; k0 < K; k0 += kw) {
            const int k1 = k0 + kw < K ? k0 + kw : K, add = accumulate || k0 > 0;
            x16_fill(&xt, xq, x, ldx, t, tt, k0, k1, kw);
            q6x_sums(xs, (k1 - k0) / 16, &xt, tt, k1 - k0);
            q6x_tiles(y, ldy, &xt, xs, (k1 - k0) / 16, (const uint8_t *)w + (size_t)(k0 / 256) * Q6X_GB, gstride,
                      t, tt, r0, r1, (k1 - k0) / 256, add);
        }
    }
}

/* Row r's GGUF q6_k block s into group-block o (layout in quant_gguf.h). */
static void q6x_put(uint8_t *o, const uint8_t *s, int r) {
    memcpy(o + 2 * r, s + 208, 2);
    for (int sb = 0; sb < 16; sb++) o[Q6X_SC + 16 * sb + r] = s[192 + sb];
    uint8_t u[256];
    for (int h = 0; h < 2; h++) /* the levels in element order (q6_k.py's layout) */
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                u[128 * h + 32 * c + l] = (uint8_t)((s[64 * h + 32 * (c & 1) + l] >> (4 * (c >> 1)) & 0x0F) |
                                                    (s[128 + 32 * h + l] >> (2 * c) & 3) << 4);
    for (int c = 0; c < 8; c++)
        for (int j = 0; j < 4; j++) {
            uint8_t h0 = 0, h1 = 0;
            for (int v = 0; v < 4; v++) {
                const uint8_t a = u[32 * c + 8 * v + j], b = u[32 * c + 8 * v + 4 + j];
                o[Q6X_QL + 256 * c + 64 * v + 4 * r + j] = (uint8_t)((a & 15) | (b & 15) << 4);
                h0 |= (uint8_t)((a >> 4) << (2 * v));
                h1 |= (uint8_t)((b >> 4) << (2 * v));
            }
            o[Q6X_QH + 128 * c + 4 * r + j] = h0;
            o[Q6X_QH + 128 * c + 64 + 4 * r + j] = h1;
        }
}

void ifg_q6_k_interleave(void *dst, const void *src, int N, int K, int n_threads) {
    x16_interleave(dst, src, N, K / 256, IFG_Q6_K_BLOCK, q6x_put, n_threads);
}
