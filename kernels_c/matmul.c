/* matmul.c — y (=|+=) x · Wᵀ with W row-major [N][K] in f32, bf16 or f16; f32 compute.
 *
 * Threads split N into contiguous row ranges (one chunk per thread, MM_ALIGN rows at a time).
 * Within a range:
 *  - T == 1 (decode GEMV): MM_GR weight rows at a time, one accumulator per row and k-block,
 *    x read in place: the GEMM below with one token, minus the x copy (see the next point).
 *    Memory-bound: each weight is read once.
 *  - T > 1 (prefill GEMM): blocks of MM_TB tokens × MM_NB rows × MM_KB k. For each token
 *    tile (MM_TT tokens) of a block, the x rows of the k-block are copied once into an
 *    aligned stack buffer (MM_TT × MM_XS f32: 24 KiB on AVX-512, 16 KiB on AVX2, so it stays
 *    in L1; zero-padded at the K tail, so x loads are aligned whatever the caller's x); then
 *    every row tile (MM_NT rows) of the block runs a register-tiled micro-kernel with
 *    MM_TT × MM_NT vector accumulators (AVX-512 6 × 4, AVX2 4 × 3), each weight vector loaded
 *    and converted once and used for all MM_TT tokens. The MM_NB × MM_KB weight block stays
 *    in L2 while the token tiles of the token block go over it. Partial sums of successive
 *    k-blocks go through y (the first k-block stores unless accumulating). A decode batch (at
 *    most 2 token tiles) instead runs each row tile through its token tiles at once: W streams
 *    from DRAM in one pass.
 * Weights are converted in registers only (bf16: zero-extend + shift 16; f16: vcvtph2ps) and
 * read in place, best 64-byte aligned as the infeng weight format stores them. K tails use
 * masked loads (AVX-512), maskload or a 16-byte copy of the raw tail bits (AVX2): nothing
 * outside W's rows or x's first K columns is read.
 *
 * Each output's summation order depends only on K (the same lane-wise k-steps, k-blocks and
 * reduction tree whichever tile or thread computes it, the GEMV included), so results are
 * bitwise identical for any thread count and any number of rows in the call: a row decoded
 * alone (GEMV) equals the same row verified in a batch (speculative decoding is exact).
 *
 * Tried and dropped (numbers on this Sapphire Rapids, T=512, N=K=2048, bf16, one thread):
 *  - AVX-512 BF16 vdpbf16ps with x split into hi = bf16(x), lo = bf16(x - hi), two
 *    vdpbf16ps per weight vector: 52 GFLOP/s against 139 for this FMA path (vdpbf16ps issues
 *    at one per two cycles here), and x is then exact only to ~2^-16 relative.
 *    (x rounded to bf16 once, one vdpbf16ps per weight vector, is the opt-in bf16_dp form:
 *    matmul_bf16dp.c, dispatched from mm_rows.)
 *  - bf16 even/odd split of one 64-byte load (shift / mask) against a de-interleaved x
 *    copy: no faster than zero-extend + shift, slower when W is not 64-byte aligned.
 *  - larger token tiles (7-12 × 2-3): no gain. (Software prefetch of W looked like no gain
 *    timed on one L3-resident matrix; streamed from DRAM, as in decode, it is the GEMV's speed.) */
#include "matmul.h"
#include "quant.h"
#include "quant_k.h"
#include "quant_gguf.h"
#include "simd.h"

static inline int mm_team(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

#ifdef IFG_SIMD
/* ---- SIMD (simd.h's vocabulary): written once for AVX2 and AVX-512 ---- */
#define MM_W IFG_VW
/* ---- per-ISA: register tile sizes, and AVX-512's transposed GEMM reduction ---- */
#if defined(IFG_AVX512)
#ifndef MM_TT
#define MM_TT 6 /* GEMM register tile: 6 tokens × 4 rows = 24 zmm accumulators + 4 weights */
#endif
#ifndef MM_NT
#define MM_NT 4
#endif
IFG_AI __m128 mm_chunk128(ifg_vf v, int c) {
    switch (c & 3) {
    case 0: return _mm512_castps512_ps128(v);
    case 1: return _mm512_extractf32x4_ps(v, 1);
    case 2: return _mm512_extractf32x4_ps(v, 2);
    default: return _mm512_extractf32x4_ps(v, 3);
    }
}
/* GEMM reduction, transposed (shuffles are on the FMA ports here, so they are kept few):
 * tokens a0..a3 of one row → 128-bit chunk i holds 4 partial lanes of token i, each the
 * sum of lanes {l, l+4, l+8, l+12} as (l + l+8) + (l+4 + l+12). */
IFG_AI ifg_vf mm_red_tokens(ifg_vf a0, ifg_vf a1, ifg_vf a2, ifg_vf a3) {
    const ifg_vf p01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xee));
    const ifg_vf p23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xee));
    return _mm512_add_ps(_mm512_shuffle_f32x4(p01, p23, 0x88), _mm512_shuffle_f32x4(p01, p23, 0xdd));
}
/* Rows v0..v3 of mm_red_tokens → chunk i, lane j = full sum of (token i, row j), the four
 * partial lanes added as (l0 + l2) + (l1 + l3). */
IFG_AI ifg_vf mm_red_rows(ifg_vf v0, ifg_vf v1, ifg_vf v2, ifg_vf v3) {
    const __m512d u = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1)));
    const __m512d w = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3)));
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(u, w)), _mm512_castpd_ps(_mm512_unpackhi_pd(u, w)));
}
#else /* AVX2 */
#ifndef MM_TT
#define MM_TT 4 /* 4 tokens × 3 rows = 12 ymm accumulators + 3 weights + 1 x */
#endif
#ifndef MM_NT
#define MM_NT 3
#endif
#endif

#ifndef MM_TB
#define MM_TB (8 * MM_TT) /* token block: its x rows stay in L2 */
#endif
#ifndef MM_NB
#define MM_NB (32 * MM_NT) /* row block: MM_NB × MM_KB weights stay in L2 across token tiles */
#endif
#ifndef MM_KB
#define MM_KB 1024 /* k block (multiple of MM_W): the x tile MM_TT × MM_KB stays in L1 */
#endif
#ifndef MM_XS
#define MM_XS (MM_KB + 16) /* row stride of the x tile: not a multiple of 4 KiB (L1 sets) */
#endif
#define MM_ALIGN (4 * MM_NT) /* rows per thread are a multiple of this (except the last) */
#ifndef MM_GR
#define MM_GR 8              /* GEMV rows per step: 8 accumulator chains */
#endif

/* Weights prefetched one row tile ahead go to L2 (prefetcht1: into L1 they evict x's tile). */
#ifndef MM_PFH
#define MM_PFH 2
#endif
#define MM_PF(p) __builtin_prefetch((const void *)(p), 0, MM_PFH)

/* ---- GEMM ---- */
/* Copy x rows t..t+tt, k in [k0, k1) to the aligned tile xp (row i at xp + i*MM_XS),
 * zero-padded to a multiple of MM_W; RX: rounded to bf16 (IFG_BF16_DP without vdpbf16ps). */
IFG_AI void mm_pack_x(float *xp, const float *x, int ldx, int t, int tt, int k0, int k1, const int RX) {
    const int kl = k1 - k0;
    for (int i = 0; i < tt; i++) {
        const float *xr = x + (size_t)(t + i) * ldx + k0;
        float *d = xp + (size_t)i * MM_XS;
        int k = 0;
        for (; k + MM_W <= kl; k += MM_W) ifg_vstorea(d + k, RX ? ifg_vround_bf16(ifg_vload(xr + k)) : ifg_vload(xr + k));
        if (k < kl) ifg_vstorea(d + k, RX ? ifg_vround_bf16(ifg_vload_n(xr + k, kl - k)) : ifg_vload_n(xr + k, kl - k));
    }
}

#if defined(IFG_AVX512)
/* Reduce the TT × NT accumulators of a tile and store (add != 0: add) them to y. Groups of
 * 4 tokens × 4 rows, absent ones as zeros, so every output has the same reduction tree. */
#define MM_STORE_TILE(acc)                                                                      \
    _Pragma("GCC unroll 4") for (int g = 0; g < TT; g += 4) {                                    \
        ifg_vf v_[4];                                                                               \
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {                                     \
            v_[j] = j < NT ? mm_red_tokens(acc[g][j % NT],                                        \
                                           g + 1 < TT ? acc[(g + 1) % TT][j % NT] : ifg_vzero(),    \
                                           g + 2 < TT ? acc[(g + 2) % TT][j % NT] : ifg_vzero(),    \
                                           g + 3 < TT ? acc[(g + 3) % TT][j % NT] : ifg_vzero())    \
                           : ifg_vzero();                                                           \
        }                                                                                         \
        const ifg_vf s_ = mm_red_rows(v_[0], v_[1], v_[2], v_[3]);                                  \
        _Pragma("GCC unroll 4") for (int c_ = 0; c_ < 4; c_++) {                                  \
            if (g + c_ >= TT) break;                                                              \
            float *yo = y + (size_t)(t + g + c_) * ldy + n;                                       \
            const __m128 q = mm_chunk128(s_, c_);                                                 \
            if (NT == 4) {                                                                        \
                _mm_storeu_ps(yo, add ? _mm_add_ps(_mm_loadu_ps(yo), q) : q);                     \
            } else {                                                                              \
                float f_[4];                                                                      \
                _mm_storeu_ps(f_, q);                                                             \
                _Pragma("GCC unroll 4") for (int j = 0; j < NT; j++) yo[j] = add ? yo[j] + f_[j] : f_[j]; \
            }                                                                                     \
        }                                                                                         \
    }
#else
/* AVX2: fold + hadd per accumulator (the shuffles run beside the FMAs, on port 5). */
#define MM_STORE_TILE(acc)                                                                      \
    _Pragma("GCC unroll 16") for (int i = 0; i < TT; i++) {                                      \
        float s_[MM_NT], *yo = y + (size_t)(t + i) * ldy + n;                                     \
        int j = 0;                                                                                \
        _Pragma("GCC unroll 16") for (; j + 4 <= NT; j += 4)                                      \
            _mm_storeu_ps(s_ + j, ifg_hadd4(ifg_vfold(acc[i][j]), ifg_vfold(acc[i][j + 1]),            \
                                           ifg_vfold(acc[i][j + 2]), ifg_vfold(acc[i][j + 3])));      \
        _Pragma("GCC unroll 16") for (; j < NT; j++) s_[j] = ifg_hadd1(ifg_vfold(acc[i][j]));        \
        _Pragma("GCC unroll 16") for (j = 0; j < NT; j++) yo[j] = add ? yo[j] + s_[j] : s_[j];    \
    }
#endif

/* Register tile: TT tokens (from t; x packed in xp) × NT rows (from n), k in [k0, k1). */
IFG_AI void mm_gemm_tile(float *y, int ldy, const float *xp, const void *w, int wtype, int t,
                        int n, int K, int k0, int k1, int add, const int TT, const int NT, int pf) {
    ifg_vf acc[MM_TT][MM_NT];
    const size_t wb = (size_t)n * K;
    const int es = wtype == IFG_F32 ? 4 : 2; /* pf: the next tile's rows, prefetched at the same k */
    const char *wp = (const char *)w + (size_t)pf * K * es;
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) acc[i][j] = ifg_vzero();
    int k = k0;
    for (; k + MM_W <= k1; k += MM_W) {
        ifg_vf wv[MM_NT];
        if (es == 2 && (k & 31) == 0) /* one prefetch per 64-byte line */
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++) MM_PF(wp + ((size_t)j * K + k) * es);
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) wv[j] = ifg_vload_w(w, wtype, wb + (size_t)j * K + k);
#pragma GCC unroll 16
        for (int i = 0; i < TT; i++) {
            const ifg_vf xv = ifg_vloada(xp + (size_t)i * MM_XS + (k - k0));
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++) acc[i][j] = ifg_vfma(wv[j], xv, acc[i][j]);
        }
    }
    if (k < k1) { /* weights masked; x is zero-padded in xp */
        const int r = k1 - k;
        ifg_vf wv[MM_NT];
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) wv[j] = ifg_vload_w_n(w, wtype, wb + (size_t)j * K + k, r);
#pragma GCC unroll 16
        for (int i = 0; i < TT; i++) {
            const ifg_vf xv = ifg_vloada(xp + (size_t)i * MM_XS + (k - k0));
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++) acc[i][j] = ifg_vfma(wv[j], xv, acc[i][j]);
        }
    }
    MM_STORE_TILE(acc)
}

/* ---- GEMV (T == 1): the GEMM's order with x read in place ----
 * R rows from n (R = MM_GR, or 1 at the end), one accumulator each per k-block, reduced and added
 * through y exactly as mm_gemm_tile does with one token (MM_STORE_TILE with TT = 1; x's masked
 * tail loads the zeros the GEMM's padded x tile holds), so a row's outputs are bitwise the same
 * whether it is decoded alone or verified in a batch (speculative decoding relies on it).
 * The weights stream from DRAM: each row is its own short stream (a 4 KiB row is one page, where
 * the hardware prefetchers start over), so the rows from pf (the next group) are prefetched into
 * L2 at the same k, one group ahead. */
IFG_AI void mm_gemv_tile(float *y, const float *x, const void *w, int wtype, int n0, int K, int accumulate,
                         const int R, int pf) {
    const int ldy = 0, t = 0, TT = 1;
    const int es = wtype == IFG_F32 ? 4 : 2, EL = 64 / es; /* bytes, elements per cache line */
    const char *wp = (const char *)w + (size_t)pf * K * es;
    for (int k0 = 0; k0 < K; k0 += MM_KB) {
        const int k1 = k0 + MM_KB < K ? k0 + MM_KB : K, add = accumulate || k0 > 0;
        ifg_vf a[MM_GR][1];
#pragma GCC unroll 16
        for (int j = 0; j < R; j++) a[j][0] = ifg_vzero();
        int k = k0;
        for (; k + EL <= k1; k += EL) {
            if (es == 2) /* f32 rows (two pages each) stream as fast without */
#pragma GCC unroll 16
                for (int j = 0; j < R; j++) MM_PF(wp + ((size_t)j * K + k) * es);
#pragma GCC unroll 4
            for (int u = 0; u < EL; u += MM_W) {
                const ifg_vf xv = ifg_vload(x + k + u);
#pragma GCC unroll 16
                for (int j = 0; j < R; j++)
                    a[j][0] = ifg_vfma(ifg_vload_w(w, wtype, (size_t)(n0 + j) * K + k + u), xv, a[j][0]);
            }
        }
        for (; k + MM_W <= k1; k += MM_W) {
            const ifg_vf xv = ifg_vload(x + k);
#pragma GCC unroll 16
            for (int j = 0; j < R; j++) a[j][0] = ifg_vfma(ifg_vload_w(w, wtype, (size_t)(n0 + j) * K + k), xv, a[j][0]);
        }
        if (k < k1) {
            const ifg_vf xv = ifg_vload_n(x + k, k1 - k);
#pragma GCC unroll 16
            for (int j = 0; j < R; j++)
                a[j][0] = ifg_vfma(ifg_vload_w_n(w, wtype, (size_t)(n0 + j) * K + k, k1 - k), xv, a[j][0]);
        }
#pragma GCC unroll 16
        for (int r = 0; r < R; r += MM_NT) { /* the GEMM's row tiles: MM_NT rows per store */
            const int n = n0 + r, NT = R - r < MM_NT ? R - r : MM_NT;
            ifg_vf acc[1][MM_NT];
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++) acc[0][j] = a[r + j][0];
            MM_STORE_TILE(acc)
        }
    }
}

IFG_AI void mm_gemv_rows(float *y, const float *x, const void *w, int wtype, int n0, int n1, int K, int acc) {
    int n = n0;
    for (; n + MM_GR <= n1; n += MM_GR)
        mm_gemv_tile(y, x, w, wtype, n, K, acc, MM_GR, n + 2 * MM_GR <= n1 ? n + MM_GR : n);
    for (; n < n1; n++) mm_gemv_tile(y, x, w, wtype, n, K, acc, 1, n + 1 < n1 ? n + 1 : n);
}
static void mm_gemv_rows_f32(float *y, const float *x, const void *w, int n0, int n1, int K, int acc) {
    mm_gemv_rows(y, x, w, IFG_F32, n0, n1, K, acc);
}
static void mm_gemv_rows_bf16(float *y, const float *x, const void *w, int n0, int n1, int K, int acc) {
    mm_gemv_rows(y, x, w, IFG_BF16, n0, n1, K, acc);
}
static void mm_gemv_rows_f16(float *y, const float *x, const void *w, int n0, int n1, int K, int acc) {
    mm_gemv_rows(y, x, w, IFG_F16, n0, n1, K, acc);
}

#ifndef MM_PFD
#define MM_PFD 1 /* GEMM prefetch distance in row tiles */
#endif
/* All row tiles of [n0, ne) for the TTC tokens from t (x packed at xt); each prefetches the rows
 * MM_PFD tiles on (up to r1, the thread's last row). */
#define MM_NLOOP(TTC)                                                                            \
    do {                                                                                          \
        int n_ = n0;                                                                              \
        for (; n_ + MM_NT <= ne; n_ += MM_NT)                                                     \
            mm_gemm_tile(y, ldy, xt, w, wtype, t, n_, K, k0, k1, add, TTC, MM_NT,                 \
                         n_ + (MM_PFD + 1) * MM_NT <= r1 ? n_ + MM_PFD * MM_NT : n_);             \
        for (; n_ < ne; n_++) mm_gemm_tile(y, ldy, xt, w, wtype, t, n_, K, k0, k1, add, TTC, 1, n_); \
    } while (0)
/* A runtime token count tt (1..MM_TT) to the tile specialised for it (the tests on MM_TT
 * are constant: branches for counts above MM_TT are compiled away). */
#define MM_TMIN(k) ((k) < MM_TT ? (k) : MM_TT)
#define MM_TSWITCH()                                                                             \
    if (tt >= MM_TT) MM_NLOOP(MM_TT);                                                             \
    else if (tt == 1) MM_NLOOP(1);                                                                \
    else if (MM_TT > 2 && tt == 2) MM_NLOOP(MM_TMIN(2));                                          \
    else if (MM_TT > 3 && tt == 3) MM_NLOOP(MM_TMIN(3));                                          \
    else if (MM_TT > 4 && tt == 4) MM_NLOOP(MM_TMIN(4));                                          \
    else if (MM_TT > 5 && tt == 5) MM_NLOOP(MM_TMIN(5));                                          \
    else if (MM_TT > 6 && tt == 6) MM_NLOOP(MM_TMIN(6));                                          \
    else if (MM_TT > 7 && tt == 7) MM_NLOOP(MM_TMIN(7));
#if MM_TT > 8 || MM_NT > 4 || MM_KB % MM_W != 0 || MM_XS % MM_W != 0
#error "tile sizes: MM_TT <= 8, MM_NT <= 4, MM_KB and MM_XS multiples of MM_W"
#endif

IFG_AI void mm_gemm_rows_t(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                          int T, int r0, int r1, int K, int accumulate, const int RX) {
    _Alignas(64) float xp[2 * MM_TT * MM_XS]; /* x tiles of one k-block (L1-resident) */
    for (int t0 = 0; t0 < T; t0 += MM_TB) {
        const int te = t0 + MM_TB < T ? t0 + MM_TB : T;
        /* as few tiles as MM_TT allows, of balanced sizes: 8 tokens go as 4 + 4, not 6 + 2,
         * whose few accumulator chains cannot hide the FMA latency */
        const int nt = (te - t0 + MM_TT - 1) / MM_TT, base = (te - t0) / nt, big = (te - t0) % nt;
        if (nt <= 2) {
            /* A decode batch: x of all its tokens packed once per k-block, and each row tile's W
             * runs through both token tiles at once (the second from L1): W streams in one pass. */
            for (int k0 = 0; k0 < K; k0 += MM_KB) {
                const int k1 = k0 + MM_KB < K ? k0 + MM_KB : K, add = accumulate || k0 > 0;
                mm_pack_x(xp, x, ldx, t0, te - t0, k0, k1, RX);
                for (int n0 = r0; n0 < r1; n0 += MM_NT) {
                    const int ne = n0 + MM_NT < r1 ? n0 + MM_NT : r1;
                    for (int i = 0, t = t0; i < nt; i++) {
                        const int tt = base + (i < big);
                        const float *xt = xp + (size_t)(t - t0) * MM_XS;
                        MM_TSWITCH()
                        t += tt;
                    }
                }
            }
            continue;
        }
        for (int n0 = r0; n0 < r1; n0 += MM_NB) {
            const int ne = n0 + MM_NB < r1 ? n0 + MM_NB : r1;
            for (int k0 = 0; k0 < K; k0 += MM_KB) {
                const int k1 = k0 + MM_KB < K ? k0 + MM_KB : K, add = accumulate || k0 > 0;
                for (int i = 0, t = t0; i < nt; i++) {
                    const int tt = base + (i < big);
                    const float *xt = xp;
                    mm_pack_x(xp, x, ldx, t, tt, k0, k1, RX);
                    MM_TSWITCH()
                    t += tt;
                }
            }
        }
    }
}
static void mm_gemm_rows_f32(float *y, int ldy, const float *x, int ldx, const void *w, int T,
                             int r0, int r1, int K, int acc) {
    mm_gemm_rows_t(y, ldy, x, ldx, w, IFG_F32, T, r0, r1, K, acc, 0);
}
static void mm_gemm_rows_bf16(float *y, int ldy, const float *x, int ldx, const void *w, int T,
                              int r0, int r1, int K, int acc) {
    mm_gemm_rows_t(y, ldy, x, ldx, w, IFG_BF16, T, r0, r1, K, acc, 0);
}
static void mm_gemm_rows_f16(float *y, int ldy, const float *x, int ldx, const void *w, int T,
                             int r0, int r1, int K, int acc) {
    mm_gemm_rows_t(y, ldy, x, ldx, w, IFG_F16, T, r0, r1, K, acc, 0);
}

#if !defined(IFG_AVX512)
/* IFG_BF16_DP without vdpbf16ps: x rounded to bf16 as it is packed, then the bf16 GEMM (any T). */
static void mm_gemm_rows_bf16r(float *y, int ldy, const float *x, int ldx, const void *w, int T,
                               int r0, int r1, int K, int acc) {
    mm_gemm_rows_t(y, ldy, x, ldx, w, IFG_BF16, T, r0, r1, K, acc, 1);
}
#endif

static void mm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype, int T,
                    int r0, int r1, int K, int accumulate) {
    if (wtype == IFG_BF16_DP) {
#if defined(IFG_AVX512)
        ifg_mm_bf16dp_rows(y, ldy, x, ldx, w, T, r0, r1, K, accumulate);
#else
        mm_gemm_rows_bf16r(y, ldy, x, ldx, w, T, r0, r1, K, accumulate);
#endif
        return;
    }
    if (T == 1) {
        switch (wtype) {
        case IFG_BF16: mm_gemv_rows_bf16(y, x, w, r0, r1, K, accumulate); break;
        case IFG_F16: mm_gemv_rows_f16(y, x, w, r0, r1, K, accumulate); break;
        default: mm_gemv_rows_f32(y, x, w, r0, r1, K, accumulate); break;
        }
        return;
    }
    switch (wtype) {
    case IFG_BF16: mm_gemm_rows_bf16(y, ldy, x, ldx, w, T, r0, r1, K, accumulate); break;
    case IFG_F16: mm_gemm_rows_f16(y, ldy, x, ldx, w, T, r0, r1, K, accumulate); break;
    default: mm_gemm_rows_f32(y, ldy, x, ldx, w, T, r0, r1, K, accumulate); break;
    }
}
#else
/* ---- scalar reference (the scalar build): plain loops, f32 accumulation in k order ---- */
#define MM_ALIGN 16
static void mm_rows_ref(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                        int T, int n0, int n1, int K, int accumulate) {
    const int rx = wtype == IFG_BF16_DP, wt = rx ? IFG_BF16 : wtype; /* x rounded to bf16 */
    for (int n = n0; n < n1; n++) {
        const size_t wb = (size_t)n * K;
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * ldx;
            float acc = 0.0f;
            for (int k = 0; k < K; k++)
                acc += (rx ? ifg_bf16_to_f32(ifg_f32_to_bf16(xt[k])) : xt[k]) * ifg_load_f32(w, wt, wb + k);
            float *yo = y + (size_t)t * ldy + n;
            *yo = accumulate ? *yo + acc : acc;
        }
    }
}
#define mm_rows mm_rows_ref
#endif

int ifg_matmul_row_align(int wtype) {
    return ifg_is_qx16(wtype) || ifg_is_qkx16(wtype) || ifg_is_quant_gguf_x16(wtype) ? 16 : MM_ALIGN; /* x16: whole row groups */
}

int ifg_matmul_token_block(int wtype) {
#if defined(IFG_AVX512)
    if (wtype == IFG_BF16_DP) return ifg_mm_bf16dp_token_block();
#endif
#ifdef IFG_SIMD
    return ifg_is_qx16(wtype) || ifg_is_qkx16(wtype) || ifg_is_quant(wtype) || ifg_is_quant_k(wtype) ||
           ifg_is_quant_gguf(wtype) ? 64 : MM_TB;
#else
    (void)wtype;
    return 64;
#endif
}

void ifg_matmul_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                     int T, int r0, int r1, int K, int accumulate) {
    ifg_matmul_rows_xq(y, ldy, x, ldx, w, wtype, T, r0, r1, K, accumulate, NULL);
}

void ifg_matmul_rows_xq(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                        int T, int r0, int r1, int K, int accumulate, const struct ifg_xq *xq) {
    if (T <= 0 || r0 >= r1) return;
    if (K <= 0) { /* empty sum */
        if (!accumulate)
            for (int t = 0; t < T; t++)
                for (int n = r0; n < r1; n++) y[(size_t)t * ldy + n] = 0.0f;
    } else if (ifg_is_qx16(wtype)) {
        ifg_qmm_x16_rows(y, ldy, x, ldx, w, wtype, T, r0, r1, K, accumulate, NULL, xq);
    } else if (ifg_is_qkx16(wtype)) {
        ifg_qk_mm_x16_rows(y, ldy, x, ldx, w, T, r0, r1, K, accumulate, xq);
    } else if (ifg_is_quant(wtype)) {
        ifg_qmm_rows(y, ldy, x, ldx, w, wtype, T, r0, r1, K, accumulate);
    } else if (ifg_is_quant_k(wtype)) {
        ifg_qk_mm_rows(y, ldy, x, ldx, w, wtype, T, r0, r1, K, accumulate);
    } else if (ifg_is_quant_gguf(wtype)) {
        ifg_qg_mm_rows(y, ldy, x, ldx, w, wtype, T, r0, r1, K, accumulate, xq);
    } else {
        mm_rows(y, ldy, x, ldx, w, wtype, T, r0, r1, K, accumulate);
    }
}

void ifg_matmul_part(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                     int T, int N, int K, int accumulate) {
    ifg_matmul_part_xq(y, ldy, x, ldx, w, wtype, T, N, K, accumulate, NULL);
}

void ifg_matmul_part_xq(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                        int T, int N, int K, int accumulate, const struct ifg_xq *xq) {
    ifg_matmul_part_xq_wait(y, ldy, x, ldx, w, wtype, T, N, K, accumulate, xq, 1);
}

void ifg_matmul_part_xq_wait(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                             int T, int N, int K, int accumulate, const struct ifg_xq *xq, int wait) {
    if (T <= 0 || N <= 0) return; /* the same for every thread: no worksharing to skip */
    const int nc = mm_team();
    IFG_FOR_NOWAIT /* the closing barrier only when asked (ifg_wait_if) */
    for (int c = 0; c < nc; c++) { /* one contiguous row range per thread */
        int r0, r1;
        ifg_chunk(N, ifg_matmul_row_align(wtype), c, nc, &r0, &r1);
        ifg_matmul_rows_xq(y, ldy, x, ldx, w, wtype, T, r0, r1, K, accumulate, xq);
    }
    ifg_wait_if(wait);
}

void ifg_matmul(float *y, int ldy, const float *x, int ldx, const void *w, int wtype, int T,
                int N, int K, int accumulate, int n_threads) {
    IFG_PARALLEL(n_threads) { ifg_matmul_part(y, ldy, x, ldx, w, wtype, T, N, K, accumulate); }
}
