/* kvq_attention_int4.h — int4 keys (per channel) and values on bf16 dot products: q·scale and
 * weight·scale rounded to bf16, the codes exact in bf16, so AVX-512 takes vdpbf16ps; AVX2 multiplies
 * the same rounded products in f32. Internal to kvq_attention.c (SIMD builds), included once after
 * its int8c key loop, whose helpers (kvq_kvec, kvq_f16_row, kvq_dec, kvq_blk, KVQ_HMAX) it uses. */
#ifndef IFG_KVQ_ATTENTION_INT4_H
#define IFG_KVQ_ATTENTION_INT4_H

/* ---- keys: S = scale · (Σ_d bf16(q_d·s_d)·c_d + Σ_d q_d·m_d) ---- */
/* The scores of v's positions: scale · (a[h] + mh[h·st]). */
IFG_AI void kvq_qkc_store(const kvq_kvec *v, const ifg_vf *a, const float *mh, int st, int n, float scale) {
    const ifg_vf sv = ifg_vset1(scale);
    for (int h = 0; h < n; h++) ifg_vstore(v->s + (size_t)h * IFG_KVQ_MAX_BS, ifg_vmul(ifg_vadd(a[h], ifg_vset1(mh[h * st])), sv));
}

#if defined(IFG_AVX512)
/* 16 bytes of a packed int4 byte row (kvq.h: a low and a high nibble, the two codes a bf16 dot
 * product pairs) as 16 bf16 pairs: word 2j lut[low nibble of byte j], word 2j+1 lut[high]. Byte b
 * widened to a dword times 4097 is b + (b << 12): the high nibble lands in bits 16..19 and the
 * low one stays in bits 0..3; vpermw reads the low 5 bits of a word, so lut holds 16 entries
 * twice (its bit 4 of the low word is the high nibble's lowest bit). */
IFG_AI __m512bh kvq_pairs4(__m128i bytes, __m512i lut) {
    return (__m512bh)_mm512_permutexvar_epi16(_mm512_madd_epi16(_mm512_cvtepu8_epi32(bytes), _mm512_set1_epi32(4097)), lut);
}

/* lut for kvq_pairs4: words i and 16 + i hold bf16(i - off). */
IFG_AI __m512i kvq_lut4(int off) {
    const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(ifg_viota(), ifg_viset1(off)));
    return (__m512i)_mm512_cvtne2ps_pbh(v, v);
}

/* One group's bf16(q_hd·s_d) as channel pairs, qp[h][d/2], for n heads of q (rows hd apart). */
IFG_AI void kvq_qscaled(uint32_t *qp, const float *q, const uint16_t *sc, int n, int hd) {
    for (int d = 0; d < hd; d += 32) {
        const int r0 = hd - d < 16 ? hd - d : 16, r1 = hd - d - 16 < 0 ? 0 : hd - d - 16 < 16 ? hd - d - 16 : 16;
        const ifg_vf s0 = r0 == 16 ? ifg_vload_w(sc, IFG_F16, d) : ifg_vload_w_n(sc, IFG_F16, d, r0);
        const ifg_vf s1 = r1 == 16 ? ifg_vload_w(sc, IFG_F16, d + 16) : r1 ? ifg_vload_w_n(sc, IFG_F16, d + 16, r1) : ifg_vzero();
        for (int h = 0; h < n; h++) {
            const float *qh = q + (size_t)h * hd + d;
            const ifg_vf a = ifg_vmul(ifg_vload_n(qh, r0), s0), b = r1 ? ifg_vmul(ifg_vload_n(qh + 16, r1), s1) : ifg_vzero();
            _mm512_storeu_si512(qp + (size_t)h * (KVQ_MAX_HD / 2) + d / 2, (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
    }
}

/* Σ_d q_hd·m_d of two groups' mins m0, m1 at once: lane 2h + k the sum of group k, head h. The
 * mins interleaved, (m0_d, m1_d) broadcast as one 8-byte pair, times qt2[d] (each head's q_d
 * twice): half the instructions per group of the AVX2 path's kvq_minterm. */
IFG_AI __m512 kvq_minterm2(const float *qt2, const uint16_t *m0, const uint16_t *m1, int hd) {
    double mf[KVQ_MAX_HD] __attribute__((aligned(64))); /* (m0_d, m1_d) as one 8-byte lane each */
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_add_epi32(lo, ifg_viset1(8));
    for (int d = 0; d < hd; d += 16) { /* hd: a multiple of IFG_KVQ_CHUNK */
        const int r = hd - d < 16 ? hd - d : 16;
        const __m512 a = r == 16 ? ifg_vload_w(m0, IFG_F16, d) : ifg_vload_w_n(m0, IFG_F16, d, r);
        const __m512 b = r == 16 ? ifg_vload_w(m1, IFG_F16, d) : ifg_vload_w_n(m1, IFG_F16, d, r);
        _mm512_store_pd(mf + d, _mm512_castps_pd(_mm512_permutex2var_ps(a, lo, b)));
        if (r > 8) _mm512_store_pd(mf + d + 8, _mm512_castps_pd(_mm512_permutex2var_ps(a, hi, b)));
    }
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0; /* four chains: one waits on the FMA's latency */
    for (int d = 0; d < hd; d += 4, qt2 += 4 * 2 * KVQ_HMAX) {
        c0 = _mm512_fmadd_ps(_mm512_load_ps(qt2), _mm512_castpd_ps(_mm512_set1_pd(mf[d])), c0);
        c1 = _mm512_fmadd_ps(_mm512_load_ps(qt2 + 2 * KVQ_HMAX), _mm512_castpd_ps(_mm512_set1_pd(mf[d + 1])), c1);
        c2 = _mm512_fmadd_ps(_mm512_load_ps(qt2 + 4 * KVQ_HMAX), _mm512_castpd_ps(_mm512_set1_pd(mf[d + 2])), c2);
        c3 = _mm512_fmadd_ps(_mm512_load_ps(qt2 + 6 * KVQ_HMAX), _mm512_castpd_ps(_mm512_set1_pd(mf[d + 3])), c3);
    }
    return _mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3));
}

/* int4c: two groups at a time, each with its own scaled queries. qt: the heads' queries
 * transposed, [hd][KVQ_HMAX], followed by qt2 = [hd][2·KVQ_HMAX] (each head twice, kvq_minterm2). */
IFG_AI void kvq_qkc_bf16(const kvq_kvec *v, int nv, const float *q, const float *qt, int n, int rb, int hd,
                         float scale) {
    uint32_t qp[2][KVQ_HMAX][KVQ_MAX_HD / 2] __attribute__((aligned(64)));
    float mh[2 * KVQ_HMAX] __attribute__((aligned(64)));
    for (int k = 0; k < nv; k++) kvq_qscaled(qp[k][0], q, v[k].sc, n, hd);
    _mm512_store_ps(mh, kvq_minterm2(qt + KVQ_QT2, v[0].mn, v[nv - 1].mn, hd));
    const __m512i lut = kvq_lut4(0);
    ifg_vf a[2][KVQ_HMAX];
    for (int k = 0; k < nv; k++)
        for (int h = 0; h < n; h++) a[k][h] = ifg_vzero();
    const uint8_t *c0 = v[0].c, *c1 = nv > 1 ? v[1].c : v[0].c;
    for (int p = 0; p < hd / 2; p++, c0 += rb, c1 += rb) { /* channels 2p, 2p+1: one byte row */
        const __m512bh k0 = kvq_pairs4(_mm_loadu_si128((const __m128i *)c0), lut);
        const __m512bh k1 = nv > 1 ? kvq_pairs4(_mm_loadu_si128((const __m128i *)c1), lut) : k0;
        for (int h = 0; h < n; h++) {
            a[0][h] = _mm512_dpbf16_ps(a[0][h], k0, (__m512bh)_mm512_set1_epi32((int)qp[0][h][p]));
            if (nv > 1) a[1][h] = _mm512_dpbf16_ps(a[1][h], k1, (__m512bh)_mm512_set1_epi32((int)qp[1][h][p]));
        }
    }
    for (int k = 0; k < nv; k++) kvq_qkc_store(&v[k], a[k], mh + k, 2, n, scale);
}
#else
/* M[h] = Σ_d q_hd·m_d for the KVQ_HMAX heads of qt. */
IFG_AI __m256 kvq_minterm(const float *qt, const uint16_t *mn, int hd) {
    float mf[KVQ_MAX_HD] __attribute__((aligned(64)));
    kvq_f16_row(mf, mn, hd);
    __m256 m0 = _mm256_setzero_ps(), m1 = m0, m2 = m0, m3 = m0; /* four chains: one waits on the FMA's latency */
    for (int d = 0; d < hd; d += 4, qt += 4 * KVQ_HMAX) { /* hd: a multiple of IFG_KVQ_CHUNK */
        m0 = _mm256_fmadd_ps(_mm256_loadu_ps(qt), _mm256_set1_ps(mf[d]), m0);
        m1 = _mm256_fmadd_ps(_mm256_loadu_ps(qt + KVQ_HMAX), _mm256_set1_ps(mf[d + 1]), m1);
        m2 = _mm256_fmadd_ps(_mm256_loadu_ps(qt + 2 * KVQ_HMAX), _mm256_set1_ps(mf[d + 2]), m2);
        m3 = _mm256_fmadd_ps(_mm256_loadu_ps(qt + 3 * KVQ_HMAX), _mm256_set1_ps(mf[d + 3]), m3);
    }
    return _mm256_add_ps(_mm256_add_ps(m0, m1), _mm256_add_ps(m2, m3));
}

/* int4c on AVX2: the same rounded products in f32 FMAs, one half group at a time. */
IFG_AI void kvq_qkc_bf16(const kvq_kvec *v, int nv, const float *q, const float *qt, int n, int rb, int hd,
                         float scale) {
    (void)q, (void)nv;
    float qs[KVQ_MAX_HD * KVQ_HMAX] __attribute__((aligned(32))), sf[KVQ_MAX_HD] __attribute__((aligned(32)));
    float mh[KVQ_HMAX];
    _mm256_storeu_ps(mh, kvq_minterm(qt, v->mn, hd));
    kvq_f16_row(sf, v->sc, hd); /* bf16(q·s) as qt */
    for (int d = 0; d < hd; d++)
        _mm256_store_ps(qs + d * KVQ_HMAX, ifg_vround_bf16(_mm256_mul_ps(_mm256_loadu_ps(qt + (size_t)d * KVQ_HMAX),
                                                                        _mm256_set1_ps(sf[d]))));
    ifg_vf a[KVQ_HMAX];
    for (int h = 0; h < n; h++) a[h] = ifg_vzero();
    for (int d = 0; d < hd; d++) {
        const ifg_vf kc = kvq_dec4(v->c, d, 0, rb, IFG_VW, 0);
        for (int h = 0; h < n; h++) a[h] = ifg_vfma(ifg_vset1(qs[d * KVQ_HMAX + h]), kc, a[h]);
    }
    kvq_qkc_store(v, a, mh, 1, n, scale);
}
#endif

/* ---- values ---- */
/* sg[off + j] = the f16 scale of group g of each position j of the span's blocks as f32, 0
 * outside their ranges (whose scales may be unset). */
IFG_AI void kvq_vscales(float *sg, const kvq_blk *blk, int nb, int bs, int ng, int g) {
    for (int b = 0; b < nb; b++) {
        const uint16_t *sc = (const uint16_t *)blk[b].vp;
#if defined(IFG_AVX512)
        for (int j = 0; j < bs; j += 16) {
            const __m512i jv = _mm512_add_epi32(ifg_viota(), ifg_viset1(j));
            const __mmask16 in = _mm512_cmpge_epi32_mask(jv, ifg_viset1(blk[b].j0)) & _mm512_cmple_epi32_mask(jv, ifg_viset1(blk[b].j1));
            /* ng > 1: dwords at the scales' f16 (the last may take 2 bytes of the codes after them), low halves kept */
            const __m256i h = ng == 1 ? _mm256_loadu_si256((const __m256i *)(sc + j))
                              : ng == 2 ? _mm512_cvtepi32_epi16(_mm512_srli_epi32( /* a dword a position: (group 0, group 1) */
                                              _mm512_loadu_si512((const void *)(sc + 2 * j)), 16 * g))
                                      : _mm512_cvtepi32_epi16(_mm512_mask_i32gather_epi32(
                                            _mm512_setzero_si512(), in, _mm512_add_epi32(_mm512_mullo_epi32(jv, ifg_viset1(ng)), ifg_viset1(g)),
                                            (const void *)sc, 2));
            _mm512_store_ps(sg + blk[b].off + j, _mm512_maskz_mov_ps(in, _mm512_cvtph_ps(h)));
        }
#else
        for (int j = 0; j < bs; j++)
            sg[blk[b].off + j] = j >= blk[b].j0 && j <= blk[b].j1 ? _cvtsh_ss(sc[(size_t)j * ng + g]) : 0.0f;
#endif
    }
}

/* int4 values: acc[h][d] += Σ_j bf16(P[h][j]·s_j)·(c_jd − 8), s_j the position's scale of d's
 * group. The codes less 8 are exact in bf16, so with the weight times the scale rounded to bf16
 * (a relative 2^-8 at most on each weight) AVX-512 takes vdpbf16ps over pairs of positions (j, j+1): half
 * the multiply instructions. Every build rounds the weights the same way. */
#if defined(IFG_AVX512)
/* Channels dc.. of rows j and j+1 (r of them, r <= 32; their byte row at x) as two vectors of
 * bf16 pairs: lane d holds (value of row j, value of row j+1) of channel d (and 16 + d). */
IFG_AI void kvq_vpair(const uint8_t *x, int r, __m512i lut, __m512bh *v0, __m512bh *v1) {
    const int r0 = r < 16 ? r : 16;
    *v0 = kvq_pairs4(r0 == 16 ? _mm_loadu_si128((const __m128i *)x) : _mm_maskz_loadu_epi8((__mmask16)((1u << r0) - 1u), x),
                     lut);
    if (r > 16)
        *v1 = kvq_pairs4(r == 32 ? _mm_loadu_si128((const __m128i *)(x + 16))
                                 : _mm_maskz_loadu_epi8((__mmask16)((1u << (r - 16)) - 1u), x + 16), lut);
}

/* r (<= 32) channels from dc over the span's positions in pairs, the weights pp[h][j/2] packed. */
IFG_AI void kvq_pv_i4_pass(float *acc, const uint32_t *pp, const kvq_blk *blk, int nb, int n, int dc, int r, int bs,
                           int hd, size_t cofs, __m512i lut) {
    const int r0 = r < 16 ? r : 16, r1 = r - r0;
    ifg_vf a0[KVQ_HMAX], a1[KVQ_HMAX];
    for (int h = 0; h < n; h++) {
        a0[h] = ifg_vload_n(acc + (size_t)h * KVQ_MAX_HD + dc, r0);
        a1[h] = r1 ? ifg_vload_n(acc + (size_t)h * KVQ_MAX_HD + dc + 16, r1) : ifg_vzero();
    }
    for (int b = 0; b < nb; b++) {
        const uint8_t *codes = blk[b].vp + cofs + dc;
        const uint32_t *w = pp + blk[b].off / 2;
#if KVQ_PF_NEXT
        if (b + 1 < nb) /* the next block's byte rows of these channels, from L2 into L1 */
            for (int jr = 0; jr < bs / 2; jr += hd < 64 ? 64 / hd : 1)
                IFG_PREFETCH(blk[b + 1].vp + cofs + dc + (size_t)jr * hd);
#endif
        for (int j = blk[b].j0 & ~1; j <= blk[b].j1; j += 2) {
            __m512bh v0, v1 = (__m512bh)_mm512_setzero_si512();
            kvq_vpair(codes + (size_t)(j / 2) * hd, r, lut, &v0, &v1);
            for (int h = 0; h < n; h++) {
                const __m512bh wb = (__m512bh)_mm512_set1_epi32((int)w[(size_t)h * (IFG_KVQ_MAX_BS / 2) + j / 2]);
                a0[h] = _mm512_dpbf16_ps(a0[h], v0, wb);
                if (r1) a1[h] = _mm512_dpbf16_ps(a1[h], v1, wb);
            }
        }
    }
    for (int h = 0; h < n; h++) {
        ifg_vstore_n(acc + (size_t)h * KVQ_MAX_HD + dc, a0[h], r0);
        if (r1) ifg_vstore_n(acc + (size_t)h * KVQ_MAX_HD + dc + 16, a1[h], r1);
    }
}

IFG_AI void kvq_pv_i4(float *acc, const float *P, const kvq_blk *blk, int nb, int n, int bs, int hd, int group) {
    const int ng = hd / group, ns = blk[nb - 1].off + bs;
    const size_t cofs = kvq_scale_bytes(IFG_KV_I4, bs, hd, group);
    const __m512i lut = kvq_lut4(8);
    float sg[IFG_KVQ_MAX_BS] __attribute__((aligned(64)));
    uint32_t pp[KVQ_HMAX][IFG_KVQ_MAX_BS / 2] __attribute__((aligned(64)));
    for (int g = 0; g < ng; g++) {
        kvq_vscales(sg, blk, nb, bs, ng, g);
        for (int h = 0; h < n; h++) /* bf16(P·s) in pairs of positions: the pairs vdpbf16ps takes */
            for (int j = 0; j < ns; j += 32) {
                const float *ph = P + (size_t)h * IFG_KVQ_MAX_BS + j;
                const __m512 lo = _mm512_mul_ps(_mm512_load_ps(ph), _mm512_load_ps(sg + j));
                const __m512 hi = j + 16 < ns ? _mm512_mul_ps(_mm512_load_ps(ph + 16), _mm512_load_ps(sg + j + 16)) : ifg_vzero();
                _mm512_store_si512(pp[h] + j / 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
        for (int dc = g * group; dc < (g + 1) * group; dc += 32) {
            const int r = (g + 1) * group - dc < 32 ? (g + 1) * group - dc : 32;
            if (r == 32) kvq_pv_i4_pass(acc, pp[0], blk, nb, n, dc, 32, bs, hd, cofs, lut); /* r a constant here */
            else kvq_pv_i4_pass(acc, pp[0], blk, nb, n, dc, r, bs, hd, cofs, lut);
        }
    }
}
#else
/* pf[h][j]: a span's weights of one scale group rounded to bf16, 0 outside the blocks' ranges. */
IFG_AI void kvq_pweights(float *pf, float *sg, const float *P, const kvq_blk *blk, int nb, int n, int bs, int ng,
                         int g) {
    kvq_vscales(sg, blk, nb, bs, ng, g);
    const int ns = blk[nb - 1].off + bs;
    for (int h = 0; h < n; h++)
        for (int j = 0; j < ns; j += IFG_VW)
            ifg_vstore(pf + (size_t)h * IFG_KVQ_MAX_BS + j,
                       ifg_vround_bf16(ifg_vmul(ifg_vload(P + (size_t)h * IFG_KVQ_MAX_BS + j), ifg_vload(sg + j))));
}

IFG_AI void kvq_pv_i4(float *acc, const float *P, const kvq_blk *blk, int nb, int n, int bs, int hd, int group) {
    const int ng = hd / group;
    const size_t cofs = kvq_scale_bytes(IFG_KV_I4, bs, hd, group);
    float sg[IFG_KVQ_MAX_BS] __attribute__((aligned(64))), pf[KVQ_HMAX][IFG_KVQ_MAX_BS] __attribute__((aligned(64)));
    for (int g = 0; g < ng; g++) {
        kvq_pweights(pf[0], sg, P, blk, nb, n, bs, ng, g);
        for (int dc = g * group; dc < (g + 1) * group; dc += IFG_VW) {
            const int r = (g + 1) * group - dc < IFG_VW ? (g + 1) * group - dc : IFG_VW;
            ifg_vf a[KVQ_HMAX];
            for (int h = 0; h < n; h++) a[h] = ifg_vload_n(acc + (size_t)h * KVQ_MAX_HD + dc, r);
            for (int b = 0; b < nb; b++) {
                const uint8_t *codes = blk[b].vp + cofs;
                for (int j = blk[b].j0; j <= blk[b].j1; j++) {
                    const ifg_vf v = kvq_dec4(codes, j, dc, hd, r, 8);
                    for (int h = 0; h < n; h++)
                        a[h] = ifg_vfma(ifg_vset1(pf[h][blk[b].off + j]), v, a[h]);
                }
            }
            for (int h = 0; h < n; h++) ifg_vstore_n(acc + (size_t)h * KVQ_MAX_HD + dc, a[h], r);
        }
    }
}
#endif

#endif
