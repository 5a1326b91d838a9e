/* kvq_attention.c — attention over the compressed paged KV cache's codes (kvq.h).
 *
 * Attention work items are (query token, kv head) pairs as in attention.c; an item walks the
 * blocks of its causal range a span (up to KVQ_SPAN positions) at a time. Per span: the scores of
 * all its positions for every query head of the group, vectorised across positions (keys are
 * stored channel-major, so one vector is one channel of 16 (AVX-512) or 8 (AVX2) positions: a
 * broadcast q[d] times a decoded key vector, no horizontal sum); then one online-softmax update;
 * then the value rows accumulated into the per-head f32 accumulators, vectorised over head_dim. Codes are decoded into registers (a
 * decoded vector serves up to KVQ_HMAX query heads) and never written back as f32. Each output
 * is computed by one item in a fixed order: bitwise deterministic for any thread count. */
#include "kvq.h"
#include "act.h"

#define KVQ_GMAX 16 /* query heads of one kv head per pass (the score / accumulator tiles) */
#define KVQ_HMAX 8  /* query heads fed by one decoded vector */
#define KVQ_QT2 (KVQ_MAX_HD * KVQ_HMAX) /* per-channel keys: where qt2 follows qt (kvq_group) */
#if defined(IFG_AVX512)
#define KVQ_QTN (KVQ_QT2 + 2 * KVQ_MAX_HD * KVQ_HMAX) /* qt, then qt2 (kvq_minterm2) */
#else
#define KVQ_QTN KVQ_QT2
#endif
#ifndef KVQ_PF_NEXT /* int4: the next block's part into L1 while this one is worked on (the bf16 loops outran the
                        hardware prefetcher: 0.90-0.95× the time at depth 4096; int8's f32 loops did not gain) */
#define KVQ_PF_NEXT 1
#endif
#ifndef KVQ_PF_LOC /* the next span's prefetch: into L2 (prefetcht1); into L1 it pushed out the span at work */
#define KVQ_PF_LOC 2
#endif
#ifndef KVQ_SPAN
#define KVQ_SPAN IFG_KVQ_MAX_BS /* positions per online-softmax step (a multiple of the block size, <= MAX_BS) */
#endif
/* ---- the scores and value accumulation of one block, for n query heads ---------------------- */
/* What a decoded code is multiplied by besides its scale: fp8 codes decode to value / 256 (an
 * f16), so their scale is taken ×256 (exact: a power of two), giving the same product q·d. */
static inline float kvq_unit(int type) { return type == IFG_KV_FP8 ? 256.0f : 1.0f; }

/* S[h][0..bs) = scale · q_h · key(position) for every position of the block (part kp);
 * acc[h][0..hd) += Σ_{j in j0..j1} P[h][j] · value(j) (part vp). Heads at stride KVQ_MAX_HD
 * (acc), IFG_KVQ_MAX_BS (S, P) and hd (q). */
/* A block of a span: its key and value parts, its positions j0..j1 in range, its scores at
 * S + off; per-channel keys: its quantized groups v0..v1-1 and the own group at own (or -1). */
typedef struct { const uint8_t *kp, *vp; int j0, j1, off, v0, v1, own; } kvq_blk;
#ifdef IFG_SIMD
/* r (8 or 16) int4 codes 0..15 of row `row` of a packed code matrix of `cols` columns (kvq.h:
 * two rows a byte row), from column col, as bytes. */
IFG_AI __m128i kvq_row4(const uint8_t *codes, size_t row, size_t col, size_t cols, int r) {
    const uint8_t *p = codes + (row >> 1) * cols + col;
    const __m128i b = r == 16 ? _mm_loadu_si128((const __m128i *)p) : _mm_loadl_epi64((const __m128i *)p);
    return _mm_and_si128((row & 1) ? _mm_srli_epi16(b, 4) : b, _mm_set1_epi8(0x0F));
}
#if defined(IFG_AVX512)
/* 16 E4M3 codes (as u16 lanes) → the f16 bits of value / 256 (kvq_e4m3_f16). */
IFG_AI __m256i kvq_e4m3_bits(__m256i c) {
    return _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x80)), 8),
                           _mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x7F)), 7));
}
/* IFG_VW values from index i of a row of codes (r = 16 or, at a head_dim tail, 8; the int4 types: kvq_dec4). */
IFG_AI ifg_vf kvq_dec(int type, const uint8_t *c, size_t i, int r) {
    switch (type) {
    case IFG_KV_BF16:
        return ifg_vbf16(r == 16 ? _mm256_loadu_si256((const __m256i *)((const uint16_t *)c + i))
                                 : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)((const uint16_t *)c + i))));
    case IFG_KV_F16:
        return _mm512_cvtph_ps(r == 16 ? _mm256_loadu_si256((const __m256i *)((const uint16_t *)c + i))
                                       : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)((const uint16_t *)c + i))));
    case IFG_KV_I8:
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(r == 16 ? _mm_loadu_si128((const __m128i *)(c + i))
                                                               : _mm_loadl_epi64((const __m128i *)(c + i))));
    case IFG_KV_FP8: /* value / 256; the scale carries the 256 */
        return _mm512_cvtph_ps(kvq_e4m3_bits(_mm256_cvtepu8_epi16(
            r == 16 ? _mm_loadu_si128((const __m128i *)(c + i)) : _mm_loadl_epi64((const __m128i *)(c + i)))));
    case IFG_KV_I8C: /* per-channel key codes: 16 positions, unsigned */
        return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + i))));
    default:
        return r == 16 ? _mm512_loadu_ps((const float *)c + i) : ifg_vload_n((const float *)c + i, r);
    }
}
/* IFG_VW (or r = 8) int4 codes of row `row` from column col (kvq_row4) as f32, less off. */
IFG_AI ifg_vf kvq_dec4(const uint8_t *codes, size_t row, size_t col, size_t cols, int r, int off) {
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(kvq_row4(codes, row, col, cols, r)), _mm512_set1_epi32(off)));
}
#else
IFG_AI ifg_vf kvq_dec4(const uint8_t *codes, size_t row, size_t col, size_t cols, int r, int off) {
    (void)r; /* always 8 */
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(kvq_row4(codes, row, col, cols, 8)), _mm256_set1_epi32(off)));
}
/* IFG_VW values of a row of codes from index i (the int4 types: kvq_dec4). */
IFG_AI ifg_vf kvq_dec(int type, const uint8_t *c, size_t i, int r) {
    (void)r; /* always 8 */
    switch (type) {
    case IFG_KV_BF16: return ifg_vbf16(_mm_loadu_si128((const __m128i *)((const uint16_t *)c + i)));
    case IFG_KV_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)c + i)));
    case IFG_KV_I8: return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(c + i))));
    case IFG_KV_FP8: { /* value / 256; the scale carries the 256 */
        const __m128i u = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(c + i)));
        return _mm256_cvtph_ps(_mm_or_si128(_mm_slli_epi16(_mm_and_si128(u, _mm_set1_epi16(0x80)), 8),
                                            _mm_slli_epi16(_mm_and_si128(u, _mm_set1_epi16(0x7F)), 7)));
    }
    case IFG_KV_I8C: return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + i))));
    default: return _mm256_loadu_ps((const float *)c + i);
    }
}
#endif

IFG_AI void kvq_qk(float *S, const float *q, const uint8_t *kp, int type, int n, int bs, int hd, int group,
                   float scale) {
    const int quant = kvq_scaled(type);
    const uint16_t *sc = (const uint16_t *)kp;
    const uint8_t *codes = kp + kvq_scale_bytes(type, bs, hd, group);
    for (int pc = 0; pc < bs; pc += IFG_VW) {
        ifg_vf a[KVQ_HMAX];
        for (int h = 0; h < n; h++) a[h] = ifg_vzero();
        for (int g0 = 0; g0 < hd; g0 += group) {
            const ifg_vf s = quant ? ifg_vmul(ifg_vload_w(sc, IFG_F16, (size_t)(g0 / group) * bs + pc),
                                              ifg_vset1(kvq_unit(type)))
                                   : ifg_vzero();
            for (int d = g0; d < g0 + group; d++) {
                ifg_vf kv = type == IFG_KV_I4 ? kvq_dec4(codes, d, pc, bs, IFG_VW, 8)
                                              : kvq_dec(type, codes, (size_t)d * bs + pc, IFG_VW);
                if (quant) kv = ifg_vmul(kv, s);
                for (int h = 0; h < n; h++) a[h] = ifg_vfma(ifg_vset1(q[(size_t)h * hd + d]), kv, a[h]);
            }
        }
        const ifg_vf sv = ifg_vset1(scale);
        for (int h = 0; h < n; h++) ifg_vstore(S + (size_t)h * IFG_KVQ_MAX_BS + pc, ifg_vmul(a[h], sv));
    }
}

/* Online-softmax update of one head over a block's scores s[0..bs) (positions outside the range
 * already -inf): s becomes the weights exp(s - m); returns the factor the old accumulator and
 * sum are scaled by. */
static inline float kvq_softmax(float *s, int bs, float *m, float *l) {
    ifg_vf mv = ifg_vload(s);
    for (int j = IFG_VW; j < bs; j += IFG_VW) mv = ifg_vmax(mv, ifg_vload(s + j));
    const float mt = ifg_vhmax(mv);
    float c = 1.0f;
    if (mt > *m) {
        c = *l > 0.0f ? expf(*m - mt) : 0.0f;
        *l *= c;
        *m = mt;
    }
    const ifg_vf mm = ifg_vset1(*m);
    ifg_vf sum = ifg_vzero();
    for (int j = 0; j < bs; j += IFG_VW) {
        const ifg_vf e = ifg_vexp(ifg_vsub(ifg_vload(s + j), mm));
        ifg_vstore(s + j, e);
        sum = ifg_vadd(sum, e);
    }
    *l += ifg_vhsum(sum);
    return c;
}

static inline void kvq_scale_acc(float *a, float c, int hd) {
    const ifg_vf cv = ifg_vset1(c);
    for (int d = 0; d < hd; d += IFG_VW) {
        const int r = hd - d < IFG_VW ? hd - d : IFG_VW;
        ifg_vstore_n(a + d, ifg_vmul(ifg_vload_n(a + d, r), cv), r);
    }
}


/* Per-channel keys over a span, for the quantized groups of its blocks (c the code, s / m the
 * channel's group scale and min): int8c S[h][j] = scale · Σ_d q_hd·(c_dj·s_d + m_d) in f32;
 * int4c S[h][j] = scale · (Σ_d bf16(q_hd·s_d)·c_dj + Σ_d q_hd·m_d). int4c's codes are exact in
 * bf16, so with q·s rounded to bf16 (a relative 2^-8 at most, far under the codes' own step)
 * AVX-512 takes vdpbf16ps: two channels a lane, half the multiply instructions of f32 FMAs, which
 * bound this loop. Every build rounds int4c's q·s the same way; int8c, whose step is 16× finer,
 * stays exact (bf16 cost it a third more KLD for 5-12 % of its attention time). The queries
 * come transposed, qt[d][KVQ_HMAX] (zero-padded heads): one pointer, constant offsets for the n
 * broadcasts of a channel, and the mins' term of all heads one 8-lane FMA a channel. */
typedef struct { const uint8_t *c; const uint16_t *sc, *mn; float *s; } kvq_kvec;

/* f[0..hd) = the f16 values h[0..hd) as f32 */
IFG_AI void kvq_f16_row(float *f, const uint16_t *h, int hd) {
    for (int d = 0; d < hd; d += IFG_VW) {
        const int r = hd - d < IFG_VW ? hd - d : IFG_VW;
        ifg_vstore_n(f + d, r == IFG_VW ? ifg_vload_w(h, IFG_F16, d) : ifg_vload_w_n(h, IFG_F16, d, r), r);
    }
}

/* int8c: NV position vectors at a time (AVX-512: two groups, each query broadcast feeding both;
 * AVX2: one half group, as its 16 registers allow). */
IFG_AI void kvq_qkc_f32(const kvq_kvec *v, int nv, const float *qt, int type, int n, int rb, int hd, float scale) {
    float sf[2 * KVQ_MAX_HD] __attribute__((aligned(64))), mf[2 * KVQ_MAX_HD] __attribute__((aligned(64)));
    for (int k = 0; k < nv; k++) { /* each vector's group scales and mins as f32, [k][d] */
        kvq_f16_row(sf + k * KVQ_MAX_HD, v[k].sc, hd);
        kvq_f16_row(mf + k * KVQ_MAX_HD, v[k].mn, hd);
    }
    ifg_vf a[2][KVQ_HMAX];
    for (int k = 0; k < nv; k++)
        for (int h = 0; h < n; h++) a[k][h] = ifg_vzero();
    const uint8_t *c0 = v[0].c, *c1 = nv > 1 ? v[1].c : v[0].c;
    for (int d = 0; d < hd; d++, c0 += rb, c1 += rb, qt += KVQ_HMAX) {
        const ifg_vf k0 = ifg_vfma(kvq_dec(type, c0, 0, IFG_VW), ifg_vset1(sf[d]), ifg_vset1(mf[d]));
        const ifg_vf k1 = nv > 1 ? ifg_vfma(kvq_dec(type, c1, 0, IFG_VW), ifg_vset1(sf[KVQ_MAX_HD + d]),
                                            ifg_vset1(mf[KVQ_MAX_HD + d])) : k0;
        for (int h = 0; h < n; h++) {
            const ifg_vf qb = ifg_vset1(qt[h]);
            a[0][h] = ifg_vfma(qb, k0, a[0][h]);
            if (nv > 1) a[1][h] = ifg_vfma(qb, k1, a[1][h]);
        }
    }
    const ifg_vf sv = ifg_vset1(scale);
    for (int k = 0; k < nv; k++)
        for (int h = 0; h < n; h++) ifg_vstore(v[k].s + (size_t)h * IFG_KVQ_MAX_BS, ifg_vmul(a[k][h], sv));
}

#include "kvq_attention_int4.h" /* int4c keys and int4 values on bf16 dot products */

IFG_AI void kvq_qkc_vecs(const kvq_kvec *v, int nv, const float *q, const float *qt, int type, int n, int rb, int hd,
                         float scale) {
    if (type == IFG_KV_I4C) kvq_qkc_bf16(v, nv, q, qt, n, rb, hd, scale);
    else kvq_qkc_f32(v, nv, qt, type, n, rb, hd, scale);
}

#if defined(IFG_AVX512)
#define KVQ_NV 2
#else
#define KVQ_NV 1
#endif
IFG_AI void kvq_qkc_span(float *S, const float *q, const float *qt, const kvq_blk *blk, int nb, int type, int n,
                         int bs, int hd, float scale) {
    const size_t cofs = kvq_scale_bytes(type, bs, hd, 0);
    const int rb = bs; /* bytes from one channel's row (int4c: one channel pair's) to the next */
    const size_t kbytes = ifg_kvq_part_bytes(type, bs, hd, 0);
    kvq_kvec v[KVQ_NV];
    int nv = 0;
    for (int b = 0; b < nb; b++) {
        const uint16_t *sc = (const uint16_t *)blk[b].kp, *mn = sc + (size_t)(bs / IFG_KVQ_POS) * hd;
#if KVQ_PF_NEXT
        if (type == IFG_KV_I4C && b + 1 < nb) /* the next block's key part, from L2 into L1 */
            for (size_t o = 0; o < kbytes; o += 64) IFG_PREFETCH(blk[b + 1].kp + o);
#endif
        for (int gi = blk[b].v0; gi < blk[b].v1; gi++)
            for (int pc = gi * IFG_KVQ_POS; pc < (gi + 1) * IFG_KVQ_POS; pc += IFG_VW) {
                v[nv++] = (kvq_kvec){blk[b].kp + cofs + pc, sc + (size_t)gi * hd,
                                     mn + (size_t)gi * hd, S + blk[b].off + pc};
                if (nv == KVQ_NV) {
                    kvq_qkc_vecs(v, KVQ_NV, q, qt, type, n, rb, hd, scale);
                    nv = 0;
                }
            }
    }
    if (nv) kvq_qkc_vecs(v, 1, q, qt, type, n, rb, hd, scale);
}

#define KVQ_VSF 512 /* value scales converted to f32 per slice of a block's rows */
/* acc[h][dc..) += Σ over the span's rows P[h][off+j]·value(j) for W (1 or 2) vectors of channels
 * (r lanes when W is 1), the accumulators held in registers for the whole span. A row's scale
 * is converted once per slice. (int4 values: kvq_pv_i4.) */
IFG_AI void kvq_pv_pass(float *acc, const float *P, const kvq_blk *blk, int nb, int type, int n, int dc, int W,
                        int r, int bs, int hd, int group) {
    const int quant = kvq_scaled(type), ng = hd / group, gi = dc / group, rows = quant ? KVQ_VSF / ng : bs;
    const size_t cofs = kvq_scale_bytes(type, bs, hd, group);
    float vs[KVQ_VSF] __attribute__((aligned(64)));
    ifg_vf a[2][KVQ_HMAX];
    for (int h = 0; h < n; h++) {
        a[0][h] = W > 1 ? ifg_vload(acc + (size_t)h * KVQ_MAX_HD + dc) : ifg_vload_n(acc + (size_t)h * KVQ_MAX_HD + dc, r);
        if (W > 1) a[1][h] = ifg_vload(acc + (size_t)h * KVQ_MAX_HD + dc + IFG_VW);
    }
    for (int b = 0; b < nb; b++) {
        const uint16_t *sc = (const uint16_t *)blk[b].vp;
        const uint8_t *codes = blk[b].vp + cofs;
        const float *p = P + blk[b].off;
        for (int ja = blk[b].j0; ja <= blk[b].j1; ja += rows) {
            const int jb = blk[b].j1 < ja + rows - 1 ? blk[b].j1 : ja + rows - 1;
            if (quant) /* this slice's scales (every group) as f32 */
                for (int i = 0; i < (jb - ja + 1) * ng; i += IFG_VW) {
                    const int rr = (jb - ja + 1) * ng - i < IFG_VW ? (jb - ja + 1) * ng - i : IFG_VW;
                    const size_t o = (size_t)ja * ng + i;
                    const ifg_vf s = ifg_vmul(rr == IFG_VW ? ifg_vload_w(sc, IFG_F16, o) : ifg_vload_w_n(sc, IFG_F16, o, rr),
                                              ifg_vset1(kvq_unit(type)));
                    ifg_vstore(vs + i, s);
                }
            for (int j = ja; j <= jb; j++) {
                ifg_vf v0, v1 = ifg_vzero();
                v0 = kvq_dec(type, codes, (size_t)j * hd + dc, r);
                if (W > 1) v1 = kvq_dec(type, codes, (size_t)j * hd + dc + IFG_VW, IFG_VW);
                if (quant) {
                    const ifg_vf s = ifg_vset1(vs[(j - ja) * ng + gi]);
                    v0 = ifg_vmul(v0, s);
                    if (W > 1) v1 = ifg_vmul(v1, s);
                }
                for (int h = 0; h < n; h++) {
                    const ifg_vf pb = ifg_vset1(p[(size_t)h * IFG_KVQ_MAX_BS + j]);
                    a[0][h] = ifg_vfma(pb, v0, a[0][h]);
                    if (W > 1) a[1][h] = ifg_vfma(pb, v1, a[1][h]);
                }
            }
        }
    }
    for (int h = 0; h < n; h++) {
        if (W > 1) ifg_vstore(acc + (size_t)h * KVQ_MAX_HD + dc, a[0][h]);
        else ifg_vstore_n(acc + (size_t)h * KVQ_MAX_HD + dc, a[0][h], r);
        if (W > 1) ifg_vstore(acc + (size_t)h * KVQ_MAX_HD + dc + IFG_VW, a[1][h]);
    }
}

/* The span's values over head_dim: two vectors a pass where both lie in one scale group (AVX-512). */
IFG_AI void kvq_pv_span(float *acc, const float *P, const kvq_blk *blk, int nb, int type, int n, int bs, int hd,
                        int group) {
    if (type == IFG_KV_I4) {
        kvq_pv_i4(acc, P, blk, nb, n, bs, hd, group);
        return;
    }
    for (int dc = 0; dc < hd;) {
        const int left = hd - dc;
#if defined(IFG_AVX512)
        if (left >= 2 * IFG_VW && (group == hd || dc % group + 2 * IFG_VW <= group)) {
            kvq_pv_pass(acc, P, blk, nb, type, n, dc, 2, IFG_VW, bs, hd, group);
            dc += 2 * IFG_VW;
            continue;
        }
#endif
        if (left >= IFG_VW) kvq_pv_pass(acc, P, blk, nb, type, n, dc, 1, IFG_VW, bs, hd, group);
        else kvq_pv_pass(acc, P, blk, nb, type, n, dc, 1, left, bs, hd, group);
        dc += left < IFG_VW ? left : IFG_VW;
    }
}
#else
/* Scalar reference (the scalar build): the same order of blocks and heads, one value at a time. */
/* Code (row, col) of a code matrix of `cols` columns as its value before the scale. */
static inline float kvq_get(int type, const uint8_t *c, size_t row, int i, size_t cols) {
    const size_t row_off = row * cols;
    switch (type) {
    case IFG_KV_BF16: return ifg_bf16_to_f32(((const uint16_t *)c)[row_off + i]);
    case IFG_KV_F16: return ifg_f16_to_f32(((const uint16_t *)c)[row_off + i]);
    case IFG_KV_I8: return (float)((const int8_t *)c)[row_off + i];
    case IFG_KV_FP8: return ifg_f16_to_f32(kvq_e4m3_f16(c[row_off + i]));
    case IFG_KV_I4: return (float)kvq_get4(c, (int)row, i, (int)cols);
    case IFG_KV_I8C: return (float)c[row_off + i];
    case IFG_KV_I4C: return (float)(kvq_get4(c, (int)row, i, (int)cols) + 8);
    default: return ((const float *)c)[row_off + i];
    }
}

static inline void kvq_qk(float *S, const float *q, const uint8_t *kp, int type, int n, int bs, int hd, int group,
                          float scale) {
    const int quant = kvq_scaled(type);
    const uint16_t *sc = (const uint16_t *)kp;
    const uint8_t *codes = kp + kvq_scale_bytes(type, bs, hd, group);
    for (int h = 0; h < n; h++)
        for (int j = 0; j < bs; j++) {
            float a = 0.0f;
            for (int d = 0; d < hd; d++) {
                float kv = kvq_get(type, codes, (size_t)d, j, (size_t)bs);
                if (quant) kv *= ifg_f16_to_f32(sc[(size_t)(d / group) * bs + j]) * kvq_unit(type);
                a += q[(size_t)h * hd + d] * kv;
            }
            S[(size_t)h * IFG_KVQ_MAX_BS + j] = a * scale;
        }
}

static inline void kvq_qk_chan(float *S, const float *q, const uint8_t *kp, int type, int n, int v0, int v1,
                               int bs, int hd, float scale) {
    const uint16_t *sc = (const uint16_t *)kp, *mn = sc + (size_t)(bs / IFG_KVQ_POS) * hd;
    const uint8_t *codes = kp + kvq_scale_bytes(type, bs, hd, 0);
    for (int h = 0; h < n; h++)
        for (int gi = v0; gi < v1; gi++) {
            const float *qh = q + (size_t)h * hd;
            float M = 0.0f; /* int4c: bf16(q·s) times the code, plus Σ q·m, as the SIMD builds */
            for (int d = 0; d < hd && type == IFG_KV_I4C; d++) M += qh[d] * ifg_f16_to_f32(mn[(size_t)gi * hd + d]);
            for (int j = gi * IFG_KVQ_POS; j < (gi + 1) * IFG_KVQ_POS; j++) {
                float a = 0.0f;
                for (int d = 0; d < hd; d++) {
                    const size_t o = (size_t)gi * hd + d;
                    const float c = kvq_get(type, codes, (size_t)d, j, (size_t)bs), s = ifg_f16_to_f32(sc[o]);
                    if (type == IFG_KV_I4C) a += ifg_bf16_to_f32(ifg_f32_to_bf16(qh[d] * s)) * c;
                    else a += qh[d] * fmaf(c, s, ifg_f16_to_f32(mn[o]));
                }
                S[(size_t)h * IFG_KVQ_MAX_BS + j] = (a + M) * scale;
            }
        }
}

static inline void kvq_pv(float *acc, const float *P, const uint8_t *vp, int type, int n, int j0, int j1, int bs,
                          int hd, int group) {
    const int quant = kvq_scaled(type), ng = hd / group;
    const uint16_t *sc = (const uint16_t *)vp;
    const uint8_t *codes = vp + kvq_scale_bytes(type, bs, hd, group);
    for (int h = 0; h < n; h++)
        for (int j = j0; j <= j1; j++) {
            const float p = P[(size_t)h * IFG_KVQ_MAX_BS + j];
            for (int d = 0; d < hd; d++) {
                float v = kvq_get(type, codes, (size_t)j, d, (size_t)hd);
                if (type == IFG_KV_I4) /* the SIMD builds' rounding: bf16(p·s) times the code less 8 */
                    acc[(size_t)h * KVQ_MAX_HD + d] += ifg_bf16_to_f32(ifg_f32_to_bf16(p * ifg_f16_to_f32(sc[(size_t)j * ng + d / group]))) * v;
                else {
                    if (quant) v *= ifg_f16_to_f32(sc[(size_t)j * ng + d / group]) * kvq_unit(type);
                    acc[(size_t)h * KVQ_MAX_HD + d] += p * v;
                }
            }
        }
}

static inline float kvq_softmax(float *s, int bs, float *m, float *l) {
    float mt = s[0], c = 1.0f;
    for (int j = 1; j < bs; j++) if (s[j] > mt) mt = s[j];
    if (mt > *m) {
        c = *l > 0.0f ? expf(*m - mt) : 0.0f;
        *l *= c;
        *m = mt;
    }
    for (int j = 0; j < bs; j++) { s[j] = expf(s[j] - *m); *l += s[j]; }
    return c;
}

static inline void kvq_scale_acc(float *a, float c, int hd) {
    for (int d = 0; d < hd; d++) a[d] *= c;
}
#endif

/* The block kernels specialised for each code type and head count (constant arguments), kept out
 * of line: one call per block or span. */
#define KVQ_HEADS(F, n, ...) switch (n) { \
    case 1: F(__VA_ARGS__, 1); break; case 2: F(__VA_ARGS__, 2); break; \
    case 3: F(__VA_ARGS__, 3); break; case 4: F(__VA_ARGS__, 4); break; \
    case 5: F(__VA_ARGS__, 5); break; case 6: F(__VA_ARGS__, 6); break; \
    case 7: F(__VA_ARGS__, 7); break; default: F(__VA_ARGS__, 8); break; }
#define KVQ_TYPES(F, type, n, ...) switch (type) { \
    case IFG_KV_BF16: KVQ_HEADS(F, n, __VA_ARGS__, IFG_KV_BF16) break; \
    case IFG_KV_F16: KVQ_HEADS(F, n, __VA_ARGS__, IFG_KV_F16) break; \
    case IFG_KV_FP8: KVQ_HEADS(F, n, __VA_ARGS__, IFG_KV_FP8) break; \
    case IFG_KV_I8: KVQ_HEADS(F, n, __VA_ARGS__, IFG_KV_I8) break; \
    case IFG_KV_I4: KVQ_HEADS(F, n, __VA_ARGS__, IFG_KV_I4) break; \
    default: KVQ_HEADS(F, n, __VA_ARGS__, IFG_KV_F32) break; }
#define KVQ_QK(S, q, kp, bs, hd, group, scale, type, n) kvq_qk(S, q, kp, type, n, bs, hd, group, scale)

static __attribute__((noinline)) void kvq_qk_any(float *S, const float *q, const uint8_t *kp, int type, int n, int bs,
                                                 int hd, int group, float scale) {
    KVQ_TYPES(KVQ_QK, type, n, S, q, kp, bs, hd, group, scale)
}

#ifdef IFG_SIMD
#define KVQ_QKC(S, q, qt, blk, nb, bs, hd, scale, type, n) kvq_qkc_span(S, q, qt, blk, nb, type, n, bs, hd, scale)
static __attribute__((noinline)) void kvq_qkc_any(float *S, const float *q, const float *qt, const kvq_blk *blk, int nb, int type,
                                                  int n, int bs, int hd, float scale) {
    if (type == IFG_KV_I8C) KVQ_HEADS(KVQ_QKC, n, S, q, qt, blk, nb, bs, hd, scale, IFG_KV_I8C)
    else KVQ_HEADS(KVQ_QKC, n, S, q, qt, blk, nb, bs, hd, scale, IFG_KV_I4C)
}

#define KVQ_PV(acc, P, blk, nb, bs, hd, group, type, n) kvq_pv_span(acc, P, blk, nb, type, n, bs, hd, group)
static __attribute__((noinline)) void kvq_pv_any(float *acc, const float *P, const kvq_blk *blk, int nb, int type,
                                                 int n, int bs, int hd, int group) {
    KVQ_TYPES(KVQ_PV, type, n, acc, P, blk, nb, bs, hd, group)
}
#else
#define KVQ_QKC(S, q, kp, v0, v1, bs, hd, scale, type, n) kvq_qk_chan(S, q, kp, type, n, v0, v1, bs, hd, scale)
static void kvq_qkc_any(float *S, const float *q, const float *qt, const kvq_blk *blk, int nb, int type, int n, int bs, int hd,
                        float scale) {
    (void)qt;
    for (int b = 0; b < nb; b++) {
        if (blk[b].v1 <= blk[b].v0) continue;
        if (type == IFG_KV_I8C) KVQ_HEADS(KVQ_QKC, n, S + blk[b].off, q, blk[b].kp, blk[b].v0, blk[b].v1, bs, hd, scale, IFG_KV_I8C)
        else KVQ_HEADS(KVQ_QKC, n, S + blk[b].off, q, blk[b].kp, blk[b].v0, blk[b].v1, bs, hd, scale, IFG_KV_I4C)
    }
}

#define KVQ_PV(acc, P, vp, j0, j1, bs, hd, group, type, n) kvq_pv(acc, P, vp, type, n, j0, j1, bs, hd, group)
static void kvq_pv_any(float *acc, const float *P, const kvq_blk *blk, int nb, int type, int n, int bs, int hd,
                       int group) {
    for (int b = 0; b < nb; b++)
        KVQ_TYPES(KVQ_PV, type, n, acc, P + blk[b].off, blk[b].vp, blk[b].j0, blk[b].j1, bs, hd, group)
}
#endif

/* One (token, kv head) item for G (<= KVQ_GMAX) query heads stored contiguously at q / out, over
 * positions first..last of the sequence whose block table is bt; kc / vc point at this layer's
 * pools, parts kpb / vpb bytes, this kv head's part of block b at (b*n_kv + kvh). Per-channel
 * keys: own is the f32 keys of last's own group, channel-major [hd][POS]. The blocks are taken
 * a span of up to IFG_KVQ_MAX_BS positions at a time: their scores, one online-softmax step,
 * then their values. */
static void kvq_group(float *out, const float *q, const uint8_t *kc, const uint8_t *vc, int kt, int vt,
                      int group, const int32_t *bt, int bs, int n_kv, int kvh, size_t kpb, size_t vpb,
                      int first, int last, int hd, int G, float scale, const float *own) {
    const int g0 = last & ~(IFG_KVQ_POS - 1); /* per-channel keys: positions >= g0 come from own */
    const int chan = kvq_chan(kt), blast = last / bs;
    float S[KVQ_GMAX][IFG_KVQ_MAX_BS] __attribute__((aligned(64)));
    float acc[KVQ_GMAX][KVQ_MAX_HD] __attribute__((aligned(64)));
    float m[KVQ_GMAX], l[KVQ_GMAX];
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        memset(acc[g], 0, (size_t)hd * sizeof(float));
    }
#ifdef IFG_SIMD /* per-channel keys: the queries as qt[d][KVQ_HMAX] per KVQ_HMAX heads, zero-padded (AVX-512
                   int4c: then qt2[d][2·KVQ_HMAX], each head twice, for kvq_minterm2) */
    float qt[KVQ_GMAX / KVQ_HMAX][KVQ_QTN] __attribute__((aligned(64)));
    if (chan)
        for (int h0 = 0; h0 < G; h0 += KVQ_HMAX)
            for (int d = 0; d < hd; d++)
                for (int h = 0; h < KVQ_HMAX; h++) {
                    const float x = h0 + h < G ? q[(size_t)(h0 + h) * hd + d] : 0.0f;
                    qt[h0 / KVQ_HMAX][d * KVQ_HMAX + h] = x;
#if defined(IFG_AVX512)
                    if (kt == IFG_KV_I4C)
                        qt[h0 / KVQ_HMAX][KVQ_QT2 + (d * KVQ_HMAX + h) * 2] = qt[h0 / KVQ_HMAX][KVQ_QT2 + (d * KVQ_HMAX + h) * 2 + 1] = x;
#endif
                }
#define KVQ_QC(h0) qt[(h0) / KVQ_HMAX]
#else
#define KVQ_QC(h0) (q + (size_t)(h0) * hd)
#endif
    for (int bi = first / bs; bi <= blast;) {
        kvq_blk blk[IFG_KVQ_MAX_BS / IFG_KVQ_POS];
        int nb = 0, ns = 0;
        for (; bi <= blast && (nb == 0 || ns + bs <= KVQ_SPAN); bi++, nb++, ns += bs) {
            const size_t part = (size_t)bt[bi] * n_kv + kvh;
            kvq_blk *b = &blk[nb];
            b->kp = kc + part * kpb;
            b->vp = vc + part * vpb;
            b->j0 = first > bi * bs ? first - bi * bs : 0;
            b->j1 = last < bi * bs + bs - 1 ? last - bi * bs : bs - 1;
            b->off = ns;
            b->v0 = b->j0 / IFG_KVQ_POS; /* per-channel keys: the quantized groups v0..v1-1, then own */
            b->v1 = g0 - bi * bs < bs ? (g0 - bi * bs) / IFG_KVQ_POS : bs / IFG_KVQ_POS;
            b->own = g0 - bi * bs < bs ? g0 - bi * bs : -1;
        }
        /* the next span's parts: one stream per kv head, far apart */
        for (int b2 = bi; b2 <= blast && b2 < bi + nb; b2++) {
            const size_t nx = (size_t)bt[b2] * n_kv + kvh;
            for (size_t o = 0; o < kpb; o += 64) __builtin_prefetch((const void *)(kc + nx * kpb + o), 0, KVQ_PF_LOC);
            for (size_t o = 0; o < vpb; o += 64) __builtin_prefetch((const void *)(vc + nx * vpb + o), 0, KVQ_PF_LOC);
        }
        for (int h0 = 0; h0 < G; h0 += KVQ_HMAX) {
            const int n = G - h0 < KVQ_HMAX ? G - h0 : KVQ_HMAX;
            if (chan) kvq_qkc_any(S[h0], q + (size_t)h0 * hd, KVQ_QC(h0), blk, nb, kt, n, bs, hd, scale);
            for (int b = 0; b < nb; b++) {
                if (!chan)
                    kvq_qk_any(S[h0] + blk[b].off, q + (size_t)h0 * hd, blk[b].kp, kt, n, bs, hd, group, scale);
                else if (blk[b].own >= 0) /* the own group: f32 rows, as an f32 part of POS positions */
                    kvq_qk_any(S[h0] + blk[b].off + blk[b].own, q + (size_t)h0 * hd, (const uint8_t *)own,
                               IFG_KV_F32, n, IFG_KVQ_POS, hd, hd, scale);
            }
        }
#undef KVQ_QC
        for (int g = 0; g < G; g++) {
            for (int b = 0; b < nb; b++) {
                for (int j = 0; j < blk[b].j0; j++) S[g][blk[b].off + j] = -INFINITY;
                for (int j = blk[b].j1 + 1; j < bs; j++) S[g][blk[b].off + j] = -INFINITY;
            }
            const float c = kvq_softmax(S[g], ns, &m[g], &l[g]);
            if (c != 1.0f) kvq_scale_acc(acc[g], c, hd);
        }
        for (int h0 = 0; h0 < G; h0 += KVQ_HMAX) {
            const int n = G - h0 < KVQ_HMAX ? G - h0 : KVQ_HMAX;
            kvq_pv_any(acc[h0], S[h0], blk, nb, vt, n, bs, hd, group);
        }
    }
    for (int g = 0; g < G; g++) {
        const float inv = 1.0f / l[g];
        for (int d = 0; d < hd; d++) out[(size_t)g * hd + d] = acc[g][d] * inv;
    }
}

void ifg_kvq_attention_part(float *out, int ldo, const float *q, int ldq, const void *k_cache,
                            const void *v_cache, int k_type, int v_type, int group, const float *k, int ldk,
                            const float *stage, int stage_rows, const int32_t *block_table, int max_blocks,
                            int block_size, const int32_t *seq, const int32_t *pos, int T, int n_heads,
                            int n_kv_heads, int head_dim, float scale, int window) {
    if (head_dim <= 0 || head_dim > KVQ_MAX_HD || n_kv_heads <= 0 || n_heads % n_kv_heads ||
        block_size % IFG_KVQ_POS || block_size > IFG_KVQ_MAX_BS || head_dim % IFG_KVQ_CHUNK ||
        group <= 0 || head_dim % group || !kvq_stage_ok(k_type, k, stage, stage_rows) || kvq_chan(v_type))
        return;
    const int chan = kvq_chan(k_type), kv_dim = n_kv_heads * head_dim;
    const int G = n_heads / n_kv_heads;
    const size_t kpb = ifg_kvq_part_bytes(k_type, block_size, head_dim, group),
                 vpb = ifg_kvq_part_bytes(v_type, block_size, head_dim, group);
    const long items = (long)T * n_kv_heads;
    IFG_PRAGMA(omp for schedule(static, 1))
    for (long it = 0; it < items; it++) {
        const int t = (int)(it / n_kv_heads), kvh = (int)(it % n_kv_heads);
        const int32_t *bt = block_table + (size_t)seq[t] * max_blocks;
        const int first = window > 0 && pos[t] + 1 > window ? pos[t] + 1 - window : 0;
        float own[KVQ_MAX_HD * IFG_KVQ_POS] __attribute__((aligned(64)));
        if (chan) { /* the own group's keys in f32, channel-major; positions past pos[t] are masked */
            const int g0 = pos[t] & ~(IFG_KVQ_POS - 1);
            for (int i = 0; i < IFG_KVQ_POS; i++) {
                const float *r = g0 + i <= pos[t] ? kvq_row(k, ldk, stage, stage_rows, seq, pos, T, t, g0 + i,
                                                            kv_dim, head_dim, kvh) : NULL;
                for (int d = 0; d < head_dim; d++) own[d * IFG_KVQ_POS + i] = r ? r[d] : 0.0f;
            }
        }
        for (int g0 = 0; g0 < G; g0 += KVQ_GMAX) {
            const int gc = G - g0 < KVQ_GMAX ? G - g0 : KVQ_GMAX;
            const size_t h0 = (size_t)kvh * G + g0;
            kvq_group(out + (size_t)t * ldo + h0 * head_dim, q + (size_t)t * ldq + h0 * head_dim,
                      (const uint8_t *)k_cache, (const uint8_t *)v_cache, k_type, v_type, group, bt, block_size,
                      n_kv_heads, kvh, kpb, vpb, first, pos[t], head_dim, gc, scale, own);
        }
    }
}

void ifg_kvq_attention(float *out, int ldo, const float *q, int ldq, const void *k_cache, const void *v_cache,
                       int k_type, int v_type, int group, const float *k, int ldk, const float *stage,
                       int stage_rows, const int32_t *block_table, int max_blocks, int block_size,
                       const int32_t *seq, const int32_t *pos, int T, int n_heads, int n_kv_heads, int head_dim,
                       float scale, int window, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_kvq_attention_part(out, ldo, q, ldq, k_cache, v_cache, k_type, v_type, group, k, ldk, stage,
                               stage_rows, block_table, max_blocks, block_size, seq, pos, T, n_heads, n_kv_heads,
                               head_dim, scale, window);
    }
}

