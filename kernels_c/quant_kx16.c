/* quant_kx16.c — y (=|+=) x · Wᵀ for q4_k and q5_k weights in the 16-row interleaved layouts
 * (IFG_Q4_KX16, layout in quant_k.h; IFG_Q5_KX16, quant_gguf.h), and the repacks into them from
 * GGUF order. q5_k is q4_k's layout plus a plane of 5th bits (one 64-byte vector per sub-block,
 * OR'd into bit 4 of the levels; the kernels below take it as the constant Q5).
 *
 * The same scheme as quant_x16.c (q4_0x16), with q4_k's two-level scales: x is quantized per
 * token and 32-block (ifg_quantize_x, as for every int8 kernel) into a stack tile of X16_T tokens
 * × X16_K k (decode, T == 1: the whole row, one pass over W). Per 16-row group and super-block,
 * one 64-byte load gives the 16 rows' d and dmin; per sub-block s, 16 + 16 bytes give the 16
 * rows' 6-bit scales and mins, turned into two 16-lane f32 vectors d*sc and dmin*m once for all
 * tokens of the tile. Then per token and sub-block:
 *  - AVX-512 (VNNI): 8 vpdpbusd (4 loads of 16 rows × 8 k of nibbles, low and high halves
 *    against x's 4 int8 broadcast; levels are unsigned 0..15, as vpdpbusd wants) into a zeroed
 *    int32 vector, one convert, one FMA with d*sc * d_x, one FMA with -(dmin*m) * d_x*sum(q_x);
 *    the scale bytes of 4 sub-blocks are unpacked in one 512-bit pass; decode has its own tile
 *    (kx_tile1) with fewer instructions per weight byte;
 *  - AVX2: the same on two 8-row halves, vpmaddubsw(nibbles, x) for low and high, summed in
 *    int16 over the sub-block (<= 8 * 2*15*127: no overflow), one vpmaddwd with ones;
 *  - scalar: plain loops over the same layout.
 * From X16R_T tokens of an x tile on (SIMD), kx_rep_tiles unpacks each pair of groups × 512 k
 * once (kx_repack) and runs quant_x16.h's shared tile over all the tile's tokens instead.
 * The 16 rows of a group are 16 consecutive outputs: no horizontal sums. Each output's
 * summation order depends only on K (a K chunk of a large batch goes on from the partial sum in
 * y), never on the thread, the batch size or the tile: bitwise the same for any of them. */
#include "quant_k.h"
#include "quant_gguf.h"
#include "quant_x16.h"

#define KX_GB (16 * IFG_Q4_K_BLOCK) /* one group-block: 16 rows × one super-block, 2304 bytes */
#define KX_GB5 (16 * IFG_Q5_K_BLOCK) /* q5_k's: 2816 bytes, the 5th bits at KX_GB */
#define KX_GBQ(Q5) ((Q5) ? KX_GB5 : KX_GB)

#ifndef IFG_SIMD
/* ---- scalar reference (the scalar build) ---- */
static void kx_tiles_ref(float *y, int ldy, const struct x16_tile *xt, const uint8_t *w, size_t gstride,
                     int t, int tt, int n0, int n1, int nsb, int add, int Q5) {
    for (int n = n0; n < n1; n++) {
        const int r = n % 16;
        const uint8_t *wg = w + (size_t)(n / 16) * gstride;
        for (int i = 0; i < tt; i++) {
            float *yo = y + (size_t)(t + i) * ldy + n;
            float acc = add ? *yo : 0.0f;
            for (int b = 0; b < nsb; b++) {
                const uint8_t *gb = wg + (size_t)b * KX_GBQ(Q5);
                uint16_t h;
                memcpy(&h, gb + 2 * r, 2);
                const float d = ifg_f16_to_f32(h);
                memcpy(&h, gb + 32 + 2 * r, 2);
                const float dmin = ifg_f16_to_f32(h);
                for (int s = 0; s < 8; s++) {
                    const int lo = gb[64 + 16 * s + r], hi = gb[192 + 16 * (s / 2) + r] >> (4 * (s & 1));
                    const int sc = (lo & 15) | (hi & 3) << 4, m = lo >> 4 | (hi & 12) << 2;
                    const int8_t *xq = xt->q + (size_t)i * xt->ldq + 256 * b + 32 * s;
                    const uint8_t *qs = gb + 256 + 256 * s;
                    int32_t dot = 0;
                    for (int k = 0; k < 32; k++) {
                        const int hb = Q5 ? (gb[KX_GB + 64 * s + 4 * r + k % 4] >> (k / 4) & 1) << 4 : 0;
                        dot += (int32_t)(x16_nibble(qs, r, k) | hb) * xq[k];
                    }
                    const int xb = i * xt->ldd + 8 * b + s;
                    acc += (float)dot * ((d * (float)sc) * xt->d[xb]) - (dmin * (float)m) * (xt->d[xb] * (float)xt->s[xb]);
                }
            }
            *yo = acc;
        }
    }
}
#define kx_tiles kx_tiles_ref /* the same arguments, q5 last */
#else
/* ---- SIMD: per-ISA register tiles (VNNI against AVX2's vpmaddubsw) ---- */

/* 8 rows' (half h of the group) scale and min of sub-block s as f32 lanes: 64-bit SWAR. */
IFG_AI void kx_scales8(const uint8_t *gb, int s, int h, __m256 *sc, __m256 *mn) {
    uint64_t lo, hi;
    memcpy(&lo, gb + 64 + 16 * s + 8 * h, 8);
    memcpy(&hi, gb + 192 + 16 * (s / 2) + 8 * h, 8);
    hi >>= 4 * (s & 1);
    const uint64_t b4 = 0x0f0f0f0f0f0f0f0full;
    const uint64_t a = (lo & b4) | (hi & 0x0303030303030303ull) << 4;
    const uint64_t m = (lo >> 4 & b4) | (hi & 0x0c0c0c0c0c0c0c0cull) << 2;
    *sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)a)));
    *mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)m)));
}

/* nsb (<= X16R_K / 256) group-blocks from gb0 into group g of rp (quant_x16.h): the levels as
 * bytes (q5_k with its 5th bit), and per sub-block the products d*sc and dmin*m that kx_tile
 * forms, lane by lane the same multiplications (256-bit steps on either ISA: paid once per x tile). */
IFG_AI void kx_repack(struct x16_rep *rp, int g, const uint8_t *gb0, int nsb, const int Q5) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int b = 0; b < nsb; b++) {
        const uint8_t *gb = gb0 + (size_t)b * KX_GBQ(Q5);
        __m256 dv[2], mv[2];
        for (int h = 0; h < 2; h++) {
            dv[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb + 16 * h)));
            mv[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb + 32 + 16 * h)));
        }
        for (int s = 0; s < 8; s++) {
            const int u = 8 * b + s;
            for (int h = 0; h < 2; h++) {
                __m256 sc, mn;
                kx_scales8(gb, s, h, &sc, &mn);
                _mm256_store_ps(rp->ws[g][u] + 8 * h, _mm256_mul_ps(dv[h], sc));
                _mm256_store_ps(rp->wm[g][u] + 8 * h, _mm256_mul_ps(mv[h], mn));
                const __m256i hb = Q5 ? _mm256_loadu_si256((const __m256i *)(gb + KX_GB + 64 * s + 32 * h)) : m4;
#pragma GCC unroll 4
                for (int v = 0; v < 4; v++) { /* chunk v: k = 8v + j low nibbles, 8v + 4 + j high */
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(gb + 256 + 256 * s + 64 * v + 32 * h));
                    __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                    if (Q5) {
                        lo = _mm256_or_si256(lo, x16_bit4_256(hb, 2 * v));
                        hi = _mm256_or_si256(hi, x16_bit4_256(hb, 2 * v + 1));
                    }
                    _mm256_store_si256((__m256i *)(rp->lv[g] + 64 * (8 * u + 2 * v) + 32 * h), lo);
                    _mm256_store_si256((__m256i *)(rp->lv[g] + 64 * (8 * u + 2 * v + 1) + 32 * h), hi);
                }
            }
        }
    }
}

/* Large batches (tt >= X16R_T): each X16R_G groups' K piece repacked once, then every token of
 * the x tile against it. A function of its own, as the decode tiles are. */
__attribute__((noinline)) static void kx_rep_tiles(float *y, int ldy, const struct x16_tile *xt, const uint8_t *w,
                                                   size_t gstride, int t, int tt, int n0, int n1, int nsb, int add,
                                                   int q5) {
    struct x16_rep rp;
    const int PB = X16R_K / IFG_QK_K; /* group-blocks per piece */
    for (int n = n0; n < n1; n += 16 * X16R_G) {
        const int ng = (n1 - n) / 16 < X16R_G ? (n1 - n) / 16 : X16R_G;
        for (int b0 = 0; b0 < nsb; b0 += PB) {
            const int nb = nsb - b0 < PB ? nsb - b0 : PB, more = add || b0 > 0; /* later pieces go on from y */
            for (int g = 0; g < ng; g++) {
                const uint8_t *gb = w + (size_t)(n / 16 + g) * gstride + (size_t)b0 * KX_GBQ(q5);
                if (q5) kx_repack(&rp, g, gb, nb, 1);
                else kx_repack(&rp, g, gb, nb, 0);
            }
            if (q5) x16r_tiles(y, ldy, xt, NULL, 0, &rp, ng, t, tt, n, IFG_QK_K * b0, 8 * nb, more, 32, 1, 5);
            else x16r_tiles(y, ldy, xt, NULL, 0, &rp, ng, t, tt, n, IFG_QK_K * b0, 8 * nb, more, 32, 1, 4);
        }
    }
}

#if defined(IFG_AVX512)
#define KXT 8  /* tokens per register tile (prefill): the per-group scale work is shared by 8 */
#define KXG 1  /* groups per register tile (prefill) */
#define KXG1 4 /* groups per register tile (one token: more independent weight streams) */
/* The 6-bit scales and mins of sub-blocks 4h..4h+3 of a group-block, as bytes: sc[16s' + r],
 * mn[16s' + r] (s' = s - 4h). One pass over 64 + 32 bytes for 64 values each. */
IFG_AI void kx_scales4(const uint8_t *gb, int h, uint8_t *sc, uint8_t *mn) {
    const __m512i lo = _mm512_loadu_si512((const void *)(gb + 64 + 64 * h));
    const __m512i h2 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(gb + 192 + 32 * h)));
    /* 128-bit lane s' needs the high bits of pair s'/2, in its high nibbles when s' is odd */
    const __m512i hi = _mm512_srlv_epi64(_mm512_shuffle_i64x2(h2, h2, _MM_SHUFFLE(1, 1, 0, 0)),
                                         _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
    const __m512i m4 = _mm512_set1_epi8(15);
    _mm512_store_si512((void *)sc, _mm512_or_si512(_mm512_and_si512(lo, m4),
                                                   _mm512_slli_epi16(_mm512_and_si512(hi, _mm512_set1_epi8(3)), 4)));
    _mm512_store_si512((void *)mn, _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(lo, 4), m4),
                                                   _mm512_slli_epi16(_mm512_and_si512(hi, _mm512_set1_epi8(12)), 2)));
}

IFG_AI void kx_tile(float *y, int ldy, const struct x16_tile *xt, const uint8_t *w, size_t gstride,
                 int t, int i0, int n, int nsb, int add, const int TT, const int G, const int PF, const int Q5) {
    __m512 acc[KXT][KXG1];
    _Alignas(64) uint8_t scb[KXG1][128], mnb[KXG1][128];
    const int ldq = xt->ldq, ldd = xt->ldd, pf = PF && i0 == 0 ? xt->pf : 0;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) /* a K chunk after the first, or accumulate: the sum goes on from y */
            acc[i][g] = add ? _mm512_loadu_ps(y + (size_t)(t + i0 + i) * ldy + n + 16 * g) : _mm512_setzero_ps();
    for (int b = 0; b < nsb; b++) {
        const uint8_t *gb[KXG1];
        __m512 dv[KXG1], mv[KXG1];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            gb[g] = w + (size_t)(n / 16 + g) * gstride + (size_t)b * KX_GBQ(Q5);
            dv[g] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)gb[g]));
            mv[g] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(gb[g] + 32)));
            kx_scales4(gb[g], 0, scb[g], mnb[g]);
            kx_scales4(gb[g], 1, scb[g] + 64, mnb[g] + 64);
        }
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) X16_PREFETCH(gb, 64 * j); /* the header; the levels as they are read */
#pragma GCC unroll 8
        for (int s = 0; s < 8; s++) {
            __m512 ws[KXG1], wm[KXG1];
            __m512i ia[KXT][KXG1], hb[KXG1];
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
                hb[g] = Q5 ? _mm512_loadu_si512((const void *)(gb[g] + KX_GB + 64 * s)) : _mm512_setzero_si512();
                const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(scb[g] + 16 * s))));
                const __m512 mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(mnb[g] + 16 * s))));
                ws[g] = _mm512_mul_ps(dv[g], sc);
                wm[g] = _mm512_mul_ps(mv[g], mn);
            }
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++)
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) ia[i][g] = _mm512_setzero_si512();
            const int8_t *xb = xt->q + (size_t)i0 * ldq + 256 * b + 32 * s;
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) {
                __m512i lo[KXG1], hi[KXG1];
                X16_PREFETCH(gb, 256 + 256 * s + 64 * v);
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) {
                    const __m512i raw = _mm512_loadu_si512((const void *)(gb[g] + 256 + 256 * s + 64 * v));
                    lo[g] = _mm512_and_si512(raw, m4);
                    hi[g] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
                    if (Q5) {
                        lo[g] = _mm512_or_si512(lo[g], x16_bit4_512(hb[g], 2 * v));
                        hi[g] = _mm512_or_si512(hi[g], x16_bit4_512(hb[g], 2 * v + 1));
                    }
                }
#pragma GCC unroll 8
                for (int i = 0; i < TT; i++) {
                    const __m512i xl = _mm512_set1_epi32(ifg_x4(xb + (size_t)i * ldq + 8 * v));
                    const __m512i xh = _mm512_set1_epi32(ifg_x4(xb + (size_t)i * ldq + 8 * v + 4));
#pragma GCC unroll 8
                    for (int g = 0; g < G; g++)
                        ia[i][g] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ia[i][g], lo[g], xl), hi[g], xh);
                }
            }
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++) {
                const int xi = (i0 + i) * ldd + 8 * b + s;
                const __m512 dx = _mm512_set1_ps(xt->d[xi]), sx = _mm512_set1_ps(xt->d[xi] * (float)xt->s[xi]);
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) {
                    acc[i][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[i][g]), _mm512_mul_ps(ws[g], dx), acc[i][g]);
                    acc[i][g] = _mm512_fnmadd_ps(wm[g], sx, acc[i][g]);
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            _mm512_storeu_ps(y + (size_t)(t + i0 + i) * ldy + n + 16 * g, acc[i][g]);
        }
}

/* Decode (one token), G groups: the same products, fewer instructions per 64 bytes of levels:
 * the high nibbles go to vpdpbusd unshifted (16 × the level: a separate accumulator whose sum
 * is exactly 16 × the dot, shifted back once per sub-block). The float steps are kx_tile's, in
 * its order, so a token's output is bitwise the same in a batch as alone. */
IFG_AI void kx_tile1(float *y, const struct x16_tile *xt, const uint8_t *w, size_t gstride, int t, int ldy,
                  int n, int nsb, int add, const int G, const int PF, const int Q5) {
    __m512 acc[KXG1];
    _Alignas(64) uint8_t scb[KXG1][128], mnb[KXG1][128];
    const __m512i m4 = _mm512_set1_epi8(0x0F), m4h = _mm512_set1_epi8((char)0xF0);
    const int pf = PF ? xt->pf : 0;
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) acc[g] = add ? _mm512_loadu_ps(y + (size_t)t * ldy + n + 16 * g) : _mm512_setzero_ps();
    for (int b = 0; b < nsb; b++) {
        const uint8_t *gb[KXG1];
        __m512 dv[KXG1], mv[KXG1];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            gb[g] = w + (size_t)(n / 16 + g) * gstride + (size_t)b * KX_GBQ(Q5);
            kx_scales4(gb[g], 0, scb[g], mnb[g]);
            kx_scales4(gb[g], 1, scb[g] + 64, mnb[g] + 64);
            dv[g] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)gb[g]));
            mv[g] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(gb[g] + 32)));
        }
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) X16_PREFETCH(gb, 64 * j);
#pragma GCC unroll 8
        for (int s = 0; s < 8; s++) {
            const int8_t *xb = xt->q + 256 * b + 32 * s;
            __m512i il[KXG1], ih[KXG1], hb[KXG1];
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
                il[g] = ih[g] = _mm512_setzero_si512();
                hb[g] = Q5 ? _mm512_loadu_si512((const void *)(gb[g] + KX_GB + 64 * s)) : il[g];
            }
            if (Q5) X16_PREFETCH(gb, KX_GB + 64 * s); /* the 5th bits: a stream of their own */
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) {
                const __m512i xl = _mm512_set1_epi32(ifg_x4(xb + 8 * v)), xh = _mm512_set1_epi32(ifg_x4(xb + 8 * v + 4));
                X16_PREFETCH(gb, 256 + 256 * s + 64 * v);
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) {
                    const __m512i raw = _mm512_loadu_si512((const void *)(gb[g] + 256 + 256 * s + 64 * v));
                    if (Q5) { /* levels up to 31: the high ones shifted down like the low */
                        il[g] = _mm512_dpbusd_epi32(il[g], _mm512_or_si512(_mm512_and_si512(raw, m4), x16_bit4_512(hb[g], 2 * v)), xl);
                        ih[g] = _mm512_dpbusd_epi32(ih[g], _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(raw, 4), m4),
                                                                           x16_bit4_512(hb[g], 2 * v + 1)), xh);
                    } else {
                        il[g] = _mm512_dpbusd_epi32(il[g], _mm512_and_si512(raw, m4), xl);
                        ih[g] = _mm512_dpbusd_epi32(ih[g], _mm512_and_si512(raw, m4h), xh);
                    }
                }
            }
            const __m512 dx = _mm512_set1_ps(xt->d[8 * b + s]), sx = _mm512_set1_ps(xt->d[8 * b + s] * (float)xt->s[8 * b + s]);
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
                const __m512i dot = _mm512_add_epi32(il[g], Q5 ? ih[g] : _mm512_srai_epi32(ih[g], 4));
                const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(scb[g] + 16 * s))));
                const __m512 mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(mnb[g] + 16 * s))));
                acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_mul_ps(dv[g], sc), dx), acc[g]);
                acc[g] = _mm512_fnmadd_ps(_mm512_mul_ps(mv[g], mn), sx, acc[g]);
            }
        }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) {
        _mm512_storeu_ps(y + (size_t)t * ldy + n + 16 * g, acc[g]);
    }
}
#define KX_TILE1 1
#else /* AVX2 */
#define KXT 2
#define KXG 1
#define KXG1 2

IFG_AI void kx_tile(float *y, int ldy, const struct x16_tile *xt, const uint8_t *w, size_t gstride,
                 int t, int i0, int n, int nsb, int add, const int TT, const int G, const int PF, const int Q5) {
    __m256 acc[KXT][2 * KXG1]; /* [token][8-row half] */
    const int ldq = xt->ldq, ldd = xt->ldd, H = 2 * G, pf = PF && i0 == 0 ? xt->pf : 0;
    const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 8
        for (int h = 0; h < H; h++)
            acc[i][h] = add ? _mm256_loadu_ps(y + (size_t)(t + i0 + i) * ldy + n + 8 * h) : _mm256_setzero_ps();
    for (int b = 0; b < nsb; b++) {
        const uint8_t *gb[KXG1];
        __m256 dv[2 * KXG1], mv[2 * KXG1];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) gb[g] = w + (size_t)(n / 16 + g) * gstride + (size_t)b * KX_GBQ(Q5);
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) X16_PREFETCH(gb, 64 * j); /* the header; the levels as they are read */
#pragma GCC unroll 8
        for (int h = 0; h < H; h++) { /* d, dmin of the half's 8 rows, once per super-block */
            dv[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb[h / 2] + 16 * (h % 2))));
            mv[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb[h / 2] + 32 + 16 * (h % 2))));
        }
        for (int s = 0; s < 8; s++) {
            __m256 ws[2 * KXG1], wm[2 * KXG1];
            __m256i ia[KXT][2 * KXG1], p16[KXT][2 * KXG1], hb[2 * KXG1];
#pragma GCC unroll 8
            for (int h = 0; h < H; h++) {
                __m256 sc, mn;
                kx_scales8(gb[h / 2], s, h % 2, &sc, &mn);
                hb[h] = Q5 ? _mm256_loadu_si256((const __m256i *)(gb[h / 2] + KX_GB + 64 * s + 32 * (h % 2))) : _mm256_setzero_si256();
                ws[h] = _mm256_mul_ps(dv[h], sc);
                wm[h] = _mm256_mul_ps(mv[h], mn);
            }
            const int8_t *xb = xt->q + (size_t)i0 * ldq + 256 * b + 32 * s;
            /* int16 pair sums of the whole sub-block: 8 vpmaddubsw lanes of <= 2*15*127 add up
             * to <= 30480, no overflow, so one vpmaddwd per sub-block widens them */
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) {
                X16_PREFETCH(gb, 256 + 256 * s + 64 * v);
                __m256i lo[2 * KXG1], hi[2 * KXG1];
#pragma GCC unroll 8
                for (int h = 0; h < H; h++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(gb[h / 2] + 256 + 256 * s + 64 * v + 32 * (h % 2)));
                    lo[h] = _mm256_and_si256(raw, m4);
                    hi[h] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                    if (Q5) {
                        lo[h] = _mm256_or_si256(lo[h], x16_bit4_256(hb[h], 2 * v));
                        hi[h] = _mm256_or_si256(hi[h], x16_bit4_256(hb[h], 2 * v + 1));
                    }
                }
#pragma GCC unroll 8
                for (int i = 0; i < TT; i++) {
                    const __m256i xl = _mm256_set1_epi32(ifg_x4(xb + (size_t)i * ldq + 8 * v));
                    const __m256i xh = _mm256_set1_epi32(ifg_x4(xb + (size_t)i * ldq + 8 * v + 4));
#pragma GCC unroll 8
                    for (int h = 0; h < H; h++) {
                        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], xl), _mm256_maddubs_epi16(hi[h], xh));
                        p16[i][h] = v == 0 || (Q5 && v == 2) ? p : _mm256_add_epi16(p16[i][h], p);
                        /* q5_k: levels up to 31, so the int16 sums widen every 2 chunks (<= 4 * 2*31*127) */
                        if (Q5 && v == 1) ia[i][h] = _mm256_madd_epi16(p16[i][h], ones);
                    }
                }
            }
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++)
#pragma GCC unroll 8
                for (int h = 0; h < H; h++) {
                    const __m256i p = _mm256_madd_epi16(p16[i][h], ones);
                    ia[i][h] = Q5 ? _mm256_add_epi32(ia[i][h], p) : p;
                }
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++) {
                const int xi = (i0 + i) * ldd + 8 * b + s;
                const __m256 dx = _mm256_set1_ps(xt->d[xi]), sx = _mm256_set1_ps(xt->d[xi] * (float)xt->s[xi]);
#pragma GCC unroll 8
                for (int h = 0; h < H; h++) {
                    acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[i][h]), _mm256_mul_ps(ws[h], dx), acc[i][h]);
                    acc[i][h] = _mm256_fnmadd_ps(wm[h], sx, acc[i][h]);
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 8
        for (int h = 0; h < H; h++) {
            _mm256_storeu_ps(y + (size_t)(t + i0 + i) * ldy + n + 8 * h, acc[i][h]);
        }
}
#endif

/* One token (decode: x16_plan always prefetches) over the groups of rows [n0, n1), in a function
 * of its own per type: compiled inside the function that holds every tile, q4_k's GEMV streamed
 * from DRAM at ~70 % of the speed it has alone. */
IFG_AI void kx_gemv_t(float *y, int ldy, const struct x16_tile *xt, const uint8_t *w, size_t gstride,
                      int t, int n0, int n1, int nsb, int add, const int PF, const int Q5) {
    int n = n0;
#ifdef KX_TILE1
    for (; n + 16 * KXG1 <= n1; n += 16 * KXG1) kx_tile1(y, xt, w, gstride, t, ldy, n, nsb, add, KXG1, PF, Q5);
    for (; n < n1; n += 16) kx_tile1(y, xt, w, gstride, t, ldy, n, nsb, add, 1, PF, Q5);
#else
    for (; n + 16 * KXG1 <= n1; n += 16 * KXG1) kx_tile(y, ldy, xt, w, gstride, t, 0, n, nsb, add, 1, KXG1, PF, Q5);
    for (; n < n1; n += 16) kx_tile(y, ldy, xt, w, gstride, t, 0, n, nsb, add, 1, 1, PF, Q5);
#endif
}
__attribute__((noinline)) static void kx_gemv_q4(float *y, int ldy, const struct x16_tile *xt, const uint8_t *w,
                                                 size_t gstride, int t, int n0, int n1, int nsb, int add) {
    if (ifg_prefetch_level() == 2) kx_gemv_t(y, ldy, xt, w, gstride, t, n0, n1, nsb, add, 2, 0);
    else kx_gemv_t(y, ldy, xt, w, gstride, t, n0, n1, nsb, add, 1, 0);
}
__attribute__((noinline)) static void kx_gemv_q5(float *y, int ldy, const struct x16_tile *xt, const uint8_t *w,
                                                 size_t gstride, int t, int n0, int n1, int nsb, int add) {
    if (ifg_prefetch_level() == 2) kx_gemv_t(y, ldy, xt, w, gstride, t, n0, n1, nsb, add, 2, 1);
    else kx_gemv_t(y, ldy, xt, w, gstride, t, n0, n1, nsb, add, 1, 1);
}

/* Groups of rows [n0, n1) × tokens [t, t + tt) of one x tile (tt > 1). */
IFG_AI void kx_tiles_t(float *y, int ldy, const struct x16_tile *xt, const uint8_t *w, size_t gstride,
                    int t, int tt, int n0, int n1, int nsb, int add, const int PF, const int Q5) {
    for (int n = n0; n < n1;) {
        const int G = n + 16 * KXG <= n1 ? KXG : 1;
        for (int i0 = 0; i0 < tt; i0 += KXT) {
            const int r = tt - i0;
#define KX_CASE(TTC)                                                                        \
    do {                                                                                    \
        if (G == KXG) kx_tile(y, ldy, xt, w, gstride, t, i0, n, nsb, add, TTC, KXG, PF, Q5); \
        else kx_tile(y, ldy, xt, w, gstride, t, i0, n, nsb, add, TTC, 1, PF, Q5);            \
    } while (0)
            X16_TSWITCH(r, KXT, KX_CASE);
#undef KX_CASE
        }
        n += 16 * G;
    }
}
/* the prefetch and the type compile-time choices, as in quant_x16.c (a branch on them in the
 * inner loop slows prefill) */
static void kx_tiles(float *y, int ldy, const struct x16_tile *xt, const uint8_t *w, size_t gstride,
                     int t, int tt, int n0, int n1, int nsb, int add, int q5) {
    if (tt == 1) {
        if (q5) kx_gemv_q5(y, ldy, xt, w, gstride, t, n0, n1, nsb, add);
        else kx_gemv_q4(y, ldy, xt, w, gstride, t, n0, n1, nsb, add);
    } else if (tt >= X16R_T) {
        kx_rep_tiles(y, ldy, xt, w, gstride, t, tt, n0, n1, nsb, add, q5);
    } else if (q5) {
        if (xt->pf) kx_tiles_t(y, ldy, xt, w, gstride, t, tt, n0, n1, nsb, add, 1, 1);
        else kx_tiles_t(y, ldy, xt, w, gstride, t, tt, n0, n1, nsb, add, 0, 1);
    } else {
        if (xt->pf) kx_tiles_t(y, ldy, xt, w, gstride, t, tt, n0, n1, nsb, add, 1, 0);
        else kx_tiles_t(y, ldy, xt, w, gstride, t, tt, n0, n1, nsb, add, 0, 0);
    }
}
#endif

static void kx_mm(float *y, int ldy, const float *x, int ldx, const void *w, int T, int r0, int r1, int K,
                  int accumulate, const struct ifg_xq *xq, int q5) {
    struct x16_tile xt;
    const size_t gb = KX_GBQ(q5), gstride = (size_t)(K / IFG_QK_K) * gb;
    int tb, kw;
    xt.pf = x16r_plan(T, K, xq, &tb, &kw);
    for (int t = 0; t < T; t += tb) {
        const int tt = T - t < tb ? T - t : tb;
        for (int k0 = 0; k0 < K; k0 += kw) {
            const int k1 = k0 + kw < K ? k0 + kw : K, add = accumulate || k0 > 0;
            x16_fill(&xt, xq, x, ldx, t, tt, k0, k1, kw);
            kx_tiles(y, ldy, &xt, (const uint8_t *)w + (size_t)(k0 / IFG_QK_K) * gb, gstride,
                     t, tt, r0, r1, (k1 - k0) / IFG_QK_K, add, q5);
        }
    }
}

void ifg_qk_mm_x16_rows(float *y, int ldy, const float *x, int ldx, const void *w, int T, int r0, int r1,
                        int K, int accumulate, const struct ifg_xq *xq) {
    kx_mm(y, ldy, x, ldx, w, T, r0, r1, K, accumulate, xq, 0);
}

void ifg_q5k_mm_x16_rows(float *y, int ldy, const float *x, int ldx, const void *w, int T, int r0, int r1,
                         int K, int accumulate, const struct ifg_xq *xq) {
    kx_mm(y, ldy, x, ldx, w, T, r0, r1, K, accumulate, xq, 1);
}

/* Row r's GGUF q4_k super-block s into group-block o (layout in quant_k.h). */
static void kx_put_q4_k(uint8_t *o, const uint8_t *s, int r) {
    memcpy(o + 2 * r, s, 2);
    memcpy(o + 32 + 2 * r, s + 2, 2);
    uint8_t sc[8], m[8];
    for (int j = 0; j < 4; j++) {
        sc[j] = s[4 + j] & 63;
        m[j] = s[8 + j] & 63;
        sc[j + 4] = (uint8_t)((s[12 + j] & 15) | (s[4 + j] >> 6) << 4);
        m[j + 4] = (uint8_t)((s[12 + j] >> 4) | (s[8 + j] >> 6) << 4);
    }
    for (int p = 0; p < 4; p++)
        o[192 + 16 * p + r] = (uint8_t)((sc[2 * p] >> 4 | (m[2 * p] >> 4) << 2)
                                        | (sc[2 * p + 1] >> 4 | (m[2 * p + 1] >> 4) << 2) << 4);
    for (int sb = 0; sb < 8; sb++) {
        o[64 + 16 * sb + r] = (uint8_t)((sc[sb] & 15) | (m[sb] & 15) << 4);
        const uint8_t *q = s + 16 + 32 * (sb / 2); /* sub-block sb: nibble sb % 2 */
        for (int v = 0; v < 4; v++) {
            uint32_t a, a4, u; /* elements 8v..8v+3 and 8v+4..8v+7 of the sub-block */
            memcpy(&a, q + 8 * v, 4);
            memcpy(&a4, q + 8 * v + 4, 4);
            u = sb % 2 == 0 ? (a & 0x0F0F0F0Fu) | (a4 & 0x0F0F0F0Fu) << 4
                            : (a >> 4 & 0x0F0F0F0Fu) | (a4 & 0xF0F0F0F0u);
            memcpy(o + 256 + 256 * sb + 64 * v + 4 * r, &u, 4);
        }
    }
}

/* GGUF-order q4_k (N rows of K/256 blocks) → IFG_Q4_KX16; groups of rows split over threads. */
void ifg_q4_k_interleave(void *dst, const void *src, int N, int K, int n_threads) {
    x16_interleave(dst, src, N, K / IFG_QK_K, IFG_Q4_K_BLOCK, kx_put_q4_k, n_threads);
}

/* Row r's GGUF q5_k super-block s into group-block o: q4_k's layout of the low 4 bits (q5_k's
 * d, dmin, scales and qs are q4_k's bytes), then the 5th bits (layout in quant_gguf.h). */
static void kx_put_q5_k(uint8_t *o, const uint8_t *s, int r) {
    uint8_t q4[IFG_Q4_K_BLOCK];
    memcpy(q4, s, 16);
    memcpy(q4 + 16, s + 48, 128);
    kx_put_q4_k(o, q4, r);
    for (int sb = 0; sb < 8; sb++) /* qh: bit sb of byte l is bit 4 of sub-block sb's element l */
        for (int j = 0; j < 4; j++) {
            uint8_t by = 0;
            for (int b = 0; b < 8; b++) by |= (uint8_t)((s[16 + 4 * b + j] >> sb & 1) << b); /* k = 4b + j */
            o[KX_GB + 64 * sb + 4 * r + j] = by;
        }
}

void ifg_q5_k_interleave(void *dst, const void *src, int N, int K, int n_threads) {
    x16_interleave(dst, src, N, K / IFG_QK_K, IFG_Q5_K_BLOCK, kx_put_q5_k, n_threads);
}
