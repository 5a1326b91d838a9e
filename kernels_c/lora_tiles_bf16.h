/* lora_tiles_bf16.h — the bf16_dp adapters' tiles (A and Bᵀ in bf16 pairs, lora.h): x and h
 * rounded to bf16, products as vdpbf16ps adds them. Internal to lora_tiles.c, included once after
 * its int8 tiles, whose helpers (lo_ld8, lo_ld_out / lo_st_out, LO_EXPAND_WALK, the tile sizes) it
 * uses; not part of the cffi ABI. */
#ifndef IFG_LORA_TILES_BF16_H
#define IFG_LORA_TILES_BF16_H

/* x (shrink) and h (expand) rounded to bf16 for the bf16 dot products: AVX-512 keeps the bits,
 * a k / rank pair broadcast as one 32-bit lane; the other builds the rounded values as f32,
 * broadcast one by one (AVX2 has no 16-bit broadcast into the upper half of a lane). */
#if defined(IFG_AVX512)
typedef uint16_t lo_xb;
#else
typedef float lo_xb;
#endif

#ifndef IFG_SIMD
/* ---- scalar reference (the scalar build) ---- */
/* One bf16 pair of a dot product as vdpbf16ps adds it: the odd (upper) product first, each sum
 * rounded (the products of two bf16 values are exact in f32). */
static inline float lo_dp2(float acc, float xe, float xo, uint32_t w) {
    return fmaf(xe, ifg_bf16_to_f32((uint16_t)w), fmaf(xo, ifg_bf16_to_f32((uint16_t)(w >> 16)), acc));
}

/* bf16 A (k pairs, lora.h): hp[t][i] = Σ_{k pairs p} of x rounded to bf16 (xb: row t - t0 at
 * (t - t0) * ldb, from k0, zero past k1) times A, pair by pair from k0. */
static void lo_shrinkbf_ref(float *hp, int ldh, const lo_xb *xb, int ldb, const struct ifg_lora *L,
                            int t0, int t1, int k0, int k1) {
    const int R = L->rank, np = (k1 - k0 + 1) / 2;
    const uint32_t *a = (const uint32_t *)L->a + (size_t)(k0 / 2) * R;
    for (int t = t0; t < t1; t++) {
        const lo_xb *x = xb + (size_t)(t - t0) * ldb;
        for (int i = 0; i < R; i++) {
            float acc = 0.0f;
            for (int p = 0; p < np; p++) acc = lo_dp2(acc, x[2 * p], x[2 * p + 1], a[(size_t)p * R + i]);
            hp[(size_t)t * ldh + i] = acc;
        }
    }
}

/* bf16 Bᵀ (rank pairs, lora.h): y[t][n] += Σ_{rank pairs} h rounded to bf16 (ifg_lora_tile_round_h)
 * times B, pair by pair from rank 0, then DoRA. */
static void lo_expandbf_ref(float *y, int ldy, const float *hb, int ldh, const struct ifg_lora *L,
                            int t0, int t1, int nb0, int nb1, int N) {
    const int RP = L->rank / 2, n1 = nb1 * LO_VB < N ? nb1 * LO_VB : N;
    const uint32_t *b = (const uint32_t *)L->b;
    for (int t = t0; t < t1; t++) {
        const lo_xb *h = (const lo_xb *)(hb + (size_t)t * ldh);
        for (int n = nb0 * LO_VB; n < n1; n++) {
            float acc = 0.0f;
            for (int q = 0; q < RP; q++)
                acc = lo_dp2(acc, h[2 * q], h[2 * q + 1], b[((size_t)(n / LO_VB) * RP + q) * LO_VB + n % LO_VB]);
            const float v = y[(size_t)t * ldy + n] + acc;
            y[(size_t)t * ldy + n] = L->dora ? v * L->dora[n] : v;
        }
    }
}
#define lo_shrinkbf lo_shrinkbf_ref
#define lo_expandbf lo_expandbf_ref
#else
/* ---- bf16_dp A and Bᵀ: bf16 dot products (layouts in lora.h) ---------------------------------
 * A 32-bit lane holds a pair of bf16 weights (2 k of a rank, or 2 ranks of an output) and the
 * matching pair of x / h is broadcast: AVX-512 BF16's vdpbf16ps adds both products into the
 * lane's f32 in one instruction, 32 multiply-adds per vector; AVX2 splits the pairs into f32
 * (shift / mask) and does the same two multiply-adds in the same order with FMAs. */
#if defined(IFG_AVX512)
typedef __m512i lo_wb; /* 16 lanes of a bf16 pair */
typedef __m512i lo_hb; /* one pair of x / h in every lane */
IFG_AI lo_wb lo_ldbf(const uint32_t *p, int r) { return lo_ld8((const uint8_t *)p, r); }
IFG_AI lo_hb lo_bcbf(const lo_xb *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32((int)v);
}
IFG_AI ifg_vf lo_dotbf(ifg_vf acc, lo_wb w, lo_hb x) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }
/* KU·TT·RV accumulators + RV weights + x in 32. Twice the f32 tile's rows per weight load for
 * rank 32 (KU 2 for 2 rank vectors, not 4): at 32 multiply-adds per instruction the 3-row tile
 * read its 32 KiB of A from L2 twice as fast as the f32 one and ran no faster than it. */
#define LO_KUB(RV) ((RV) == 1 ? 4 : 2)
#define LO_STB(RV) ((RV) <= 2 ? 6 : (RV) == 3 ? 4 : 3)
#else
typedef struct { __m256 e, o; } lo_wb; /* each lane's even (lower) and odd (upper) bf16 as f32 */
typedef lo_wb lo_hb;
IFG_AI lo_wb lo_ldbf(const uint32_t *p, int r) {
    const __m256i raw = r == IFG_VW ? _mm256_loadu_si256((const __m256i *)p)
                                    : _mm256_maskload_epi32((const int *)p, ifg_vmask(r));
    lo_wb w;
    w.e = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    w.o = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32((int)0xffff0000u)));
    return w;
}
IFG_AI lo_hb lo_bcbf(const lo_xb *p) {
    lo_hb h;
    h.e = _mm256_broadcast_ss(p);
    h.o = _mm256_broadcast_ss(p + 1);
    return h;
}
IFG_AI ifg_vf lo_dotbf(ifg_vf acc, lo_wb w, lo_hb x) { return _mm256_fmadd_ps(x.e, w.e, _mm256_fmadd_ps(x.o, w.o, acc)); }
#define LO_KUB(RV) LO_KU(RV)
#define LO_STB(RV) ((RV) == 1 ? 3 : 2) /* KU·TT·RV accumulators + 2·RV weights + 2 x in 16 */
#endif

/* bf16 shrink tile: TT rows from t (x rounded in xb from row ti) × RV rank vectors from rank
 * i0 (the last holding rl <= W ranks) over the np k pairs at a. KU interleaved sets of
 * accumulators take the pairs in turn as in lo_shrink_tile (KU by the rank alone, never TT). */
IFG_AI void lo_shrinkbf_tile(float *hp, int ldh, const lo_xb *xb, int ldb, const uint32_t *a, int R, int np,
                            int t, int ti, int i0, int rl, const int TT, const int RV, const int FULL) {
    const int KU = LO_KUB(RV);
    const uint32_t *ap = a + i0;
    const lo_xb *xr = xb + (size_t)ti * ldb;
    ifg_vf acc[4][LO_STB(1) > LO_STB(2) ? LO_STB(1) : LO_STB(2)][LO_RV];
#pragma GCC unroll 4
    for (int u = 0; u < KU; u++)
#pragma GCC unroll 12
        for (int i = 0; i < TT; i++)
#pragma GCC unroll 4
            for (int j = 0; j < RV; j++) acc[u][i][j] = ifg_vzero();
    /* pair p into accumulator set u: RV weight loads, TT broadcasts, TT·RV dot products */
#define LO_SHRINKBF_P(u, p)                                                                                  \
    do {                                                                                                     \
        lo_wb w[LO_RV];                                                                                      \
        _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) {                                               \
            const uint32_t *wp = ap + (size_t)(p) * R + j * IFG_VW;                                          \
            __builtin_prefetch((const char *)wp + LO_PF, 0, LO_PFL);                                         \
            w[j] = lo_ldbf(wp, FULL || j < RV - 1 ? IFG_VW : rl);                                            \
        }                                                                                                    \
        _Pragma("GCC unroll 12") for (int i = 0; i < TT; i++) {                                              \
            const lo_hb xv = lo_bcbf(xr + (size_t)i * ldb + 2 * (p));                                        \
            _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) acc[u][i][j] = lo_dotbf(acc[u][i][j], w[j], xv); \
        }                                                                                                    \
    } while (0)
    int p = 0;
    for (; p + KU <= np; p += KU)
#pragma GCC unroll 4
        for (int u = 0; u < KU; u++) LO_SHRINKBF_P(u, p + u);
    for (; p < np; p++) LO_SHRINKBF_P(0, p);
#undef LO_SHRINKBF_P
#pragma GCC unroll 12
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 4
        for (int j = 0; j < RV; j++) {
            ifg_vf v = acc[0][i][j];
            if (KU == 2) v = ifg_vadd(v, acc[1][i][j]);
            if (KU == 4) v = ifg_vadd(ifg_vadd(v, acc[1][i][j]), ifg_vadd(acc[2][i][j], acc[3][i][j]));
            float *o = hp + (size_t)(t + i) * ldh + i0 + j * IFG_VW;
            if (!FULL && j == RV - 1) ifg_vstore_n(o, v, rl); else ifg_vstore(o, v);
        }
}

/* Rows [t0, t1) × RV rank vectors from i0: full tiles, then the remainder in tiles of 4/2/1. */
IFG_AI void lo_shrinkbf_rows_f(float *hp, int ldh, const lo_xb *xb, int ldb, const uint32_t *a, int R, int np,
                              int t0, int t1, int i0, int rl, const int RV, const int FULL) {
    int t = t0;
#define LO_SB(TT) lo_shrinkbf_tile(hp, ldh, xb, ldb, a, R, np, t, t - t0, i0, rl, TT, RV, FULL)
    for (; t + LO_STB(RV) <= t1; t += LO_STB(RV)) LO_SB(LO_STB(RV));
    if (LO_STB(RV) > 4 && t + 4 <= t1) { LO_SB(4); t += 4; }
    if (LO_STB(RV) > 2 && t + 2 <= t1) { LO_SB(2); t += 2; }
    for (; t < t1; t++) LO_SB(1);
#undef LO_SB
}
IFG_AI void lo_shrinkbf_rows(float *hp, int ldh, const lo_xb *xb, int ldb, const uint32_t *a, int R, int np,
                            int t0, int t1, int i0, int rl, const int RV) {
    if (rl == IFG_VW) lo_shrinkbf_rows_f(hp, ldh, xb, ldb, a, R, np, t0, t1, i0, rl, RV, 1);
    else lo_shrinkbf_rows_f(hp, ldh, xb, ldb, a, R, np, t0, t1, i0, rl, RV, 0);
}

static void lo_shrinkbf(float *hp, int ldh, const lo_xb *xb, int ldb, const struct ifg_lora *L,
                        int t0, int t1, int k0, int k1) {
    const int R = L->rank, np = (k1 - k0 + 1) / 2;
    const uint32_t *a = (const uint32_t *)L->a + (size_t)(k0 / 2) * R;
    for (int i0 = 0; i0 < R; i0 += LO_RV * IFG_VW) {
        int rl;
        switch (lo_rank_block(R, i0, &rl)) {
        case 1: lo_shrinkbf_rows(hp, ldh, xb, ldb, a, R, np, t0, t1, i0, rl, 1); break;
#if LO_RV > 2
        case 3: lo_shrinkbf_rows(hp, ldh, xb, ldb, a, R, np, t0, t1, i0, rl, 3); break;
        case 4: lo_shrinkbf_rows(hp, ldh, xb, ldb, a, R, np, t0, t1, i0, rl, 4); break;
#endif
        default: lo_shrinkbf_rows(hp, ldh, xb, ldb, a, R, np, t0, t1, i0, rl, 2); break;
        }
    }
}

/* bf16 expand tile: ET rows from t × EB 16-blocks from nb, their Bᵀ the run at w (block e's
 * rank pair q at (e · rank/2 + q) · 16 lanes), h rounded as ifg_lora_tile_round_h leaves it.
 * RPC: the rank pairs as a constant (0: L's). Per pair: EB·VPB weight loads, ET broadcasts. */
IFG_AI void lo_expandbf_tile(float *y, int ldy, const float *hb, int ldh, const struct ifg_lora *L, int N,
                            const uint32_t *w, int t, int nb, const int ET, const int EB, const int RPC) {
    enum { NV = LO_EB8W * LO_VPB };
    const int RP = RPC ? RPC : L->rank / 2;
    ifg_vf acc[LO_ET8][NV];
#pragma GCC unroll 8
    for (int a = 0; a < ET; a++)
#pragma GCC unroll 8
        for (int j = 0; j < EB * LO_VPB; j++) acc[a][j] = ifg_vzero();
#pragma GCC unroll 16
    for (int q = 0; q < RP; q++) {
        lo_wb wv[NV];
#pragma GCC unroll 8
        for (int e = 0; e < EB; e++) {
            const uint32_t *we = w + ((size_t)e * RP + q) * LO_VB;
            __builtin_prefetch((const char *)we + LO_PF, 0, LO_PFL);
#pragma GCC unroll 2
            for (int v = 0; v < LO_VPB; v++) wv[e * LO_VPB + v] = lo_ldbf(we + v * IFG_VW, IFG_VW);
        }
#pragma GCC unroll 8
        for (int a = 0; a < ET; a++) {
            const lo_hb hv = lo_bcbf((const lo_xb *)(hb + (size_t)(t + a) * ldh) + 2 * q);
#pragma GCC unroll 8
            for (int j = 0; j < EB * LO_VPB; j++) acc[a][j] = lo_dotbf(acc[a][j], wv[j], hv);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < EB * LO_VPB; j++) {
        const int n = nb * LO_VB + j * IFG_VW, r = N - n < IFG_VW ? N - n : IFG_VW;
        if (r <= 0) break; /* padding past N */
        const ifg_vf d = L->dora ? lo_ld_out(L->dora + n, r) : ifg_vzero();
#pragma GCC unroll 8
        for (int a = 0; a < ET; a++) {
            float *yo = y + (size_t)(t + a) * ldy + n;
            lo_st_out(yo, ifg_vadd(lo_ld_out(yo, r), acc[a][j]), L, d, r);
        }
    }
}

/* The bf16 dot-product expand, tiled as lo_expand8_r tiles the int8 one. */
IFG_AI void lo_expandbf_r(float *y, int ldy, const float *hb, int ldh, const struct ifg_lora *L,
                         int t0, int t1, int nb0, int nb1, int N, const int RPC) {
    LO_EXPAND_WALK(lo_expandbf_tile, (const uint32_t *)L->b, (size_t)L->rank / 2 * LO_VB, RPC); /* lanes per 16-block */
}

static void lo_expandbf(float *y, int ldy, const float *hb, int ldh, const struct ifg_lora *L,
                        int t0, int t1, int nb0, int nb1, int N) {
    if (L->rank == 16) lo_expandbf_r(y, ldy, hb, ldh, L, t0, t1, nb0, nb1, N, 8); /* as lo_expand8 */
    else if (L->rank == 32) lo_expandbf_r(y, ldy, hb, ldh, L, t0, t1, nb0, nb1, N, 16);
    else lo_expandbf_r(y, ldy, hb, ldh, L, t0, t1, nb0, nb1, N, 0);
}
#endif

/* x rows [t0, t1), k in [k0, k1), rounded to bf16 (nearest even) into xb (row i at i * ldb,
 * ldb >= k1 - k0 rounded up to IFG_VW), zero to an even count of k. */
static void lo_round_xbf(lo_xb *xb, int ldb, const float *x, int ldx, int t0, int t1, int k0, int k1) {
    const int kl = k1 - k0;
    for (int t = t0; t < t1; t++) {
        const float *xr = x + (size_t)t * ldx + k0;
        lo_xb *d = xb + (size_t)(t - t0) * ldb;
#ifdef IFG_SIMD
        for (int k = 0; k < kl; k += IFG_VW) { /* a partial last vector: zeros past kl */
            const ifg_vf v = kl - k >= IFG_VW ? ifg_vload(xr + k) : ifg_vload_n(xr + k, kl - k);
#if defined(IFG_AVX512)
            _mm256_storeu_si256((__m256i *)(d + k), (__m256i)_mm512_cvtneps_pbh(v));
#else
            ifg_vstore(d + k, ifg_vround_bf16(v));
#endif
        }
#else
        for (int k = 0; k < kl; k++) d[k] = ifg_bf16_to_f32(ifg_f32_to_bf16(xr[k]));
        if (kl % 2) d[kl] = 0.0f;
#endif
    }
}

#endif
