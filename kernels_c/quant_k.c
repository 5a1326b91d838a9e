/* quant_k.c — y (=|+=) x · Wᵀ for q4_k and fp8 weights (see quant_k.h for the math).
 *
 * q4_k, per thread (rows [r0, r1)): tokens in blocks of QK_TB; for each k-chunk of QK_KB the
 * block's x rows are quantized once (int8 + per-32-block d_x and d_x * sum(q_x)), then row
 * blocks of QK_NB rows × token tiles of QK_TT × row tiles of QK_NT run the micro-kernel. Per
 * super-block and row, the 6-bit scales and mins are unpacked with 32-bit masks into 8 bytes
 * each and converted to 8-lane f32 vectors ds = d*sc, dm = dmin*m once for all tokens of the
 * tile. Per token, the min term is one 8-lane FMA (dm × d_x*sum(q_x)); the sub-block dot
 * products are integer:
 *  - AVX-512 (VNNI): one vpdpbusd per pair of sub-blocks (64 weights: low nibbles of the 32
 *    bytes = sub-block 2c, high nibbles = 2c+1, unsigned 0..15 as vpdpbusd wants, no offset),
 *    converted and scaled by the pair's (d_x ds) lanes, one FMA into a 16-lane accumulator;
 *  - AVX2: vpmaddubsw (u8 levels × s8 x, pair sums <= 2*15*127: no saturation) + vpmaddwd
 *    with ones per sub-block, then the same convert / scale / FMA on 8 lanes;
 *  - scalar: plain loops.
 * T == 1 (decode GEMV) is the same path with one-token tiles; weights are decoded in
 * registers only.
 *
 * fp8: x stays f32. Per 32-block and row the E4M3 codes are turned into f16 bit patterns
 * (code << 8, arithmetic >> 1 copies the sign into bit 14, which is then cleared: exponent
 * 0eeee, mantissa mmm0000000 — the f16 value is the E4M3 value / 256, subnormals included)
 * and converted with vcvtph2ps, times the block scale * 256 (exact: 4 × 8 significant bits);
 * then one FMA per token. GEMM tiles of QK_TT tokens × QK_NT rows reuse each decoded vector
 * for all tokens of the tile.
 *
 * Each output's summation order depends only on K (fixed block, lane and reduction order), so
 * results are bitwise identical for any thread count, tile or T. */
#include "quant_k.h"
#include "simd.h"

#define QK_KB 2048 /* k chunk of x quantized at a time (multiple of 256) */
#define QK_TB 16   /* tokens quantized at a time */
#define QK_NB 64   /* rows per L2 block */
#define QK_NBK (QK_KB / 32)

static inline float qk_h(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return ifg_f16_to_f32(h); }
static inline float qk_bf(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return ifg_bf16_to_f32(h); }

/* The 12 scale bytes of a q4_k block → 8 scales and 8 mins (byte j of each = sub-block j). */
static inline void qk_unpack_scales(const uint8_t *s12, uint64_t *sc, uint64_t *mn) {
    uint32_t a0, a1, a2;
    memcpy(&a0, s12, 4);
    memcpy(&a1, s12 + 4, 4);
    memcpy(&a2, s12 + 8, 4);
    const uint32_t sc_hi = (a2 & 0x0f0f0f0fu) | ((a0 >> 2) & 0x30303030u);
    const uint32_t m_hi = ((a2 >> 4) & 0x0f0f0f0fu) | ((a1 >> 2) & 0x30303030u);
    *sc = (uint64_t)(a0 & 0x3f3f3f3fu) | (uint64_t)sc_hi << 32;
    *mn = (uint64_t)(a1 & 0x3f3f3f3fu) | (uint64_t)m_hi << 32;
}

/* E4M3 code → f32 (NaN codes never occur in our files; they decode as 480 / -480). */
static inline float qk_e4m3(uint8_t c) {
    const uint16_t h = (uint16_t)((c & 0x80u) << 8 | (c & 0x7fu) << 7);
    return ifg_f16_to_f32(h) * 256.0f;
}

void ifg_qk_dequant_row(float *o, const uint8_t *row, int dtype, int n) {
    if (dtype == IFG_FP8) {
        for (int b = 0; b < n / 32; b++) {
            const uint8_t *blk = row + (size_t)b * IFG_FP8_BLOCK;
            const float d = qk_bf(blk);
            for (int j = 0; j < 32; j++) o[b * 32 + j] = qk_e4m3(blk[2 + j]) * d;
        }
        return;
    }
    for (int b = 0; b < n / IFG_QK_K; b++) {
        const uint8_t *blk = row + (size_t)b * IFG_Q4_K_BLOCK;
        const float d = qk_h(blk), dmin = qk_h(blk + 2);
        uint64_t sc, mn;
        qk_unpack_scales(blk + 4, &sc, &mn);
        for (int s = 0; s < 8; s++) {
            const float a = d * (float)((sc >> (8 * s)) & 63), m = dmin * (float)((mn >> (8 * s)) & 63);
            const uint8_t *q = blk + 16 + 32 * (s / 2);
            const int shift = 4 * (s & 1);
            for (int l = 0; l < 32; l++) o[b * 256 + s * 32 + l] = a * (float)((q[l] >> shift) & 15) - m;
        }
    }
}

/* Quantize x[t..t+tt)[k0..k1) per 32-block: q[i*QK_KB + k - k0], d[i*QK_NBK + b] and
 * ds[...] = d * sum of the block's q. Scalar in every build (every ISA quantizes x alike, and
 * as infeng.quant.quantize_activations). */
static void qk_quantize_x(int8_t *q, float *d, float *ds, const float *x, int ldx, int t, int tt, int k0, int k1) {
    for (int i = 0; i < tt; i++) {
        const float *xr = x + (size_t)(t + i) * ldx;
        for (int k = k0, b = 0; k < k1; k += 32, b++) {
            float amax = 0.0f;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xr[k + j]));
            const float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
            int8_t *qo = q + (size_t)i * QK_KB + (k - k0);
            int32_t sum = 0;
            for (int j = 0; j < 32; j++) { qo[j] = (int8_t)roundf(xr[k + j] * id); sum += qo[j]; }
            d[i * QK_NBK + b] = dd;
            ds[i * QK_NBK + b] = dd * (float)sum;
        }
    }
}

#ifndef IFG_SIMD
/* ---- scalar reference (the scalar build) ---- */
static void qk4_tiles_ref(float *y, int ldy, const int8_t *xq, const float *xd, const float *xds, const uint8_t *w,
                      int t, int tt, int n0, int n1, int K, int k0, int k1, int add) {
    const size_t rb = (size_t)(K / IFG_QK_K) * IFG_Q4_K_BLOCK;
    for (int n = n0; n < n1; n++)
        for (int i = 0; i < tt; i++) {
            float acc = 0.0f;
            for (int k = k0; k < k1; k += IFG_QK_K) {
                const uint8_t *blk = w + (size_t)n * rb + (size_t)(k / IFG_QK_K) * IFG_Q4_K_BLOCK;
                const float d = qk_h(blk), dmin = qk_h(blk + 2);
                uint64_t sc, mn;
                qk_unpack_scales(blk + 4, &sc, &mn);
                for (int s = 0; s < 8; s++) {
                    const int b = (k - k0) / 32 + s;
                    const int8_t *xb = xq + (size_t)i * QK_KB + (k - k0) + 32 * s;
                    const uint8_t *qb = blk + 16 + 32 * (s / 2);
                    const int shift = 4 * (s & 1);
                    int32_t dot = 0;
                    for (int l = 0; l < 32; l++) dot += (int32_t)((qb[l] >> shift) & 15) * xb[l];
                    const float a = d * (float)((sc >> (8 * s)) & 63), m = dmin * (float)((mn >> (8 * s)) & 63);
                    acc += (a * xd[i * QK_NBK + b]) * (float)dot - m * xds[i * QK_NBK + b];
                }
            }
            float *yo = y + (size_t)(t + i) * ldy + n;
            *yo = add ? *yo + acc : acc;
        }
}

static void fp8_rows_ref(float *y, int ldy, const float *x, int ldx, const uint8_t *w, int T, int r0, int r1,
                         int K, int accumulate) {
    const size_t rb = ifg_quant_k_row_bytes(IFG_FP8, K);
    for (int n = r0; n < r1; n++)
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * ldx;
            float acc = 0.0f;
            for (int b = 0; b < K / 32; b++) {
                const uint8_t *blk = w + (size_t)n * rb + (size_t)b * IFG_FP8_BLOCK;
                const float d = qk_bf(blk);
                for (int j = 0; j < 32; j++) acc += xt[b * 32 + j] * (qk_e4m3(blk[2 + j]) * d);
            }
            float *yo = y + (size_t)t * ldy + n;
            *yo = accumulate ? *yo + acc : acc;
        }
}
#define qk4_tiles qk4_tiles_ref
#define fp8_rows fp8_rows_ref
#else
/* ---- SIMD: per-ISA int8 dot products (VNNI against AVX2), the fp8 tile written once ---- */
#define QK_TT 4
#if defined(IFG_AVX512)
#define QK_NT 4
#else
#define QK_NT 2
#endif

/* ds = d * sc (8 lanes), dm = dmin * m of one q4_k block. */
IFG_AI void qk4_block_scales(const uint8_t *blk, __m256 *ds, __m256 *dm) {
    uint64_t sc, mn;
    qk_unpack_scales(blk + 4, &sc, &mn);
    uint32_t hh;
    memcpy(&hh, blk, 4);
    const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128((int)hh)); /* lane 0 d, lane 1 dmin */
    const __m256 d = _mm256_broadcastss_ps(dd), dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(dd));
    *ds = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc))));
    *dm = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn))));
}

#if defined(IFG_AVX512)
/* 64 weights of chunk c of a block (sub-blocks 2c | 2c+1) as 64 unsigned levels. */
IFG_AI __m512i qk4_levels(const uint8_t *blk, int c) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * c));
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
    return _mm512_and_si512(both, _mm512_set1_epi8(0x0F));
}
#endif

/* q4_k register tile: TT tokens (rows i0.. of the quantized x chunk; outputs t + i0 + i) ×
 * NT weight rows from n, k in [k0, k1). */
IFG_AI void qk4_tile(float *y, int ldy, const int8_t *xq, const float *xd, const float *xds, const uint8_t *w,
                  size_t rb, int t, int i0, int n, int k0, int k1, int add, const int TT, const int NT) {
    ifg_vf acc[QK_TT][QK_NT];
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) acc[i][j] = ifg_vzero();
    for (int k = k0; k < k1; k += IFG_QK_K) {
        const int b0 = (k - k0) / 32; /* first x block of this super-block */
        const uint8_t *blk[QK_NT];
        __m256 ds[QK_NT], dm[QK_NT];
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) {
            blk[j] = w + (size_t)(n + j) * rb + (size_t)(k / IFG_QK_K) * IFG_Q4_K_BLOCK;
            qk4_block_scales(blk[j], &ds[j], &dm[j]);
        }
        /* min term: acc -= dm * (d_x * sum q_x), lane s = sub-block s */
#pragma GCC unroll 16
        for (int i = 0; i < TT; i++) {
            const __m256 xs = _mm256_loadu_ps(xds + (i0 + i) * QK_NBK + b0);
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++) {
#if defined(IFG_AVX512)
                acc[i][j] = _mm512_fnmadd_ps(_mm512_zextps256_ps512(dm[j]),
                                             _mm512_zextps256_ps512(xs), acc[i][j]);
#else
                acc[i][j] = _mm256_fnmadd_ps(dm[j], xs, acc[i][j]);
#endif
            }
        }
#if defined(IFG_AVX512)
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            /* lanes 0..7: sub-block 2c, lanes 8..15: 2c+1 */
            const __m512i idx = _mm512_setr_epi32(2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c,
                                                  2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1,
                                                  2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1);
            __m512i u[QK_NT];
            __m512 ws[QK_NT];
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++) {
                u[j] = qk4_levels(blk[j], c);
                ws[j] = _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(ds[j]));
            }
#pragma GCC unroll 16
            for (int i = 0; i < TT; i++) {
                const __m512i xv = _mm512_load_si512((const void *)(xq + (size_t)(i0 + i) * QK_KB + (k - k0) + 64 * c));
                const __m512 xs = _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(_mm256_loadu_ps(xd + (i0 + i) * QK_NBK + b0)));
#pragma GCC unroll 16
                for (int j = 0; j < NT; j++) {
                    const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u[j], xv));
                    acc[i][j] = _mm512_fmadd_ps(dot, _mm512_mul_ps(xs, ws[j]), acc[i][j]);
                }
            }
        }
#else
        const __m256i ones = _mm256_set1_epi16(1), lo4 = _mm256_set1_epi8(0x0F);
#pragma GCC unroll 8
        for (int s = 0; s < 8; s++) {
            const __m256i sidx = _mm256_set1_epi32(s);
            __m256i u[QK_NT];
            __m256 ws[QK_NT];
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(blk[j] + 16 + 32 * (s / 2)));
                u[j] = _mm256_and_si256((s & 1) ? _mm256_srli_epi16(raw, 4) : raw, lo4);
                ws[j] = _mm256_permutevar8x32_ps(ds[j], sidx);
            }
#pragma GCC unroll 16
            for (int i = 0; i < TT; i++) {
                const __m256i xv = _mm256_load_si256((const __m256i *)(xq + (size_t)(i0 + i) * QK_KB + (k - k0) + 32 * s));
                const __m256 xs = _mm256_broadcast_ss(xd + (i0 + i) * QK_NBK + b0 + s);
#pragma GCC unroll 16
                for (int j = 0; j < NT; j++) {
                    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u[j], xv), ones);
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(xs, ws[j]), acc[i][j]);
                }
            }
        }
#endif
    }
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) {
            float *yo = y + (size_t)(t + i0 + i) * ldy + n + j;
            const float s = ifg_vhsum(acc[i][j]);
            *yo = add ? *yo + s : s;
        }
}

#define QK4_NLOOP(TTC)                                                                            \
    do {                                                                                           \
        int n_ = n0;                                                                               \
        for (; n_ + QK_NT <= n1; n_ += QK_NT)                                                      \
            qk4_tile(y, ldy, xq, xd, xds, w, rb, t, i0, n_, k0, k1, add, TTC, QK_NT);               \
        for (; n_ < n1; n_++) qk4_tile(y, ldy, xq, xd, xds, w, rb, t, i0, n_, k0, k1, add, TTC, 1); \
    } while (0)

static void qk4_tiles(float *y, int ldy, const int8_t *xq, const float *xd, const float *xds, const uint8_t *w,
                      int t, int tt, int n0, int n1, int K, int k0, int k1, int add) {
    const size_t rb = (size_t)(K / IFG_QK_K) * IFG_Q4_K_BLOCK;
    for (int i0 = 0; i0 < tt; i0 += QK_TT) {
        const int r = tt - i0;
        if (r >= 4) QK4_NLOOP(4);
        else if (r == 3) QK4_NLOOP(3);
        else if (r == 2) QK4_NLOOP(2);
        else QK4_NLOOP(1);
    }
}

/* ---- fp8 ---- */
/* IFG_VW E4M3 codes → f32 (value / 256): the code shifted into an f16's bits. */
#if defined(IFG_AVX512)
IFG_AI ifg_vf fp8_dec(const uint8_t *p) {
    __m256i h = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    h = _mm256_srai_epi16(_mm256_slli_epi16(h, 8), 1);
    return _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16((short)0xBFFF)));
}
#else
IFG_AI ifg_vf fp8_dec(const uint8_t *p) {
    __m128i h = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    h = _mm_srai_epi16(_mm_slli_epi16(h, 8), 1);
    return _mm256_cvtph_ps(_mm_and_si128(h, _mm_set1_epi16((short)0xBFFF)));
}
#endif

/* fp8 register tile: TT tokens from t × NT rows from n, over all of K. */
IFG_AI void fp8_tile(float *y, int ldy, const float *x, int ldx, const uint8_t *w, size_t rb, int t, int n,
                  int K, int add, const int TT, const int NT) {
    ifg_vf acc[QK_TT][QK_NT];
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) acc[i][j] = ifg_vzero();
    for (int b = 0; b < K / 32; b++) {
        ifg_vf sc[QK_NT];
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++)
            sc[j] = ifg_vset1(qk_bf(w + (size_t)(n + j) * rb + (size_t)b * IFG_FP8_BLOCK) * 256.0f);
#pragma GCC unroll 4
        for (int s = 0; s < 32; s += IFG_VW) {
            ifg_vf wv[QK_NT];
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++)
                wv[j] = ifg_vmul(fp8_dec(w + (size_t)(n + j) * rb + (size_t)b * IFG_FP8_BLOCK + 2 + s), sc[j]);
#pragma GCC unroll 16
            for (int i = 0; i < TT; i++) {
                const ifg_vf xv = ifg_vload(x + (size_t)(t + i) * ldx + b * 32 + s);
#pragma GCC unroll 16
                for (int j = 0; j < NT; j++) acc[i][j] = ifg_vfma(wv[j], xv, acc[i][j]);
            }
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < TT; i++)
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) {
            float *yo = y + (size_t)(t + i) * ldy + n + j;
            const float s = ifg_vhsum(acc[i][j]);
            *yo = add ? *yo + s : s;
        }
}

#define FP8_NLOOP(TTC)                                                                    \
    do {                                                                                   \
        int n_ = n0;                                                                       \
        for (; n_ + QK_NT <= n1; n_ += QK_NT)                                              \
            fp8_tile(y, ldy, x, ldx, w, rb, t, n_, K, accumulate, TTC, QK_NT);              \
        for (; n_ < n1; n_++) fp8_tile(y, ldy, x, ldx, w, rb, t, n_, K, accumulate, TTC, 1); \
    } while (0)

static void fp8_rows(float *y, int ldy, const float *x, int ldx, const uint8_t *w, int T, int r0, int r1,
                     int K, int accumulate) {
    const size_t rb = ifg_quant_k_row_bytes(IFG_FP8, K);
    for (int n0 = r0; n0 < r1; n0 += QK_NB) { /* a block of rows stays in L2 over the tokens */
        const int n1 = n0 + QK_NB < r1 ? n0 + QK_NB : r1;
        for (int t = 0; t < T; t += QK_TT) {
            const int r = T - t;
            if (r >= 4) FP8_NLOOP(4);
            else if (r == 3) FP8_NLOOP(3);
            else if (r == 2) FP8_NLOOP(2);
            else FP8_NLOOP(1);
        }
    }
}
#endif

void ifg_qk_mm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                    int T, int r0, int r1, int K, int accumulate) {
    if (wtype == IFG_FP8) {
        fp8_rows(y, ldy, x, ldx, (const uint8_t *)w, T, r0, r1, K, accumulate);
        return;
    }
    _Alignas(64) int8_t xq[QK_TB * QK_KB];
    float xd[QK_TB * QK_NBK], xds[QK_TB * QK_NBK];
    for (int t = 0; t < T; t += QK_TB) {
        const int tt = T - t < QK_TB ? T - t : QK_TB;
        for (int k0 = 0; k0 < K; k0 += QK_KB) {
            const int k1 = k0 + QK_KB < K ? k0 + QK_KB : K, add = accumulate || k0 > 0;
            qk_quantize_x(xq, xd, xds, x, ldx, t, tt, k0, k1);
            for (int n0 = r0; n0 < r1; n0 += QK_NB) {
                const int n1 = n0 + QK_NB < r1 ? n0 + QK_NB : r1;
                qk4_tiles(y, ldy, xq, xd, xds, (const uint8_t *)w, t, tt, n0, n1, K, k0, k1, add);
            }
        }
    }
}
