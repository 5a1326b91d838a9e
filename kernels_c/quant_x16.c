/* quant_x16.c — y (=|+=) x · Wᵀ for q8_0 / q4_0 / q4_1 / q5_1 weights in the 16-row interleaved
 * layouts (IFG_Q8_0X16 / IFG_Q4_0X16, see quant.h; IFG_Q4_1X16 / IFG_Q5_1X16, see quant_gguf.h).
 *
 * x is quantized per token and 32-block exactly as for the plain layouts (ifg_quantize_x) into
 * a stack tile of X16_T tokens × X16_K k (decode, T == 1: the whole row at once, so a GEMV makes
 * one pass over W). Then for each run of XG 16-row groups (outer: its weights stay in L1/L2)
 * and XT tokens (inner), a register tile of XT × XG accumulators does per group-block:
 *  - AVX-512 (VNNI): the int32 accumulator (16 rows in one zmm) starts at -off * sum(x block)
 *    (off = 128 for q8_0x16's unsigned bytes, 8 for q4_0's nibbles: sum(u * x) = sum(w * x) +
 *    off * sum(x), exact in int32; q4_1's nibbles need none), then 8 vpdpbusd, each a 64-byte
 *    weight vector (16 rows × 4 k) against x's 4 int8 of those k broadcast: 16 rows × 32 k in
 *    8 instructions, each weight vector loaded once for the XT tokens. Then one convert and one
 *    FMA with the 16 row scales (one vcvtph2ps per group-block) times d_x; q4_1 adds one FMA
 *    of its 16 row minimums times d_x * sum(x). q5_1 is q4_1 with each nibble's 5th bit OR'd in
 *    from one 64-byte plane per group-block (levels 0..31, still unsigned for vpdpbusd).
 *  - AVX2: the same layout as two 8-row halves; q8_0 via vpmaddubsw(|w|, sign(x, w)) on the
 *    signed weights (no offset); q4_0 / q4_1 via vpmaddubsw(nibbles, x) (<= 15 * 127 * 4 per
 *    int16 lane for the low + high sum: no saturation), q4_0 with the -8 * sum(x) start.
 *  - scalar: plain loops over the same layout.
 * A group's outputs are 16 consecutive floats of y: no horizontal sums. Each output's
 * summation order depends only on K: per X16_K-wide k tile a sum from zero over its blocks in
 * order, the tiles added into y in order. A call that takes K whole (decode, small batches)
 * stores each tile's sum as a call cut into k tiles does, so a row has the same bits whatever
 * the number of rows beside it (speculative verification and batching depend on it) and for
 * any thread count. */
#include "quant_k.h"
#include "quant_x16.h"
#include "quant_gguf.h"

#define XG_EPI 128              /* rows per epilogue call: a token tile's y rows stay in L1/L2 */
#define XG_KB (X16_K / IFG_QK)  /* blocks per k tile: each tile's sum goes into y on its own */

static inline size_t xg_block_bytes(int wtype) {
    return wtype == IFG_Q8_0X16 ? 544 : wtype == IFG_Q5_1X16 ? 384 : wtype == IFG_Q4_1X16 ? 320 : 288;
}
/* The types with a minimum per block (value = d * q + m). */
#define XG_AFFINE(wtype) ((wtype) == IFG_Q4_1X16 || (wtype) == IFG_Q5_1X16)
/* Where a group-block's weight bytes start: after the 16 fp16 d (and q4_1's / q5_1's 16 fp16 m). */
#define XG_QOFF(wtype) (XG_AFFINE(wtype) ? 64 : 32)
#define XG_PLANE 320 /* q5_1x16: where the group-block's 5th bits start */

#ifndef IFG_SIMD
/* ---- scalar reference (the scalar build) ---- */
static void xg_tiles_ref(float *y, int ldy, const struct x16_tile *xt, const uint8_t *w, int wtype, size_t gstride,
                         int t, int tt, int n0, int n1, int nb, int add, const struct ifg_mm_epilogue *epi) {
    const size_t bb = xg_block_bytes(wtype);
    for (int n = n0; n < n1; n++) {
        const int r = n % 16;
        const uint8_t *wg = w + (size_t)(n / 16) * gstride;
        for (int i = 0; i < tt; i++) {
            for (int b0 = 0; b0 < nb; b0 += XG_KB) {
                float acc = 0.0f;
                for (int b = b0, b1 = b0 + XG_KB < nb ? b0 + XG_KB : nb; b < b1; b++) {
                    const uint8_t *blk = wg + (size_t)b * bb;
                    const int8_t *xq = xt->q + (size_t)i * xt->ldq + b * IFG_QK;
                    uint16_t h, hm;
                    memcpy(&h, blk + 2 * r, 2);
                    int32_t s = 0;
                    for (int k = 0; k < IFG_QK; k++) {
                        const int wv = wtype == IFG_Q8_0X16 ? (int)blk[32 + 64 * (k / 4) + 4 * r + k % 4] - 128
                                     : wtype == IFG_Q4_1X16 ? x16_nibble(blk + 64, r, k)
                                     : wtype == IFG_Q5_1X16 ? x16_nibble(blk + 64, r, k) | (blk[XG_PLANE + 4 * r + k % 4] >> (k / 4) & 1) << 4
                                                            : x16_nibble(blk + 32, r, k) - 8;
                        s += wv * xq[k];
                    }
                    const float dx = xt->d[i * xt->ldd + b];
                    acc += (float)s * (ifg_f16_to_f32(h) * dx);
                    if (XG_AFFINE(wtype)) { /* + m * sum(x) */
                        memcpy(&hm, blk + 32 + 2 * r, 2);
                        acc += ifg_f16_to_f32(hm) * (dx * (float)xt->s[i * xt->ldd + b]);
                    }
                }
                float *yo = y + (size_t)(t + i) * ldy + n;
                *yo = add || b0 > 0 ? *yo + acc : acc;
            }
        }
    }
    if (epi && n0 < n1) epi->fn(epi, y, ldy, t, t + tt, n0, n1);
}
#define xg_tiles xg_tiles_ref
#else
/* ---- SIMD: per-ISA register tiles (the int8 dot products differ: VNNI against AVX2) ---- */

#if defined(IFG_AVX512)
#define XG_OFF(wtype) ((wtype) == IFG_Q8_0X16 ? 128 : (wtype) == IFG_Q4_0X16 ? 8 : 0)
#define XT 4 /* tokens per register tile */
#define XG 2 /* groups per register tile (prefill) */
#define XG1 4 /* groups per register tile (one token: more independent weight streams) */
IFG_AI void xg_tile(float *y, int ldy, const struct x16_tile *xt, const uint8_t *w, size_t gstride, int wtype,
                int t, int i0, int n, int nb, int add, const int TT, const int G, const int PF) {
    __m512 acc[XT][XG1];
    const size_t bb = xg_block_bytes(wtype);
    const int ldq = xt->ldq, ldd = xt->ldd, pf = PF && i0 == 0 ? xt->pf : 0;
#define XG_STORE(ADD)                                                                             \
    _Pragma("GCC unroll 8") for (int i = 0; i < TT; i++)                                          \
        _Pragma("GCC unroll 8") for (int g = 0; g < G; g++) {                                     \
            float *yo = y + (size_t)(t + i0 + i) * ldy + n + 16 * g;                             \
            _mm512_storeu_ps(yo, (ADD) ? _mm512_add_ps(_mm512_loadu_ps(yo), acc[i][g]) : acc[i][g]); \
            acc[i][g] = _mm512_setzero_ps();                                                      \
        }
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) acc[i][g] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk[XG1];
        __m512i ia[XT][XG1];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) blk[g] = w + (size_t)(n / 16 + g) * gstride + (size_t)b * bb;
        X16_PREFETCH(blk, bb - 1); /* the block's last line; the loads below prefetch the rest */
#pragma GCC unroll 8
        for (int i = 0; i < TT; i++) {
            const __m512i o = _mm512_set1_epi32(-XG_OFF(wtype) * xt->s[(i0 + i) * ldd + b]);
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) ia[i][g] = o;
        }
        const int8_t *xb = xt->q + (size_t)i0 * ldq + b * IFG_QK;
        if (wtype == IFG_Q8_0X16) {
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) {
                __m512i u[XG1];
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) u[g] = _mm512_loadu_si512((const void *)(blk[g] + 32 + 64 * c));
                X16_PREFETCH(blk, 64 * c);
#pragma GCC unroll 8
                for (int i = 0; i < TT; i++) {
                    const __m512i xv = _mm512_set1_epi32(ifg_x4(xb + (size_t)i * ldq + 4 * c));
#pragma GCC unroll 8
                    for (int g = 0; g < G; g++) ia[i][g] = _mm512_dpbusd_epi32(ia[i][g], u[g], xv);
                }
            }
        } else {
            const __m512i m = _mm512_set1_epi8(0x0F);
            __m512i pl[XG1]; /* q5_1: the 5th bits */
            if (wtype == IFG_Q5_1X16)
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) pl[g] = _mm512_loadu_si512((const void *)(blk[g] + XG_PLANE));
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) {
                __m512i lo[XG1], hi[XG1];
                X16_PREFETCH(blk, 64 * v);
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) {
                    const __m512i raw = _mm512_loadu_si512((const void *)(blk[g] + XG_QOFF(wtype) + 64 * v));
                    lo[g] = _mm512_and_si512(raw, m);
                    hi[g] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m);
                    if (wtype == IFG_Q5_1X16) {
                        lo[g] = _mm512_or_si512(lo[g], x16_bit4_512(pl[g], 2 * v));
                        hi[g] = _mm512_or_si512(hi[g], x16_bit4_512(pl[g], 2 * v + 1));
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
        }
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk[g]));
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++) {
                const float dx = xt->d[(i0 + i) * ldd + b];
                acc[i][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[i][g]), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc[i][g]);
                if (XG_AFFINE(wtype)) /* + m * d_x * sum(x) */
                    acc[i][g] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk[g] + 32))),
                                                _mm512_set1_ps(dx * (float)xt->s[(i0 + i) * ldd + b]), acc[i][g]);
            }
        }
        if ((b + 1) % XG_KB == 0 && b + 1 < nb) { /* a k tile's end: its sum into y, as a cut call does */
            XG_STORE(add);
            add = 1;
        }
    }
    XG_STORE(add);
#undef XG_STORE
}
#else /* AVX2 */
#define XG_OFF(wtype) ((wtype) == IFG_Q4_0X16 ? 8 : 0)
#define XT 2
#define XG 1
#define XG1 2
IFG_AI void xg_tile(float *y, int ldy, const struct x16_tile *xt, const uint8_t *w, size_t gstride, int wtype,
                int t, int i0, int n, int nb, int add, const int TT, const int G, const int PF) {
    __m256 acc[XT][2 * XG1]; /* [token][8-row half] */
    const size_t bb = xg_block_bytes(wtype);
    const int ldq = xt->ldq, ldd = xt->ldd, H = 2 * G, pf = PF && i0 == 0 ? xt->pf : 0;
    const __m256i ones = _mm256_set1_epi16(1);
#define XG_STORE(ADD)                                                                             \
    _Pragma("GCC unroll 8") for (int i = 0; i < TT; i++)                                          \
        _Pragma("GCC unroll 8") for (int h = 0; h < H; h++) {                                     \
            float *yo = y + (size_t)(t + i0 + i) * ldy + n + 8 * h;                              \
            _mm256_storeu_ps(yo, (ADD) ? _mm256_add_ps(_mm256_loadu_ps(yo), acc[i][h]) : acc[i][h]); \
            acc[i][h] = _mm256_setzero_ps();                                                      \
        }
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 8
        for (int h = 0; h < H; h++) acc[i][h] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk[XG1];
        __m256i ia[XT][2 * XG1];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) blk[g] = w + (size_t)(n / 16 + g) * gstride + (size_t)b * bb;
        X16_PREFETCH(blk, bb - 1); /* the block's last line; the loads below prefetch the rest */
#pragma GCC unroll 8
        for (int i = 0; i < TT; i++) {
            const __m256i o = _mm256_set1_epi32(-XG_OFF(wtype) * xt->s[(i0 + i) * ldd + b]);
#pragma GCC unroll 8
            for (int h = 0; h < H; h++) ia[i][h] = o;
        }
        const int8_t *xb = xt->q + (size_t)i0 * ldq + b * IFG_QK;
        if (wtype == IFG_Q8_0X16) {
            for (int c = 0; c < 8; c++) {
                __m256i ws[2 * XG1], aw[2 * XG1];
                X16_PREFETCH(blk, 64 * c);
#pragma GCC unroll 8
                for (int h = 0; h < H; h++) {
                    const __m256i u = _mm256_loadu_si256((const __m256i *)(blk[h / 2] + 32 + 64 * c + 32 * (h % 2)));
                    ws[h] = _mm256_xor_si256(u, _mm256_set1_epi8((char)0x80));
                    aw[h] = _mm256_abs_epi8(ws[h]);
                }
#pragma GCC unroll 8
                for (int i = 0; i < TT; i++) {
                    const __m256i xv = _mm256_set1_epi32(ifg_x4(xb + (size_t)i * ldq + 4 * c));
#pragma GCC unroll 8
                    for (int h = 0; h < H; h++)
                        ia[i][h] = _mm256_add_epi32(ia[i][h], _mm256_madd_epi16(
                            _mm256_maddubs_epi16(aw[h], _mm256_sign_epi8(xv, ws[h])), ones));
                }
            }
        } else {
            const __m256i m = _mm256_set1_epi8(0x0F);
            __m256i pl[2 * XG1]; /* q5_1: the 5th bits */
            if (wtype == IFG_Q5_1X16)
#pragma GCC unroll 8
                for (int h = 0; h < H; h++) pl[h] = _mm256_loadu_si256((const __m256i *)(blk[h / 2] + XG_PLANE + 32 * (h % 2)));
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) {
                __m256i lo[2 * XG1], hi[2 * XG1];
                X16_PREFETCH(blk, 64 * v);
#pragma GCC unroll 8
                for (int h = 0; h < H; h++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(blk[h / 2] + XG_QOFF(wtype) + 64 * v + 32 * (h % 2)));
                    lo[h] = _mm256_and_si256(raw, m);
                    hi[h] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m);
                    if (wtype == IFG_Q5_1X16) {
                        lo[h] = _mm256_or_si256(lo[h], x16_bit4_256(pl[h], 2 * v));
                        hi[h] = _mm256_or_si256(hi[h], x16_bit4_256(pl[h], 2 * v + 1));
                    }
                }
#pragma GCC unroll 8
                for (int i = 0; i < TT; i++) {
                    const __m256i xl = _mm256_set1_epi32(ifg_x4(xb + (size_t)i * ldq + 8 * v));
                    const __m256i xh = _mm256_set1_epi32(ifg_x4(xb + (size_t)i * ldq + 8 * v + 4));
#pragma GCC unroll 8
                    for (int h = 0; h < H; h++)
                        ia[i][h] = _mm256_add_epi32(ia[i][h], _mm256_madd_epi16(_mm256_add_epi16(
                            _mm256_maddubs_epi16(lo[h], xl), _mm256_maddubs_epi16(hi[h], xh)), ones));
                }
            }
        }
#pragma GCC unroll 8
        for (int h = 0; h < H; h++) {
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk[h / 2] + 16 * (h % 2))));
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++) {
                const float dx = xt->d[(i0 + i) * ldd + b];
                acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[i][h]), _mm256_mul_ps(dw, _mm256_set1_ps(dx)), acc[i][h]);
                if (XG_AFFINE(wtype)) /* + m * d_x * sum(x) */
                    acc[i][h] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk[h / 2] + 32 + 16 * (h % 2)))),
                                                _mm256_set1_ps(dx * (float)xt->s[(i0 + i) * ldd + b]), acc[i][h]);
            }
        }
        if ((b + 1) % XG_KB == 0 && b + 1 < nb) { /* a k tile's end: its sum into y, as a cut call does */
            XG_STORE(add);
            add = 1;
        }
    }
    XG_STORE(add);
#undef XG_STORE
}
#endif

/* Groups of rows [n0, n1) × tokens [t, t + tt) of one x tile; wtype a constant after inlining. */
IFG_AI void xg_tiles_t(float *y, int ldy, const struct x16_tile *xt, const uint8_t *w, int wtype, size_t gstride,
                   int t, int tt, int n0, int n1, int nb, int add, const struct ifg_mm_epilogue *epi, const int PF) {
    int ne = n0; /* rows not yet handed to the epilogue: it gets XG_EPI rows at a time */
#define XG_EPI_AFTER(n_done)                                                                      \
    do {                                                                                          \
        if (epi && ((n_done) - ne >= XG_EPI || (n_done) >= n1)) {                                 \
            epi->fn(epi, y, ldy, t, t + tt, ne, (n_done));                                        \
            ne = (n_done);                                                                        \
        }                                                                                         \
    } while (0)
    if (tt == 1) {
        int n = n0;
        for (; n + 16 * XG1 <= n1; n += 16 * XG1) {
            xg_tile(y, ldy, xt, w, gstride, wtype, t, 0, n, nb, add, 1, XG1, PF);
            XG_EPI_AFTER(n + 16 * XG1);
        }
        for (; n < n1; n += 16) {
            xg_tile(y, ldy, xt, w, gstride, wtype, t, 0, n, nb, add, 1, 1, PF);
            XG_EPI_AFTER(n + 16);
        }
        return;
    }
    for (int n = n0; n < n1; n += 16 * XG) {
        const int G = n + 16 * XG <= n1 ? XG : 1;
        for (int i0 = 0; i0 < tt; i0 += XT) {
            const int r = tt - i0;
#define XG_CASE(TTC)                                                                              \
    do {                                                                                          \
        if (G == XG) xg_tile(y, ldy, xt, w, gstride, wtype, t, i0, n, nb, add, TTC, XG, PF);      \
        else xg_tile(y, ldy, xt, w, gstride, wtype, t, i0, n, nb, add, TTC, 1, PF);               \
    } while (0)
            X16_TSWITCH(r, XT, XG_CASE);
#undef XG_CASE
        }
        XG_EPI_AFTER(n + 16 * G); /* these rows are final, still in cache */
        if (G == 1) n -= 16 * (XG - 1); /* the tail advanced by one group only */
    }
#undef XG_EPI_AFTER
}
static void xg_tiles(float *y, int ldy, const struct x16_tile *xt, const uint8_t *w, int wtype, size_t gstride,
                     int t, int tt, int n0, int n1, int nb, int add, const struct ifg_mm_epilogue *epi) {
    /* the type and the prefetch compile-time choices: a branch on the prefetch in the inner loop
     * cost prefill 1.5x */
#define XG_TYPE(WT)                                                                               \
    do {                                                                                          \
        if (xt->pf && tt == 1 && ifg_prefetch_level() == 2)                                       \
            xg_tiles_t(y, ldy, xt, w, WT, gstride, t, 1, n0, n1, nb, add, epi, 2);                \
        else if (xt->pf) xg_tiles_t(y, ldy, xt, w, WT, gstride, t, tt, n0, n1, nb, add, epi, 1);  \
        else xg_tiles_t(y, ldy, xt, w, WT, gstride, t, tt, n0, n1, nb, add, epi, 0);              \
    } while (0)
    if (wtype == IFG_Q8_0X16) XG_TYPE(IFG_Q8_0X16);
    else if (wtype == IFG_Q4_1X16) XG_TYPE(IFG_Q4_1X16);
    else if (wtype == IFG_Q5_1X16) XG_TYPE(IFG_Q5_1X16);
    else XG_TYPE(IFG_Q4_0X16);
#undef XG_TYPE
}
#endif

void ifg_qmm_x16_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                      int T, int r0, int r1, int K, int accumulate, const struct ifg_mm_epilogue *epi,
                      const struct ifg_xq *xq) {
    struct x16_tile xt;
    const size_t bb = xg_block_bytes(wtype), gstride = (size_t)(K / IFG_QK) * bb;
    int tb, kw;
    xt.pf = x16_plan(T, K, &tb, &kw);
    for (int t = 0; t < T; t += tb) {
        const int tt = T - t < tb ? T - t : tb;
        for (int k0 = 0; k0 < K; k0 += kw) {
            const int k1 = k0 + kw < K ? k0 + kw : K, add = accumulate || k0 > 0, nb = (k1 - k0) / IFG_QK;
            x16_fill(&xt, xq, x, ldx, t, tt, k0, k1, kw);
            xg_tiles(y, ldy, &xt, (const uint8_t *)w + (size_t)(k0 / IFG_QK) * bb, wtype, gstride,
                     t, tt, r0, r1, nb, add, k1 == K ? epi : NULL);
        }
    }
}

void ifg_quantize_x_part(const struct ifg_xq *xq, const float *x, int ldx, int T, int K) {
    IFG_FOR
    for (int t = 0; t < T; t++) ifg_quantize_x(xq->q + (size_t)t * xq->ldq, xq->d + (size_t)t * xq->ldd,
                                               xq->s + (size_t)t * xq->ldd, x, ldx, t, 1, 0, K, xq->ldq, xq->ldd);
}

/* Row r's GGUF block s into group-block o (layouts in quant.h), 4 bytes at a time. */
static void xg_put_q8_0(uint8_t *o, const uint8_t *s, int r) {
    o[2 * r] = s[0];
    o[2 * r + 1] = s[1];
    for (int c = 0; c < 8; c++) { /* row r's 4 bytes of chunk c, made unsigned */
        uint32_t a;
        memcpy(&a, s + 2 + 4 * c, 4);
        a ^= 0x80808080u;
        memcpy(o + 32 + 64 * c + 4 * r, &a, 4);
    }
}
static void xg_put_q4_0(uint8_t *o, const uint8_t *s, int r) {
    o[2 * r] = s[0];
    o[2 * r + 1] = s[1];
    for (int v = 0; v < 4; v++) { /* low nibbles hold k 0..15, high k 16..31 */
        uint32_t a, a4, u; /* a: bytes j..j+3, a4: bytes j+4..j+7 */
        memcpy(&a, s + 2 + 8 * (v % 2), 4);
        memcpy(&a4, s + 6 + 8 * (v % 2), 4);
        u = v < 2 ? (a & 0x0F0F0F0Fu) | ((a4 & 0x0F0F0F0Fu) << 4) : ((a >> 4) & 0x0F0F0F0Fu) | (a4 & 0xF0F0F0F0u);
        memcpy(o + 32 + 64 * v + 4 * r, &u, 4);
    }
}

/* q4_1's block (d, m, nibbles) from byte 2 on has q4_0's shape (an fp16, then the nibbles), and
 * so has its group-block from byte 32 on (the 16 m, then q4_0x16's nibbles): put it as q4_0's,
 * then d in front. */
static void xg_put_q4_1(uint8_t *o, const uint8_t *s, int r) {
    xg_put_q4_0(o + 32, s + 2, r);
    memcpy(o + 2 * r, s, 2);
}

/* q5_1's block (d, m, 32 bits of 5th bits, nibbles): q4_1's group-block from d, m and the nibbles,
 * then the 5th bits as the plane's bytes 4r + j, bit 2v + h for k = 8v + 4h + j (quant_gguf.h). */
static void xg_put_q5_1(uint8_t *o, const uint8_t *s, int r) {
    uint8_t q41[20];
    uint32_t qh, u = 0;
    memcpy(q41, s, 4);
    memcpy(q41 + 4, s + 8, 16);
    xg_put_q4_1(o, q41, r);
    memcpy(&qh, s + 4, 4);
    for (int k = 0; k < IFG_QK; k++) u |= (qh >> k & 1u) << (8 * (k % 4) + k / 4);
    memcpy(o + XG_PLANE + 4 * r, &u, 4);
}

void ifg_quant_interleave(void *dst, const void *src, int dtype, int N, int K, int n_threads) {
    if (dtype == IFG_Q4_K) ifg_q4_k_interleave(dst, src, N, K, n_threads);
    else if (dtype == IFG_Q4_1) x16_interleave(dst, src, N, K / IFG_QK, 20, xg_put_q4_1, n_threads);
    else if (dtype == IFG_Q5_1) x16_interleave(dst, src, N, K / IFG_QK, 24, xg_put_q5_1, n_threads);
    else if (dtype == IFG_Q6_K) ifg_q6_k_interleave(dst, src, N, K, n_threads);
    else if (dtype == IFG_Q5_K) ifg_q5_k_interleave(dst, src, N, K, n_threads);
    else if (dtype == IFG_Q8_0) x16_interleave(dst, src, N, K / IFG_QK, 34, xg_put_q8_0, n_threads);
    else x16_interleave(dst, src, N, K / IFG_QK, 18, xg_put_q4_0, n_threads);
}
