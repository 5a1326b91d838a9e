/* quant_x16.h — what the 16-row interleaved int8 kernels share (quant_x16.c: q8_0x16 / q4_0x16 /
 * q4_1x16; quant_kx16.c: q4_kx16): the tile of quantized x and how x is cut into tiles, the weight
 * prefetch, the token-count dispatch to constant tile shapes, the nibble layout and the repack
 * loop. Internal: not part of the cffi ABI. */
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
 * turns (TinyLlama's w_gate at batch 8: 0.57 ms with W in L3, 1.0 ms from DRAM). */
#define X16_PREFETCH(base, off)                                                                   \
    do {                                                                                          \
        if (pf)                                                                                   \
            for (int g_ = 0; g_ < G; g_++) _mm_prefetch((const char *)(base)[g_] + (off) + pf, _MM_HINT_T0); \
    } while (0)
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
