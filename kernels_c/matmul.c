/* matmul.c — y (=|+=) x · Wᵀ with W row-major [N][K] in f32, bf16 or f16; f32 compute.
 *
 * Threads split N into contiguous row ranges (one chunk per thread, MM_ALIGN rows at a time).
 * Within a range:
 *  - T == 1 (decode GEMV): MM_GR weight rows at a time, two accumulators per row (even and
 *    odd vector steps of k), i.e. 2*MM_GR independent FMA chains streaming the weights; one
 *    horizontal reduction per row at the end. Memory-bound: each weight is read once.
 *  - T > 1 (prefill GEMM): blocks of MM_TB tokens × MM_NB rows × MM_KB k. For each token
 *    tile (MM_TT tokens) of a block, the x rows of the k-block are copied once into an
 *    aligned stack buffer (MM_TT × MM_XS f32: 24 KiB on AVX-512, 16 KiB on AVX2, so it stays
 *    in L1; zero-padded at the K tail, so x loads are aligned whatever the caller's x); then
 *    every row tile (MM_NT rows) of the block runs a register-tiled micro-kernel with
 *    MM_TT × MM_NT vector accumulators (AVX-512 6 × 4, AVX2 4 × 3), each weight vector loaded
 *    and converted once and used for all MM_TT tokens. The MM_NB × MM_KB weight block stays
 *    in L2 while the token tiles of the token block go over it. Partial sums of successive
 *    k-blocks go through y (the first k-block stores unless accumulating).
 * Weights are converted in registers only (bf16: zero-extend + shift 16; f16: vcvtph2ps) and
 * read in place, best 64-byte aligned as the infeng weight format stores them. K tails use
 * masked loads (AVX-512), maskload or a 16-byte copy of the raw tail bits (AVX2): nothing
 * outside W's rows or x's first K columns is read.
 *
 * Each output's summation order depends only on K (the same lane-wise k-steps, k-blocks and
 * reduction tree whichever tile or thread computes it), so results are bitwise identical for
 * any thread count.
 *
 * Tried and dropped (numbers on this Sapphire Rapids, T=512, N=K=2048, bf16, one thread):
 *  - AVX-512 BF16 vdpbf16ps with x split into hi = bf16(x), lo = bf16(x - hi), two
 *    vdpbf16ps per weight vector: 52 GFLOP/s against 139 for this FMA path (vdpbf16ps issues
 *    at one per two cycles here), and x is then exact only to ~2^-16 relative.
 *  - bf16 even/odd split of one 64-byte load (shift / mask) against a de-interleaved x
 *    copy: no faster than zero-extend + shift, slower when W is not 64-byte aligned.
 *  - software prefetch of W (GEMV and GEMM), larger token tiles (7-12 × 2-3): no gain. */
#include "matmul.h"
#include "quant.h"
#include "quant_k.h"
#include "quant_gguf.h"

#define MM_AI static inline __attribute__((always_inline))

static inline int mm_team(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* ---------------------------------------------------------------------------------------- */
/* Scalar reference: plain loops, f32 accumulation in k order.                               */
/* ---------------------------------------------------------------------------------------- */
static void mm_ref_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                        int T, int n0, int n1, int K, int accumulate) {
    for (int n = n0; n < n1; n++) {
        const size_t wb = (size_t)n * K;
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * ldx;
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += xt[k] * ifg_load_f32(w, wtype, wb + k);
            float *yo = y + (size_t)t * ldy + n;
            *yo = accumulate ? *yo + acc : acc;
        }
    }
}

#if defined(IFG_AVX512) || defined(IFG_AVX2)
/* ---------------------------------------------------------------------------------------- */
/* SIMD: one vector abstraction per ISA; the kernels below are written once.                 */
/* ---------------------------------------------------------------------------------------- */
#if defined(IFG_AVX512)
#define MM_W 16
typedef __m512 mm_v;
#ifndef MM_TT
#define MM_TT 6 /* GEMM register tile: 6 tokens × 4 rows = 24 zmm accumulators + 4 weights */
#endif
#ifndef MM_NT
#define MM_NT 4
#endif
MM_AI mm_v mm_zero(void) { return _mm512_setzero_ps(); }
MM_AI mm_v mm_fma(mm_v a, mm_v b, mm_v c) { return _mm512_fmadd_ps(a, b, c); }
MM_AI mm_v mm_add(mm_v a, mm_v b) { return _mm512_add_ps(a, b); }
MM_AI mm_v mm_ldx(const float *p) { return _mm512_loadu_ps(p); }
MM_AI mm_v mm_ldxa(const float *p) { return _mm512_load_ps(p); }
MM_AI void mm_stxa(float *p, mm_v v) { _mm512_store_ps(p, v); }
MM_AI mm_v mm_ldx_tail(const float *p, int r) { /* 0 < r < 16 */
    return _mm512_maskz_loadu_ps((__mmask16)((1u << r) - 1u), p);
}
MM_AI mm_v mm_bf16x16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
/* 16 weights w[i..i+16) as f32. */
MM_AI mm_v mm_ldw(const void *w, int wtype, size_t i) {
    const __m256i *p = (const __m256i *)((const uint16_t *)w + i);
    switch (wtype) {
    case IFG_BF16: return mm_bf16x16(_mm256_loadu_si256(p));
    case IFG_F16: return _mm512_cvtph_ps(_mm256_loadu_si256(p));
    default: return _mm512_loadu_ps((const float *)w + i);
    }
}
MM_AI mm_v mm_ldw_tail(const void *w, int wtype, size_t i, int r) { /* 0 < r < 16 */
    const __mmask16 m = (__mmask16)((1u << r) - 1u);
    const void *p = (const uint16_t *)w + i;
    switch (wtype) {
    case IFG_BF16: return mm_bf16x16(_mm256_maskz_loadu_epi16(m, p));
    case IFG_F16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
    default: return _mm512_maskz_loadu_ps(m, (const float *)w + i);
    }
}
/* 16 lanes → 4 (lane j = (a[j] + a[j+8]) + (a[j+4] + a[j+12])). */
MM_AI __m128 mm_fold(mm_v a) {
    __m256 lo = _mm512_castps512_ps256(a);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
    __m256 h = _mm256_add_ps(lo, hi);
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
MM_AI __m128 mm_chunk128(mm_v v, int c) {
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
MM_AI mm_v mm_red_tokens(mm_v a0, mm_v a1, mm_v a2, mm_v a3) {
    const mm_v p01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xee));
    const mm_v p23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xee));
    return _mm512_add_ps(_mm512_shuffle_f32x4(p01, p23, 0x88), _mm512_shuffle_f32x4(p01, p23, 0xdd));
}
/* Rows v0..v3 of mm_red_tokens → chunk i, lane j = full sum of (token i, row j), the four
 * partial lanes added as (l0 + l2) + (l1 + l3). */
MM_AI mm_v mm_red_rows(mm_v v0, mm_v v1, mm_v v2, mm_v v3) {
    const __m512d u = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1)));
    const __m512d w = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3)));
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(u, w)), _mm512_castpd_ps(_mm512_unpackhi_pd(u, w)));
}
#else /* AVX2 + FMA + F16C */
#define MM_W 8
typedef __m256 mm_v;
#ifndef MM_TT
#define MM_TT 4 /* 4 tokens × 3 rows = 12 ymm accumulators + 3 weights + 1 x */
#endif
#ifndef MM_NT
#define MM_NT 3
#endif
MM_AI mm_v mm_zero(void) { return _mm256_setzero_ps(); }
MM_AI mm_v mm_fma(mm_v a, mm_v b, mm_v c) { return _mm256_fmadd_ps(a, b, c); }
MM_AI mm_v mm_add(mm_v a, mm_v b) { return _mm256_add_ps(a, b); }
MM_AI mm_v mm_ldx(const float *p) { return _mm256_loadu_ps(p); }
MM_AI mm_v mm_ldxa(const float *p) { return _mm256_load_ps(p); }
MM_AI void mm_stxa(float *p, mm_v v) { _mm256_store_ps(p, v); }
MM_AI __m256i mm_tailmask(int r) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
MM_AI mm_v mm_ldx_tail(const float *p, int r) { return _mm256_maskload_ps(p, mm_tailmask(r)); }
MM_AI mm_v mm_bf16x8(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
MM_AI mm_v mm_ldw(const void *w, int wtype, size_t i) {
    const __m128i *p = (const __m128i *)((const uint16_t *)w + i);
    switch (wtype) {
    case IFG_BF16: return mm_bf16x8(_mm_loadu_si128(p));
    case IFG_F16: return _mm256_cvtph_ps(_mm_loadu_si128(p));
    default: return _mm256_loadu_ps((const float *)w + i);
    }
}
MM_AI mm_v mm_ldw_tail(const void *w, int wtype, size_t i, int r) { /* 0 < r < 8 */
    if (wtype != IFG_BF16 && wtype != IFG_F16)
        return _mm256_maskload_ps((const float *)w + i, mm_tailmask(r));
    uint16_t raw[8] = {0}; /* the raw tail bits (AVX2 has no 16-bit masked load) */
    memcpy(raw, (const uint16_t *)w + i, (size_t)r * 2);
    __m128i h = _mm_loadu_si128((const __m128i *)raw);
    return wtype == IFG_BF16 ? mm_bf16x8(h) : _mm256_cvtph_ps(h);
}
MM_AI __m128 mm_fold(mm_v a) {
    return _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
}
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
#define MM_GR 4              /* GEMV rows per step */

/* Horizontal sums with one fixed tree: hsum4(a,b,c,d)[j] and hsum1 give identical sums. */
MM_AI __m128 mm_hsum4(__m128 a, __m128 b, __m128 c, __m128 d) {
    return _mm_hadd_ps(_mm_hadd_ps(a, b), _mm_hadd_ps(c, d));
}
MM_AI float mm_hsum1(__m128 a) {
    __m128 h = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(_mm_hadd_ps(h, h));
}

/* ---- GEMV: R (= MM_GR or 1) rows starting at n, two accumulators per row. ---- */
MM_AI void mm_gemv_tile(float *y, const float *x, const void *w, int wtype, int n, int K,
                        int accumulate, const int R) {
    mm_v a[MM_GR], b[MM_GR];
    const size_t wb = (size_t)n * K;
#pragma GCC unroll 16
    for (int j = 0; j < R; j++) a[j] = b[j] = mm_zero();
    int k = 0;
    for (; k + 2 * MM_W <= K; k += 2 * MM_W) {
        const mm_v x0 = mm_ldx(x + k), x1 = mm_ldx(x + k + MM_W);
#pragma GCC unroll 16
        for (int j = 0; j < R; j++) {
            a[j] = mm_fma(mm_ldw(w, wtype, wb + (size_t)j * K + k), x0, a[j]);
            b[j] = mm_fma(mm_ldw(w, wtype, wb + (size_t)j * K + k + MM_W), x1, b[j]);
        }
    }
    if (k + MM_W <= K) {
        const mm_v x0 = mm_ldx(x + k);
#pragma GCC unroll 16
        for (int j = 0; j < R; j++) a[j] = mm_fma(mm_ldw(w, wtype, wb + (size_t)j * K + k), x0, a[j]);
        k += MM_W;
    }
    if (k < K) {
        const int r = K - k;
        const mm_v x1 = mm_ldx_tail(x + k, r);
#pragma GCC unroll 16
        for (int j = 0; j < R; j++)
            b[j] = mm_fma(mm_ldw_tail(w, wtype, wb + (size_t)j * K + k, r), x1, b[j]);
    }
    float s[MM_GR];
    if (R == 4) {
        _mm_storeu_ps(s, mm_hsum4(mm_fold(mm_add(a[0], b[0])), mm_fold(mm_add(a[1], b[1])),
                                  mm_fold(mm_add(a[2], b[2])), mm_fold(mm_add(a[3], b[3]))));
    } else {
#pragma GCC unroll 16
        for (int j = 0; j < R; j++) s[j] = mm_hsum1(mm_fold(mm_add(a[j], b[j])));
    }
#pragma GCC unroll 16
    for (int j = 0; j < R; j++) y[n + j] = accumulate ? y[n + j] + s[j] : s[j];
}

MM_AI void mm_gemv_rows_t(float *y, const float *x, const void *w, int wtype, int n0, int n1,
                          int K, int accumulate) {
    int n = n0;
    for (; n + MM_GR <= n1; n += MM_GR) mm_gemv_tile(y, x, w, wtype, n, K, accumulate, MM_GR);
    for (; n < n1; n++) mm_gemv_tile(y, x, w, wtype, n, K, accumulate, 1);
}
static void mm_gemv_rows_f32(float *y, const float *x, const void *w, int n0, int n1, int K, int acc) {
    mm_gemv_rows_t(y, x, w, IFG_F32, n0, n1, K, acc);
}
static void mm_gemv_rows_bf16(float *y, const float *x, const void *w, int n0, int n1, int K, int acc) {
    mm_gemv_rows_t(y, x, w, IFG_BF16, n0, n1, K, acc);
}
static void mm_gemv_rows_f16(float *y, const float *x, const void *w, int n0, int n1, int K, int acc) {
    mm_gemv_rows_t(y, x, w, IFG_F16, n0, n1, K, acc);
}

/* ---- GEMM ---- */
/* Copy x rows t..t+tt, k in [k0, k1) to the aligned tile xp (row i at xp + i*MM_XS),
 * zero-padded to a multiple of MM_W. */
static void mm_pack_x(float *xp, const float *x, int ldx, int t, int tt, int k0, int k1) {
    const int kl = k1 - k0;
    for (int i = 0; i < tt; i++) {
        const float *xr = x + (size_t)(t + i) * ldx + k0;
        float *d = xp + (size_t)i * MM_XS;
        int k = 0;
        for (; k + MM_W <= kl; k += MM_W) mm_stxa(d + k, mm_ldx(xr + k));
        if (k < kl) mm_stxa(d + k, mm_ldx_tail(xr + k, kl - k));
    }
}

#if defined(IFG_AVX512)
/* Reduce the TT × NT accumulators of a tile and store (add != 0: add) them to y. Groups of
 * 4 tokens × 4 rows, absent ones as zeros, so every output has the same reduction tree. */
#define MM_STORE_TILE(acc)                                                                      \
    _Pragma("GCC unroll 4") for (int g = 0; g < TT; g += 4) {                                    \
        mm_v v_[4];                                                                               \
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {                                     \
            v_[j] = j < NT ? mm_red_tokens(acc[g][j % NT],                                        \
                                           g + 1 < TT ? acc[(g + 1) % TT][j % NT] : mm_zero(),    \
                                           g + 2 < TT ? acc[(g + 2) % TT][j % NT] : mm_zero(),    \
                                           g + 3 < TT ? acc[(g + 3) % TT][j % NT] : mm_zero())    \
                           : mm_zero();                                                           \
        }                                                                                         \
        const mm_v s_ = mm_red_rows(v_[0], v_[1], v_[2], v_[3]);                                  \
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
            _mm_storeu_ps(s_ + j, mm_hsum4(mm_fold(acc[i][j]), mm_fold(acc[i][j + 1]),            \
                                           mm_fold(acc[i][j + 2]), mm_fold(acc[i][j + 3])));      \
        _Pragma("GCC unroll 16") for (; j < NT; j++) s_[j] = mm_hsum1(mm_fold(acc[i][j]));        \
        _Pragma("GCC unroll 16") for (j = 0; j < NT; j++) yo[j] = add ? yo[j] + s_[j] : s_[j];    \
    }
#endif

/* Register tile: TT tokens (from t; x packed in xp) × NT rows (from n), k in [k0, k1). */
MM_AI void mm_gemm_tile(float *y, int ldy, const float *xp, const void *w, int wtype, int t,
                        int n, int K, int k0, int k1, int add, const int TT, const int NT) {
    mm_v acc[MM_TT][MM_NT];
    const size_t wb = (size_t)n * K;
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) acc[i][j] = mm_zero();
    int k = k0;
    for (; k + MM_W <= k1; k += MM_W) {
        mm_v wv[MM_NT];
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) wv[j] = mm_ldw(w, wtype, wb + (size_t)j * K + k);
#pragma GCC unroll 16
        for (int i = 0; i < TT; i++) {
            const mm_v xv = mm_ldxa(xp + (size_t)i * MM_XS + (k - k0));
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++) acc[i][j] = mm_fma(wv[j], xv, acc[i][j]);
        }
    }
    if (k < k1) { /* weights masked; x is zero-padded in xp */
        const int r = k1 - k;
        mm_v wv[MM_NT];
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) wv[j] = mm_ldw_tail(w, wtype, wb + (size_t)j * K + k, r);
#pragma GCC unroll 16
        for (int i = 0; i < TT; i++) {
            const mm_v xv = mm_ldxa(xp + (size_t)i * MM_XS + (k - k0));
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++) acc[i][j] = mm_fma(wv[j], xv, acc[i][j]);
        }
    }
    MM_STORE_TILE(acc)
}

/* All row tiles of [n0, ne) for the TTC tokens from t. */
#define MM_NLOOP(TTC)                                                                            \
    do {                                                                                          \
        int n_ = n0;                                                                              \
        for (; n_ + MM_NT <= ne; n_ += MM_NT)                                                     \
            mm_gemm_tile(y, ldy, xp, w, wtype, t, n_, K, k0, k1, add, TTC, MM_NT);                \
        for (; n_ < ne; n_++) mm_gemm_tile(y, ldy, xp, w, wtype, t, n_, K, k0, k1, add, TTC, 1);  \
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

MM_AI void mm_gemm_rows_t(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                          int T, int r0, int r1, int K, int accumulate) {
    _Alignas(64) float xp[MM_TT * MM_XS]; /* x tile of one k-block (L1-resident) */
    for (int t0 = 0; t0 < T; t0 += MM_TB) {
        const int te = t0 + MM_TB < T ? t0 + MM_TB : T;
        for (int n0 = r0; n0 < r1; n0 += MM_NB) {
            const int ne = n0 + MM_NB < r1 ? n0 + MM_NB : r1;
            for (int k0 = 0; k0 < K; k0 += MM_KB) {
                const int k1 = k0 + MM_KB < K ? k0 + MM_KB : K, add = accumulate || k0 > 0;
                for (int t = t0; t < te; t += MM_TT) {
                    const int tt = te - t < MM_TT ? te - t : MM_TT;
                    mm_pack_x(xp, x, ldx, t, tt, k0, k1);
                    MM_TSWITCH()
                }
            }
        }
    }
}
static void mm_gemm_rows_f32(float *y, int ldy, const float *x, int ldx, const void *w, int T,
                             int r0, int r1, int K, int acc) {
    mm_gemm_rows_t(y, ldy, x, ldx, w, IFG_F32, T, r0, r1, K, acc);
}
static void mm_gemm_rows_bf16(float *y, int ldy, const float *x, int ldx, const void *w, int T,
                              int r0, int r1, int K, int acc) {
    mm_gemm_rows_t(y, ldy, x, ldx, w, IFG_BF16, T, r0, r1, K, acc);
}
static void mm_gemm_rows_f16(float *y, int ldy, const float *x, int ldx, const void *w, int T,
                             int r0, int r1, int K, int acc) {
    mm_gemm_rows_t(y, ldy, x, ldx, w, IFG_F16, T, r0, r1, K, acc);
}

static void mm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype, int T,
                    int r0, int r1, int K, int accumulate) {
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
#else /* scalar build */
#define MM_ALIGN 16
static void mm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype, int T,
                    int r0, int r1, int K, int accumulate) {
    mm_ref_rows(y, ldy, x, ldx, w, wtype, T, r0, r1, K, accumulate);
}
#endif

int ifg_matmul_row_align(int wtype) {
    return ifg_is_qx16(wtype) || ifg_is_qkx16(wtype) ? 16 : MM_ALIGN; /* x16: whole row groups */
}

int ifg_matmul_token_block(int wtype) {
#if defined(IFG_AVX512) || defined(IFG_AVX2)
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
        ifg_qk_mm_x16_rows(y, ldy, x, ldx, w, T, r0, r1, K, accumulate);
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
    if (T <= 0 || N <= 0) return; /* the same for every thread: no worksharing to skip */
    const int nc = mm_team();
    IFG_FOR
    for (int c = 0; c < nc; c++) { /* one contiguous row range per thread */
        int r0, r1;
        ifg_chunk(N, ifg_matmul_row_align(wtype), c, nc, &r0, &r1);
        ifg_matmul_rows_xq(y, ldy, x, ldx, w, wtype, T, r0, r1, K, accumulate, xq);
    }
}

void ifg_matmul(float *y, int ldy, const float *x, int ldx, const void *w, int wtype, int T,
                int N, int K, int accumulate, int n_threads) {
    IFG_PARALLEL(n_threads) { ifg_matmul_part(y, ldy, x, ldx, w, wtype, T, N, K, accumulate); }
}
