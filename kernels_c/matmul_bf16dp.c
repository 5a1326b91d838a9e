/* matmul_bf16dp.c — y (=|+=) x · Wᵀ for bf16 W with x rounded to bf16 (IFG_BF16_DP, matmul.h),
 * on AVX-512 BF16: vdpbf16ps adds 32 bf16 products into 16 f32 lanes per instruction, twice the
 * multiply-adds of an f32 FMA, and W needs no conversion at all. Batches and prefill, which are
 * compute-bound on the f32 path, ran 1.4-1.9× faster as whole steps; x loses its low 16 bits
 * (the KLD and the figures: docs/results.md, "bf16 activations").
 *
 * W is read in place, row-major. Per token block (DP_TB tokens) and k-block (DP_KB), x is rounded
 * to bf16 once into an aligned stack tile (zero-padded to a multiple of 32), then every row block
 * (DP_NB rows, whose k-block of W stays in L2; DP_NT rows for a batch of at most 2 token tiles,
 * so W streams in one pass) goes over it in register tiles of DP_TT tokens ×
 * DP_NT rows: per 32 k, DP_NT weight loads, DP_TT x loads, DP_TT·DP_NT vdpbf16ps. Each accumulator
 * is one (token, row) pair; ifg_vsum4 reduces them at the end of a k-block, and partial sums of
 * later k-blocks are added through y. An output's summation order depends only on K (not on T,
 * the tile or the thread), so results are bitwise the same for any batch and thread count. */
#include "matmul.h"
#include "simd.h"

#if defined(IFG_AVX512)
#ifndef DP_TT
#define DP_TT 6             /* register tile: 6 tokens × 4 rows = 24 accumulators + 4 W + 1 x */
#endif
#ifndef DP_NT
#define DP_NT 4 /* (8 × 3 measured ~10 % slower at T = 8 and 512) */
#endif
#ifndef DP_KB
#define DP_KB 1024          /* k per block (multiple of 32) */
#endif
#if DP_NT > 4 || DP_TT > 6
#error "DP_NT <= 4 (one ifg_vsum4 per token), DP_TT <= 6"
#endif
#define DP_XS (DP_KB + 32)  /* row stride of the x tile in bf16: not a multiple of 4 KiB */
#ifndef DP_TB
#define DP_TB 30            /* tokens rounded at once (5 tiles): a 62 KiB stack tile */
#endif
#ifndef DP_NB
#define DP_NB 96            /* rows per block: 192 KiB of W stay in L2 across the token tiles */
#endif

/* x rows [t, t + tt), k in [k0, k1), rounded to bf16 into xb (row i at xb + i * DP_XS), padded
 * with zeros to a multiple of 32. */
static void dp_pack_x(uint16_t *xb, const float *x, int ldx, int t, int tt, int k0, int k1) {
    const int kl = k1 - k0;
    for (int i = 0; i < tt; i++) {
        const float *xr = x + (size_t)(t + i) * ldx + k0;
        uint16_t *d = xb + (size_t)i * DP_XS;
        for (int k = 0; k < kl; k += 32) {
            const int r = kl - k;
            const __m512 lo = r >= 16 ? _mm512_loadu_ps(xr + k) : ifg_vload_n(xr + k, r);
            const __m512 hi = r >= 32 ? _mm512_loadu_ps(xr + k + 16) : r > 16 ? ifg_vload_n(xr + k + 16, r - 16)
                                                                               : _mm512_setzero_ps();
            _mm512_store_si512((void *)(d + k), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}

/* Register tile: TT tokens from t (x in xb, row 0 = token t0) × NT rows from n over [k0, k1). */
IFG_AI void dp_tile(float *y, int ldy, const uint16_t *xb, const uint16_t *w, int t, int t0, int n, int K,
                    int k0, int k1, int add, const int TT, const int NT, int pf) {
    __m512 acc[DP_TT][DP_NT];
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) acc[i][j] = _mm512_setzero_ps();
    const uint16_t *wr = w + (size_t)n * K, *xt = xb + (size_t)(t - t0) * DP_XS - k0, *wp = w + (size_t)pf * K;
    int k = k0;
    for (; k + 32 <= k1; k += 32) {
        __m512bh wv[DP_NT];
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) __builtin_prefetch(wp + (size_t)j * K + k, 0, 2); /* the next tile, into L2 */
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) wv[j] = (__m512bh)_mm512_loadu_si512((const void *)(wr + (size_t)j * K + k));
#pragma GCC unroll 8
        for (int i = 0; i < TT; i++) {
            const __m512bh xv = (__m512bh)_mm512_load_si512((const void *)(xt + (size_t)i * DP_XS + k));
#pragma GCC unroll 4
            for (int j = 0; j < NT; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[j], xv);
        }
    }
    if (k < k1) { /* W masked at the K tail; x is zero-padded */
        const __mmask32 m = (__mmask32)((1ull << (k1 - k)) - 1);
        __m512bh wv[DP_NT];
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(m, wr + (size_t)j * K + k);
#pragma GCC unroll 8
        for (int i = 0; i < TT; i++) {
            const __m512bh xv = (__m512bh)_mm512_load_si512((const void *)(xt + (size_t)i * DP_XS + k));
#pragma GCC unroll 4
            for (int j = 0; j < NT; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[j], xv);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < TT; i++) { /* absent rows as zeros: every sum has ifg_vsum4's tree */
        float s[4];
        const __m512 z = _mm512_setzero_ps();
        _mm_storeu_ps(s, ifg_vsum4(acc[i][0], NT > 1 ? acc[i][1 % NT] : z, NT > 2 ? acc[i][2 % NT] : z,
                                   NT > 3 ? acc[i][3 % NT] : z));
        float *yo = y + (size_t)(t + i) * ldy + n;
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) yo[j] = add ? yo[j] + s[j] : s[j];
    }
}

#define DP_TMIN(k) ((k) < DP_TT ? (k) : DP_TT)
#ifndef DP_PFD
#define DP_PFD 3 /* prefetch distance in row tiles */
#endif
/* All row tiles of [n0, ne) for TTC tokens from t; each prefetches the rows DP_PFD tiles on
 * (up to r1, the thread's last row). */
#define DP_NLOOP(TTC)                                                                                   \
    do {                                                                                                \
        int n_ = n0;                                                                                    \
        for (; n_ + DP_NT <= ne; n_ += DP_NT)                                                          \
            dp_tile(y, ldy, xb, wb, t, t0, n_, K, k0, k1, add, TTC, DP_NT,                              \
                    n_ + (DP_PFD + 1) * DP_NT <= r1 ? n_ + DP_PFD * DP_NT : n_);                       \
        for (; n_ < ne; n_++) dp_tile(y, ldy, xb, wb, t, t0, n_, K, k0, k1, add, TTC, 1, n_);             \
    } while (0)

/* ---- GEMV (T == 1): the tiles' sums with x rounded as it is read ----
 * R rows from n0 (8, or 1 at the end), one accumulator each per k-block, reduced by ifg_vsum4 in
 * groups of 4 rows and added through y as dp_tile does with one token; x rounded 32 at a time
 * exactly as dp_pack_x rounds it (zeros past K). Each row is a 4 KiB page where the hardware
 * prefetchers start over, so the next group's rows (from pf) are prefetched into L2 at the same k. */
#define DP_GR 8
IFG_AI __m512bh dp_x32(const float *x, int r) { /* x[0..min(r, 32)) rounded to bf16, zeros after */
    const __m512 lo = r >= 16 ? _mm512_loadu_ps(x) : ifg_vload_n(x, r);
    const __m512 hi = r >= 32 ? _mm512_loadu_ps(x + 16) : r > 16 ? ifg_vload_n(x + 16, r - 16) : _mm512_setzero_ps();
    return _mm512_cvtne2ps_pbh(hi, lo);
}
IFG_AI void dp_gemv_tile(float *y, const float *x, const uint16_t *w, int n0, int K, int accumulate, const int R,
                         int pf) {
    const uint16_t *wr = w + (size_t)n0 * K, *wp = w + (size_t)pf * K;
    for (int k0 = 0; k0 < K; k0 += DP_KB) {
        const int k1 = k0 + DP_KB < K ? k0 + DP_KB : K, add = accumulate || k0 > 0;
        __m512 a[DP_GR];
#pragma GCC unroll 8
        for (int j = 0; j < R; j++) a[j] = _mm512_setzero_ps();
        int k = k0;
        for (; k + 32 <= k1; k += 32) {
#pragma GCC unroll 8
            for (int j = 0; j < R; j++) __builtin_prefetch(wp + (size_t)j * K + k, 0, 2);
            const __m512bh xv = dp_x32(x + k, 32);
#pragma GCC unroll 8
            for (int j = 0; j < R; j++)
                a[j] = _mm512_dpbf16_ps(a[j], (__m512bh)_mm512_loadu_si512((const void *)(wr + (size_t)j * K + k)), xv);
        }
        if (k < k1) {
            const __mmask32 m = (__mmask32)((1ull << (k1 - k)) - 1);
            const __m512bh xv = dp_x32(x + k, k1 - k);
#pragma GCC unroll 8
            for (int j = 0; j < R; j++)
                a[j] = _mm512_dpbf16_ps(a[j], (__m512bh)_mm512_maskz_loadu_epi16(m, wr + (size_t)j * K + k), xv);
        }
        const __m512 z = _mm512_setzero_ps();
#pragma GCC unroll 2
        for (int g = 0; g < R; g += 4) {
            float s[4];
            _mm_storeu_ps(s, ifg_vsum4(a[g], R > g + 1 ? a[(g + 1) % R] : z, R > g + 2 ? a[(g + 2) % R] : z,
                                       R > g + 3 ? a[(g + 3) % R] : z));
            float *yo = y + n0 + g;
            const int nr = R - g < 4 ? R - g : 4;
#pragma GCC unroll 4
            for (int j = 0; j < nr; j++) yo[j] = add ? yo[j] + s[j] : s[j];
        }
    }
}

static void dp_gemv_rows(float *y, const float *x, const uint16_t *w, int r0, int r1, int K, int accumulate) {
    int n = r0;
    for (; n + DP_GR <= r1; n += DP_GR)
        dp_gemv_tile(y, x, w, n, K, accumulate, DP_GR, n + 2 * DP_GR <= r1 ? n + DP_GR : n);
    for (; n < r1; n++) dp_gemv_tile(y, x, w, n, K, accumulate, 1, n + 1 < r1 ? n + 1 : n);
}

void ifg_mm_bf16dp_rows(float *y, int ldy, const float *x, int ldx, const void *w, int T, int r0, int r1, int K,
                        int accumulate) {
    _Alignas(64) uint16_t xb[DP_TB * DP_XS];
    const uint16_t *wb = (const uint16_t *)w;
    if (T == 1) {
        dp_gemv_rows(y, x, wb, r0, r1, K, accumulate);
        return;
    }
    for (int t0 = 0; t0 < T; t0 += DP_TB) {
        const int te = t0 + DP_TB < T ? t0 + DP_TB : T;
        for (int k0 = 0; k0 < K; k0 += DP_KB) {
            const int k1 = k0 + DP_KB < K ? k0 + DP_KB : K, add = accumulate || k0 > 0;
            dp_pack_x(xb, x, ldx, t0, te - t0, k0, k1);
            /* as few tiles as DP_TT allows, of balanced sizes (ik_llama.cpp's split): 8 tokens
             * go as 4 + 4, not 6 + 2, whose 8 accumulators cannot hide vdpbf16ps' latency */
            const int nt = (te - t0 + DP_TT - 1) / DP_TT, base = (te - t0) / nt, big = (te - t0) % nt;
            /* Up to 2 token tiles (a decode batch): each row tile's W runs through both tiles at
             * once (from L1), so W streams from DRAM in one pass; more tiles keep DP_NB rows in L2. */
            const int nb = nt <= 2 ? DP_NT : DP_NB;
            for (int n0 = r0; n0 < r1; n0 += nb) {
                const int ne = n0 + nb < r1 ? n0 + nb : r1;
                for (int i = 0, t = t0; i < nt; i++) {
                    const int tt = base + (i < big);
                    switch (tt) {
                    case 6: DP_NLOOP(DP_TMIN(6)); break;
                    case 5: DP_NLOOP(DP_TMIN(5)); break;
                    case 4: DP_NLOOP(DP_TMIN(4)); break;
                    case 3: DP_NLOOP(DP_TMIN(3)); break;
                    case 2: DP_NLOOP(DP_TMIN(2)); break;
                    default: DP_NLOOP(1); break;
                    }
                    t += tt;
                }
            }
        }
    }
}

int ifg_mm_bf16dp_token_block(void) { return DP_TB; }
#endif
