/* quant_x16.h — what the 16-row interleaved int8 kernels share (quant_x16.c: q8_0x16 / q4_0x16 /
 * q4_1x16; quant_kx16.c: q4_kx16 / q5_kx16; quant_q6kx16.c): the tile of quantized x and how x is
 * cut into tiles, the weight prefetch, the token-count dispatch to constant tile shapes, the
 * nibble layout, the repack loop, and the k-quants' large-batch path (a group unpacked once into
 * bytes, one register tile for the three types). Internal: not part of the cffi ABI. */
#ifndef IFG_QUANT_X16_H
#define IFG_QUANT_X16_H

#include "quant.h"
#include "simd.h"

#define X16_T 64    /* tokens per x tile */
#define X16_K 1024  /* k per x tile (multiple of 256); tt tokens take all of K if tt·K <= X16_Q */
#define X16_Q (X16_T * X16_K)
#define X16_NB (X16_Q / IFG_QK)
#define X16_PF 2048 /* bytes ahead of a weight stream to prefetch, rows whole (2 KiB >= 4, 8 KiB) */

/* One tile of quantized x: token i's k-th int8 at q[i*ldq + k], its 32-block b's scale at
 * d[i*ldd + b], the block's sum of q at s[i*ldd + b] and d times that sum at ds[i*ldd + b]
 * (q4_k only). q/d/s point into the tile's own buffers, or into an x quantized once by the
 * caller (ifg_xq). */
struct x16_tile {
    _Alignas(64) int8_t qb[X16_Q];
    float db[X16_NB], dsb[X16_NB];
    int32_t sb[X16_NB];
    const int8_t *q;
    const float *d, *ds;
    const int32_t *s;
    int ldq, ldd;
    int pf; /* bytes ahead of each weight stream to prefetch (0: none) */
};

/* How T tokens over K are cut into tiles: *tb tokens (decode: 1) × *kw k. Whole rows when a
 * tile holds them (decode, small batches): one pass over W with no partial sums, W one
 * sequential stream per thread, prefetched ahead (+24 % batch-8 GEMM from DRAM); larger batches
 * go X16_K at a time. Returns the prefetch distance (0: none). */
static inline int x16_plan(int T, int K, int *tb, int *kw) {
    *tb = T == 1 ? 1 : X16_T;
    *kw = (size_t)(T < *tb ? T : *tb) * K <= X16_Q ? K : X16_K;
    return *kw == K ? X16_PF : 0;
}

/* Point the tile at tokens [t, t + tt) × k [k0, k1) of x: into xq when the caller quantized x
 * already, else x quantized into the tile's buffers (strides kw). */
static inline void x16_fill(struct x16_tile *xt, const struct ifg_xq *xq, const float *x, int ldx,
                            int t, int tt, int k0, int k1, int kw) {
    if (xq) {
        xt->q = xq->q + (size_t)t * xq->ldq + k0;
        xt->d = xq->d + (size_t)t * xq->ldd + k0 / IFG_QK;
        xt->s = xq->s + (size_t)t * xq->ldd + k0 / IFG_QK;
        xt->ldq = xq->ldq;
        xt->ldd = xq->ldd;
        return;
    }
    xt->ldq = kw;
    xt->ldd = kw / IFG_QK;
    ifg_quantize_x(xt->qb, xt->db, xt->sb, x, ldx, t, tt, k0, k1, xt->ldq, xt->ldd);
    xt->q = xt->qb;
    xt->d = xt->db;
    xt->s = xt->sb;
}

/* The level (0..15) of row r, element k (0..31) of a run of 4 × 64 nibble bytes (q4_0x16's
 * blocks, q4_kx16's sub-blocks): chunk k/8, row r's 4 bytes, low nibbles k%8 < 4. */
static inline int x16_nibble(const uint8_t *run, int r, int k) {
    const uint8_t by = run[64 * (k / 8) + 4 * r + k % 4];
    return k % 8 < 4 ? by & 0x0F : by >> 4;
}

/* A runtime token count r >= 1 to CASE(n), n a constant <= TT (TT a constant: the branches for
 * counts above it are compiled away). */
#define X16_TMIN(n, TT) ((n) < (TT) ? (n) : (TT))
#define X16_TSWITCH(r, TT, CASE)                                                                  \
    if ((r) >= (TT)) CASE(TT);                                                                    \
    else if ((TT) > 7 && (r) == 7) CASE(X16_TMIN(7, TT));                                         \
    else if ((TT) > 6 && (r) == 6) CASE(X16_TMIN(6, TT));                                         \
    else if ((TT) > 5 && (r) == 5) CASE(X16_TMIN(5, TT));                                         \
    else if ((TT) > 4 && (r) == 4) CASE(X16_TMIN(4, TT));                                         \
    else if ((TT) > 3 && (r) == 3) CASE(X16_TMIN(3, TT));                                         \
    else if ((TT) > 2 && (r) == 2) CASE(X16_TMIN(2, TT));                                         \
    else CASE(1)

#ifdef IFG_SIMD
/* Software prefetch of the G weight streams base[0..G) of a register tile, `pf` bytes ahead of
 * offset off (the first token tile only: the others find the weights in cache). A batch's GEMM
 * does so much arithmetic per weight byte that the core keeps few loads in flight, and the
 * hardware prefetcher alone does not run far enough ahead: reading W and computing on it took
 * turns (TinyLlama's w_gate at batch 8: 0.57 ms with W in L3, 1.0 ms from DRAM). PF, the tile's
 * compile-time choice: 0 none, 1 into L1, 2 into L2 (one-token GEMVs, where ifg_prefetch_level()
 * says so: the hint is an immediate, so each level is a tile of its own). */
#define X16_PF_HINT(PF) ((PF) == 2 ? _MM_HINT_T1 : _MM_HINT_T0)
#define X16_PREFETCH(base, off)                                                                   \
    do {                                                                                          \
        if (pf)                                                                                   \
            for (int g_ = 0; g_ < G; g_++) _mm_prefetch((const char *)(base)[g_] + (off) + pf, X16_PF_HINT(PF)); \
    } while (0)
/* Bit b of every byte of a plane of 5th bits (q5_kx16, q5_1x16), moved to bit 4, to OR into the
 * nibbles; 16-bit shifts, what crosses a byte is masked off (b a constant after unrolling). */
IFG_AI __m256i x16_bit4_256(__m256i pl, const int b) {
    const __m256i s = b <= 4 ? _mm256_slli_epi16(pl, 4 - b) : _mm256_srli_epi16(pl, b - 4);
    return _mm256_and_si256(s, _mm256_set1_epi8(0x10));
}
#if defined(IFG_AVX512)
IFG_AI __m512i x16_bit4_512(__m512i pl, const int b) {
    const __m512i s = b <= 4 ? _mm512_slli_epi16(pl, 4 - b) : _mm512_srli_epi16(pl, b - 4);
    return _mm512_and_si512(s, _mm512_set1_epi8(0x10));
}
#endif
#endif

/* ---- On-the-fly repack of large batches (q4_k / q5_k / q6_k) ----
 * A k-quant's levels and scales cost as many instructions to unpack as the dot products they
 * feed, and a register tile of 8 tokens paid that once per 8 tokens. From X16R_T tokens on, a
 * thread unpacks one 16-row group × X16R_K k once into an x16_rep on its stack (levels as bytes,
 * scales as f32) and runs every token of the x tile against it with one tile shared by the three
 * types. The repack forms the very products d*sc / dmin*m the types' tiles form, and the tile
 * takes them in the types' own float steps and order: outputs stay bitwise decode's. */
#define X16R_T 16   /* tokens from which the k-quant products repack */
#ifndef X16R_TB
#define X16R_TB 128 /* tokens per x tile when x comes quantized (ifg_xq): one repack serves them all */
#endif
#define X16R_G 2    /* 16-row groups per rep */
#define X16R_K 512  /* k per repacked piece (the rep's 22 KiB stay in L1) */

/* X16R_G groups' piece: group g's level of row r, k at lv[g][64 * (k / 4) + 4 * r + k % 4]
 * (unsigned: q4_k 0..15, q5_k 0..31, q6_k 0..63); per scale unit u (SK = 32 k, q6_k 16) its 16
 * rows' d*sc in ws[g][u], and q4_k / q5_k's dmin*m in wm[g][u]. */
struct x16_rep {
    _Alignas(64) uint8_t lv[X16R_G][16 * X16R_K];
    _Alignas(64) float ws[X16R_G][X16R_K / 16][16];
    _Alignas(64) float wm[X16R_G][X16R_K / 32][16];
};

/* x16_plan for the repacking products: with x quantized by the caller and X16R_T tokens or
 * more, X16R_TB tokens × at most X16_K k per x tile (no prefetch: the tile reads the rep). */
static inline int x16r_plan(int T, int K, const struct ifg_xq *xq, int *tb, int *kw) {
    const int pf = x16_plan(T, K, tb, kw);
    if (!xq || T < X16R_T) return pf;
    *tb = X16R_TB;
    *kw = K < X16_K ? K : X16_K;
    return 0;
}

#ifdef IFG_SIMD
/* The tile: TT tokens (x tile rows i0..) × G groups (the rep's g0.., rows n.. of y), over the
 * rep's nu units, which start at the x tile's k = kx0. Per unit, token and group: an int32 dot
 * (q6_k: started at -32·Σx of the unit's 16 k, xs[i * lds + kx0 / 16 + u]), then
 * acc += dot * (ws * d_x) and (MIN: q4_k, q5_k) acc -= wm * (d_x * s_x), as kx_tile / q6x_tile
 * do. LV: the level bits (AVX2: how many vpmaddubsw sums int16 holds). */
#if defined(IFG_AVX512)
#define X16R_TT 8 /* tokens per register tile of one group; of two: 4 (an x broadcast serves both) */
#define X16R_TG 2 /* groups per register tile */
IFG_AI void x16r_tile(float *y, int ldy, const struct x16_tile *xt, const int32_t *xs, int lds,
                      const struct x16_rep *rp, int g0, int t, int i0, int n, int kx0, int nu, int add,
                      const int TT, const int G, const int SK, const int MIN, const int LV) {
    __m512 acc[X16R_TT][X16R_TG];
    const int ldq = xt->ldq, ldd = xt->ldd, NV = SK / 4;
    const int8_t *xb = xt->q + (size_t)i0 * ldq + kx0;
    (void)LV;
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 2
        for (int g = 0; g < G; g++)
            acc[i][g] = add ? _mm512_loadu_ps(y + (size_t)(t + i0 + i) * ldy + n + 16 * g) : _mm512_setzero_ps();
    for (int u = 0; u < nu; u++) {
        __m512i ia[X16R_TT][X16R_TG];
#pragma GCC unroll 8
        for (int i = 0; i < TT; i++) {
            const __m512i o = MIN ? _mm512_setzero_si512() : _mm512_set1_epi32(-xs[(i0 + i) * lds + kx0 / 16 + u]);
#pragma GCC unroll 2
            for (int g = 0; g < G; g++) ia[i][g] = o;
        }
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) {
            __m512i wv[X16R_TG];
#pragma GCC unroll 2
            for (int g = 0; g < G; g++) wv[g] = _mm512_load_si512((const void *)(rp->lv[g0 + g] + 64 * (NV * u + v)));
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++) {
                const __m512i xv = _mm512_set1_epi32(ifg_x4(xb + (size_t)i * ldq + SK * u + 4 * v));
#pragma GCC unroll 2
                for (int g = 0; g < G; g++) ia[i][g] = _mm512_dpbusd_epi32(ia[i][g], wv[g], xv);
            }
        }
#pragma GCC unroll 8
        for (int i = 0; i < TT; i++) {
            const int xi = (i0 + i) * ldd + (kx0 + SK * u) / 32;
            const __m512 dx = _mm512_set1_ps(xt->d[xi]);
            const __m512 sx = MIN ? _mm512_set1_ps(xt->d[xi] * (float)xt->s[xi]) : dx;
#pragma GCC unroll 2
            for (int g = 0; g < G; g++) {
                acc[i][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[i][g]), _mm512_mul_ps(_mm512_load_ps(rp->ws[g0 + g][u]), dx), acc[i][g]);
                if (MIN) acc[i][g] = _mm512_fnmadd_ps(_mm512_load_ps(rp->wm[g0 + g][u]), sx, acc[i][g]);
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 2
        for (int g = 0; g < G; g++) _mm512_storeu_ps(y + (size_t)(t + i0 + i) * ldy + n + 16 * g, acc[i][g]);
}
#else /* AVX2: one group as two 8-row halves */
#define X16R_TT 2
#define X16R_TG 1
IFG_AI void x16r_tile(float *y, int ldy, const struct x16_tile *xt, const int32_t *xs, int lds,
                      const struct x16_rep *rp, int g0, int t, int i0, int n, int kx0, int nu, int add,
                      const int TT, const int G, const int SK, const int MIN, const int LV) {
    __m256 acc[X16R_TT][2];
    const int ldq = xt->ldq, ldd = xt->ldd, NV = SK / 4;
    /* vpmaddubsw lanes sum 2 products <= 2 * (2^LV - 1) * 127: P of them fit int16 */
    const int P = LV == 4 ? 8 : LV == 5 ? 4 : 2;
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *xb = xt->q + (size_t)i0 * ldq + kx0;
    const uint8_t *lv = rp->lv[g0];
    (void)G;
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
        for (int h = 0; h < 2; h++)
            acc[i][h] = add ? _mm256_loadu_ps(y + (size_t)(t + i0 + i) * ldy + n + 8 * h) : _mm256_setzero_ps();
    for (int u = 0; u < nu; u++) {
        __m256i ia[X16R_TT][2], p16[X16R_TT][2];
#pragma GCC unroll 8
        for (int i = 0; i < TT; i++)
            for (int h = 0; h < 2; h++)
                ia[i][h] = MIN ? _mm256_setzero_si256() : _mm256_set1_epi32(-xs[(i0 + i) * lds + kx0 / 16 + u]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) {
            const __m256i w0 = _mm256_load_si256((const __m256i *)(lv + 64 * (NV * u + v)));
            const __m256i w1 = _mm256_load_si256((const __m256i *)(lv + 64 * (NV * u + v) + 32));
#pragma GCC unroll 8
            for (int i = 0; i < TT; i++) {
                const __m256i xv = _mm256_set1_epi32(ifg_x4(xb + (size_t)i * ldq + SK * u + 4 * v));
                const __m256i p0 = _mm256_maddubs_epi16(w0, xv), p1 = _mm256_maddubs_epi16(w1, xv);
                p16[i][0] = v % P == 0 ? p0 : _mm256_add_epi16(p16[i][0], p0);
                p16[i][1] = v % P == 0 ? p1 : _mm256_add_epi16(p16[i][1], p1);
                if (v % P == P - 1 || v == NV - 1)
                    for (int h = 0; h < 2; h++) ia[i][h] = _mm256_add_epi32(ia[i][h], _mm256_madd_epi16(p16[i][h], ones));
            }
        }
#pragma GCC unroll 8
        for (int i = 0; i < TT; i++) {
            const int xi = (i0 + i) * ldd + (kx0 + SK * u) / 32;
            for (int h = 0; h < 2; h++) {
                acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[i][h]),
                                            _mm256_mul_ps(_mm256_load_ps(rp->ws[g0][u] + 8 * h), _mm256_set1_ps(xt->d[xi])), acc[i][h]);
                if (MIN)
                    acc[i][h] = _mm256_fnmadd_ps(_mm256_load_ps(rp->wm[g0][u] + 8 * h),
                                                 _mm256_set1_ps(xt->d[xi] * (float)xt->s[xi]), acc[i][h]);
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
        for (int h = 0; h < 2; h++) _mm256_storeu_ps(y + (size_t)(t + i0 + i) * ldy + n + 8 * h, acc[i][h]);
}
#endif

/* Tokens [t, t + tt) of the x tile × the rep's first ng groups (rows n.. of y), x16r_tile's
 * other arguments. */
IFG_AI void x16r_tiles(float *y, int ldy, const struct x16_tile *xt, const int32_t *xs, int lds,
                       const struct x16_rep *rp, int ng, int t, int tt, int n, int kx0, int nu, int add,
                       const int SK, const int MIN, const int LV) {
    if (X16R_TG > 1 && ng == X16R_TG) {
        enum { TT2 = X16R_TT / X16R_TG };
        for (int i0 = 0; i0 < tt; i0 += TT2) {
            const int r = tt - i0;
#define X16R_CASE(TTC) x16r_tile(y, ldy, xt, xs, lds, rp, 0, t, i0, n, kx0, nu, add, TTC, X16R_TG, SK, MIN, LV)
            X16_TSWITCH(r, TT2, X16R_CASE);
#undef X16R_CASE
        }
        return;
    }
    for (int g = 0; g < ng; g++)
        for (int i0 = 0; i0 < tt; i0 += X16R_TT) {
            const int r = tt - i0;
#define X16R_CASE(TTC) x16r_tile(y, ldy, xt, xs, lds, rp, g, t, i0, n + 16 * g, kx0, nu, add, TTC, 1, SK, MIN, LV)
            X16_TSWITCH(r, X16R_TT, X16R_CASE);
#undef X16R_CASE
        }
}
#endif

/* Repack N rows of nb source blocks (sb bytes each) into groups of 16 rows: group g's
 * group-block b (16·sb bytes) gets row r's block b through put(o, s, r). Groups split over
 * threads; one source row at a time (sequential reads). */
static inline void x16_interleave(void *dst, const void *src, int N, int nb, size_t sb,
                                  void (*put)(uint8_t *o, const uint8_t *s, int r), int n_threads) {
    const int G = N / 16;
    IFG_PARALLEL(n_threads) {
        IFG_FOR
        for (int g = 0; g < G; g++)
            for (int r = 0; r < 16; r++) {
                const uint8_t *row = (const uint8_t *)src + ((size_t)g * 16 + r) * nb * sb;
                for (int b = 0; b < nb; b++)
                    put((uint8_t *)dst + ((size_t)g * nb + b) * 16 * sb, row + (size_t)b * sb, r);
            }
    }
}

#endif
