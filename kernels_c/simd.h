/* simd.h — the one vector vocabulary every kernel family writes its SIMD code in.
 *
 * A kernel is written once against these names; each ISA block below says what they are
 * (AVX-512: 16 f32 lanes, masked tails; AVX2 + FMA + F16C: 8 lanes, maskload / a copied
 * tail). The scalar build defines none of them: it runs each family's `*_ref` functions.
 * Every helper's arithmetic (and so its rounding) is fixed per ISA: the horizontal sums are
 * named by their tree because kernels rely on a given output's sum order.
 *
 *   ifg_vf / ifg_vi      IFG_VW f32 / int32 lanes
 *   ifg_vzero, ifg_vset1, ifg_vadd, ifg_vsub, ifg_vmul, ifg_vdiv, ifg_vmax, ifg_vmin
 *                        (max / min return b where either lane is NaN: a NaN a is skipped)
 *   ifg_vfma(a, b, c) = a·b + c, ifg_vfms(a, b, c) = a·b - c (one rounding)
 *   ifg_vload / ifg_vloada / ifg_vstore / ifg_vstorea      unaligned / 64-byte aligned
 *   ifg_vload_n / ifg_vstore_n (p, r)                      the first r <= IFG_VW lanes, rest 0
 *   ifg_vload_w / ifg_vload_w_n (w, dtype, i[, r])         f32 / bf16 / f16 weights as f32
 *   ifg_vfold(v) → __m128     lane j = Σ of lanes j, j+4, … (fixed tree)
 *   ifg_hadd4(a, b, c, d) / ifg_hadd1(a)                   4 × 4 lanes → 4 sums (hadd tree)
 *   ifg_vsum4(a0..a3) → __m128                             4 vectors → their 4 sums
 *   ifg_vhsum / ifg_vhmax / ifg_vhmin                      a vector → one float
 *   ifg_vm               a lane mask: ifg_vcmpeq / ifg_vcmpge / ifg_vcmple (ordered: NaN is
 *                        false), ifg_vmand, ifg_vblend(m, a, b) = m ? b : a, ifg_vmbits(m) → bit
 *                        j for lane j
 *   ifg_vcvtt (f32 → int32, truncating), ifg_viota (0, 1, …), ifg_viand, ifg_vieq_bits(a, b),
 *   ifg_viadd_eq(a, c, v) = a + v in the lanes where a == c
 *   ifg_vd               IFG_VW / 2 f64 lanes: ifg_vdzero, ifg_vsq_f64(v, &lo, &hi) (the
 *                        squares of v's low / high half, widened, added in), ifg_vdsum(lo, hi)
 *   IFG_VTAIL_MASKED     1 where a masked tail (ifg_vload_n) costs what a full vector does
 *                        (AVX-512): a kernel whose scalar tail computes differently (libm, f64)
 *                        then keeps its tail in the vector path
 *   ifg_round_i32            roundf of every lane (halves away from zero) as int32
 *   ifg_vround_bf16(v)       every lane rounded to bf16 (nearest even, NaN stays NaN; AVX-512's
 *                            vcvtneps2bf16 also flushes subnormals to zero), as f32
 *   ifg_x4(p)                4 int8 at p as one int32 (to broadcast against 4-byte lanes)
 *   IFG_PREFETCH(p)          prefetch p into every cache level (read)
 */
#ifndef IFG_SIMD_H
#define IFG_SIMD_H

#include "core.h"

/* Force-inline: the tile kernels take their shapes as constant arguments and must be
 * specialised at every call site. */
#define IFG_AI static inline __attribute__((always_inline))

#if defined(IFG_AVX512) || defined(IFG_AVX2)
#define IFG_SIMD 1
#endif

#define IFG_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)

static inline int32_t ifg_x4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* ---- AVX-512 (F, BW, VL; the library variant also has DQ, BF16, VNNI) -------------------- */
#if defined(IFG_AVX512)
#define IFG_VW 16
typedef __m512 ifg_vf;
typedef __m512i ifg_vi;
IFG_AI __mmask16 ifg_vmask(int r) { return (__mmask16)((1u << r) - 1u); } /* 0 <= r <= 16 */
IFG_AI ifg_vf ifg_vzero(void) { return _mm512_setzero_ps(); }
IFG_AI ifg_vf ifg_vset1(float f) { return _mm512_set1_ps(f); }
IFG_AI ifg_vf ifg_vadd(ifg_vf a, ifg_vf b) { return _mm512_add_ps(a, b); }
IFG_AI ifg_vf ifg_vsub(ifg_vf a, ifg_vf b) { return _mm512_sub_ps(a, b); }
IFG_AI ifg_vf ifg_vmax(ifg_vf a, ifg_vf b) { return _mm512_max_ps(a, b); }
IFG_AI ifg_vf ifg_vmul(ifg_vf a, ifg_vf b) { return _mm512_mul_ps(a, b); }
IFG_AI ifg_vf ifg_vdiv(ifg_vf a, ifg_vf b) { return _mm512_div_ps(a, b); }
IFG_AI ifg_vf ifg_vfms(ifg_vf a, ifg_vf b, ifg_vf c) { return _mm512_fmsub_ps(a, b, c); }
IFG_AI ifg_vf ifg_vfma(ifg_vf a, ifg_vf b, ifg_vf c) { return _mm512_fmadd_ps(a, b, c); }
IFG_AI ifg_vf ifg_vload(const float *p) { return _mm512_loadu_ps(p); }
IFG_AI ifg_vf ifg_vloada(const float *p) { return _mm512_load_ps(p); }
IFG_AI void ifg_vstore(float *p, ifg_vf v) { _mm512_storeu_ps(p, v); }
IFG_AI void ifg_vstorea(float *p, ifg_vf v) { _mm512_store_ps(p, v); }
IFG_AI ifg_vf ifg_vload_n(const float *p, int r) { return _mm512_maskz_loadu_ps(ifg_vmask(r), p); }
IFG_AI void ifg_vstore_n(float *p, ifg_vf v, int r) { _mm512_mask_storeu_ps(p, ifg_vmask(r), v); }
IFG_AI void ifg_vistore(void *p, ifg_vi v) { _mm512_storeu_si512(p, v); }
IFG_AI ifg_vi ifg_viset1(int32_t v) { return _mm512_set1_epi32(v); }
IFG_AI ifg_vi ifg_viadd(ifg_vi a, ifg_vi b) { return _mm512_add_epi32(a, b); }
IFG_AI ifg_vf ifg_vcvt(ifg_vi v) { return _mm512_cvtepi32_ps(v); }
/* bf16 is the top half of an f32: zero-extend and shift. */
IFG_AI ifg_vf ifg_vbf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
IFG_AI ifg_vf ifg_vload_w(const void *w, int dtype, size_t i) {
    const __m256i *p = (const __m256i *)((const uint16_t *)w + i);
    switch (dtype) {
    case IFG_BF16: return ifg_vbf16(_mm256_loadu_si256(p));
    case IFG_F16: return _mm512_cvtph_ps(_mm256_loadu_si256(p));
    default: return _mm512_loadu_ps((const float *)w + i);
    }
}
IFG_AI ifg_vf ifg_vload_w_n(const void *w, int dtype, size_t i, int r) { /* 0 < r < 16 */
    const __mmask16 m = ifg_vmask(r);
    const void *p = (const uint16_t *)w + i;
    switch (dtype) {
    case IFG_BF16: return ifg_vbf16(_mm256_maskz_loadu_epi16(m, p));
    case IFG_F16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
    default: return _mm512_maskz_loadu_ps(m, (const float *)w + i);
    }
}
/* 16 lanes → 4: lane j = (a[j] + a[j+8]) + (a[j+4] + a[j+12]). */
IFG_AI __m128 ifg_vfold(ifg_vf a) {
    const __m256 lo = _mm512_castps512_ps256(a);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
    const __m256 h = _mm256_add_ps(lo, hi);
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
/* lane j = the sum of a_j: pairs interleaved and added, then folded. */
IFG_AI __m128 ifg_vsum4(ifg_vf a0, ifg_vf a1, ifg_vf a2, ifg_vf a3) {
    const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    const __m512d u01 = _mm512_castps_pd(t01), u23 = _mm512_castps_pd(t23);
    return ifg_vfold(_mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(u01, u23)),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(u01, u23))));
}
IFG_AI float ifg_vhsum(ifg_vf a) { return _mm512_reduce_add_ps(a); }
IFG_AI ifg_vf ifg_vround_bf16(ifg_vf v) { return ifg_vbf16((__m256i)_mm512_cvtneps_pbh(v)); }
IFG_AI float ifg_vhmax(ifg_vf a) { return _mm512_reduce_max_ps(a); }
/* roundf (halves away from zero) of every lane, as int32: trunc(v) plus v's sign where
 * |v - trunc(v)| >= 0.5 (the difference is exact). */
IFG_AI __m512i ifg_round_i32(__m512 v) {
    const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(v, t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    const __m512 one = _mm512_or_ps(_mm512_set1_ps(1.0f), _mm512_and_ps(v, _mm512_set1_ps(-0.0f)));
    return _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, one));
}
IFG_AI ifg_vf ifg_vmin(ifg_vf a, ifg_vf b) { return _mm512_min_ps(a, b); }
IFG_AI float ifg_vhmin(ifg_vf a) { return _mm512_reduce_min_ps(a); }
typedef __mmask16 ifg_vm;
IFG_AI ifg_vm ifg_vcmpeq(ifg_vf a, ifg_vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
IFG_AI ifg_vm ifg_vcmpge(ifg_vf a, ifg_vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
IFG_AI ifg_vm ifg_vcmple(ifg_vf a, ifg_vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
IFG_AI ifg_vm ifg_vmand(ifg_vm a, ifg_vm b) { return a & b; }
IFG_AI ifg_vf ifg_vblend(ifg_vm m, ifg_vf a, ifg_vf b) { return _mm512_mask_blend_ps(m, a, b); }
IFG_AI unsigned ifg_vmbits(ifg_vm m) { return (unsigned)m; }
IFG_AI ifg_vi ifg_vcvtt(ifg_vf v) { return _mm512_cvttps_epi32(v); }
IFG_AI ifg_vi ifg_viota(void) { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
IFG_AI ifg_vi ifg_viand(ifg_vi a, ifg_vi b) { return _mm512_and_si512(a, b); }
IFG_AI unsigned ifg_vieq_bits(ifg_vi a, ifg_vi b) { return (unsigned)_mm512_cmpeq_epi32_mask(a, b); }
IFG_AI ifg_vi ifg_viadd_eq(ifg_vi a, ifg_vi c, ifg_vi v) { return _mm512_mask_add_epi32(a, _mm512_cmpeq_epi32_mask(a, c), a, v); }
#define IFG_VTAIL_MASKED 1
typedef __m512d ifg_vd;
IFG_AI ifg_vd ifg_vdzero(void) { return _mm512_setzero_pd(); }
IFG_AI void ifg_vsq_f64(ifg_vf v, ifg_vd *lo, ifg_vd *hi) {
    const __m512d l = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d h = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    *lo = _mm512_fmadd_pd(l, l, *lo);
    *hi = _mm512_fmadd_pd(h, h, *hi);
}
IFG_AI double ifg_vdsum(ifg_vd lo, ifg_vd hi) { return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi)); }

/* ---- AVX2 + FMA + F16C --------------------------------------------------------------------- */
#elif defined(IFG_AVX2)
#define IFG_VW 8
typedef __m256 ifg_vf;
typedef __m256i ifg_vi;
IFG_AI __m256i ifg_vmask(int r) { /* lanes < r all ones */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
IFG_AI ifg_vf ifg_vzero(void) { return _mm256_setzero_ps(); }
IFG_AI ifg_vf ifg_vset1(float f) { return _mm256_set1_ps(f); }
IFG_AI ifg_vf ifg_vadd(ifg_vf a, ifg_vf b) { return _mm256_add_ps(a, b); }
IFG_AI ifg_vf ifg_vsub(ifg_vf a, ifg_vf b) { return _mm256_sub_ps(a, b); }
IFG_AI ifg_vf ifg_vmax(ifg_vf a, ifg_vf b) { return _mm256_max_ps(a, b); }
IFG_AI ifg_vf ifg_vmul(ifg_vf a, ifg_vf b) { return _mm256_mul_ps(a, b); }
IFG_AI ifg_vf ifg_vdiv(ifg_vf a, ifg_vf b) { return _mm256_div_ps(a, b); }
IFG_AI ifg_vf ifg_vfms(ifg_vf a, ifg_vf b, ifg_vf c) { return _mm256_fmsub_ps(a, b, c); }
IFG_AI ifg_vf ifg_vfma(ifg_vf a, ifg_vf b, ifg_vf c) { return _mm256_fmadd_ps(a, b, c); }
IFG_AI ifg_vf ifg_vload(const float *p) { return _mm256_loadu_ps(p); }
IFG_AI ifg_vf ifg_vloada(const float *p) { return _mm256_load_ps(p); }
IFG_AI void ifg_vstore(float *p, ifg_vf v) { _mm256_storeu_ps(p, v); }
IFG_AI void ifg_vstorea(float *p, ifg_vf v) { _mm256_store_ps(p, v); }
IFG_AI ifg_vf ifg_vload_n(const float *p, int r) { return _mm256_maskload_ps(p, ifg_vmask(r)); }
IFG_AI void ifg_vstore_n(float *p, ifg_vf v, int r) { _mm256_maskstore_ps(p, ifg_vmask(r), v); }
IFG_AI void ifg_vistore(void *p, ifg_vi v) { _mm256_storeu_si256((__m256i *)p, v); }
IFG_AI ifg_vi ifg_viset1(int32_t v) { return _mm256_set1_epi32(v); }
IFG_AI ifg_vi ifg_viadd(ifg_vi a, ifg_vi b) { return _mm256_add_epi32(a, b); }
IFG_AI ifg_vf ifg_vcvt(ifg_vi v) { return _mm256_cvtepi32_ps(v); }
IFG_AI ifg_vf ifg_vbf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
IFG_AI ifg_vf ifg_vload_w(const void *w, int dtype, size_t i) {
    const __m128i *p = (const __m128i *)((const uint16_t *)w + i);
    switch (dtype) {
    case IFG_BF16: return ifg_vbf16(_mm_loadu_si128(p));
    case IFG_F16: return _mm256_cvtph_ps(_mm_loadu_si128(p));
    default: return _mm256_loadu_ps((const float *)w + i);
    }
}
IFG_AI ifg_vf ifg_vload_w_n(const void *w, int dtype, size_t i, int r) { /* 0 < r < 8 */
    if (dtype != IFG_BF16 && dtype != IFG_F16) return _mm256_maskload_ps((const float *)w + i, ifg_vmask(r));
    uint16_t raw[8] = {0}; /* the raw tail bits (AVX2 has no 16-bit masked load) */
    memcpy(raw, (const uint16_t *)w + i, (size_t)r * 2);
    const __m128i h = _mm_loadu_si128((const __m128i *)raw);
    return dtype == IFG_BF16 ? ifg_vbf16(h) : _mm256_cvtph_ps(h);
}
IFG_AI __m128 ifg_vfold(ifg_vf a) { return _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)); }
IFG_AI __m128 ifg_vsum4(ifg_vf a0, ifg_vf a1, ifg_vf a2, ifg_vf a3) {
    return ifg_vfold(_mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3)));
}
/* bf16 rounding as ifg_f32_to_bf16: add 0x7fff plus the kept lsb, clear the low half; NaN kept. */
IFG_AI ifg_vf ifg_vround_bf16(ifg_vf v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                           _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    const __m256 b = _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
    return _mm256_blendv_ps(b, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
IFG_AI float ifg_vhsum(ifg_vf a) {
    __m128 h = ifg_vfold(a);
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}
IFG_AI float ifg_vhmax(ifg_vf a) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
}
IFG_AI __m256i ifg_round_i32(__m256 v) {
    const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC), sign = _mm256_set1_ps(-0.0f);
    const __m256 up = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(v, t)), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    const __m256 one = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(v, sign));
    return _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, one)));
}
IFG_AI ifg_vf ifg_vmin(ifg_vf a, ifg_vf b) { return _mm256_min_ps(a, b); }
IFG_AI float ifg_vhmin(ifg_vf a) {
    __m128 h = _mm_min_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_min_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_min_ss(h, _mm_shuffle_ps(h, h, 1)));
}
typedef __m256 ifg_vm; /* all-ones lanes */
IFG_AI ifg_vm ifg_vcmpeq(ifg_vf a, ifg_vf b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
IFG_AI ifg_vm ifg_vcmpge(ifg_vf a, ifg_vf b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
IFG_AI ifg_vm ifg_vcmple(ifg_vf a, ifg_vf b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
IFG_AI ifg_vm ifg_vmand(ifg_vm a, ifg_vm b) { return _mm256_and_ps(a, b); }
IFG_AI ifg_vf ifg_vblend(ifg_vm m, ifg_vf a, ifg_vf b) { return _mm256_blendv_ps(a, b, m); }
IFG_AI unsigned ifg_vmbits(ifg_vm m) { return (unsigned)_mm256_movemask_ps(m); }
IFG_AI ifg_vi ifg_vcvtt(ifg_vf v) { return _mm256_cvttps_epi32(v); }
IFG_AI ifg_vi ifg_viota(void) { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
IFG_AI ifg_vi ifg_viand(ifg_vi a, ifg_vi b) { return _mm256_and_si256(a, b); }
IFG_AI unsigned ifg_vieq_bits(ifg_vi a, ifg_vi b) {
    return (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(a, b)));
}
IFG_AI ifg_vi ifg_viadd_eq(ifg_vi a, ifg_vi c, ifg_vi v) {
    return _mm256_add_epi32(a, _mm256_and_si256(_mm256_cmpeq_epi32(a, c), v));
}
#define IFG_VTAIL_MASKED 0
typedef __m256d ifg_vd;
IFG_AI ifg_vd ifg_vdzero(void) { return _mm256_setzero_pd(); }
IFG_AI void ifg_vsq_f64(ifg_vf v, ifg_vd *lo, ifg_vd *hi) {
    const __m256d l = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), h = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    *lo = _mm256_fmadd_pd(l, l, *lo);
    *hi = _mm256_fmadd_pd(h, h, *hi);
}
IFG_AI double ifg_vdsum(ifg_vd lo, ifg_vd hi) {
    const __m256d a = _mm256_add_pd(lo, hi);
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}
#endif

#ifdef IFG_SIMD
/* 4 lanes → their sums with one fixed tree: ifg_hadd4(a, b, c, d)[j] and ifg_hadd1 of the same
 * input give identical sums. */
IFG_AI __m128 ifg_hadd4(__m128 a, __m128 b, __m128 c, __m128 d) {
    return _mm_hadd_ps(_mm_hadd_ps(a, b), _mm_hadd_ps(c, d));
}
IFG_AI float ifg_hadd1(__m128 a) {
    const __m128 h = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(_mm_hadd_ps(h, h));
}
/* A 256-bit vector's full sum, the ifg_hadd1 tree after one fold (the int8 kernels keep
 * 256-bit accumulators in every build). */
IFG_AI float ifg_hsum256(__m256 a) {
    return ifg_hadd1(_mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)));
}
/* int32 lanes of Σ w·x over each 4 bytes for signed int8 w and x, as the AVX2 int8 kernels do
 * it: vpmaddubsw(|w|, sign(x, w)) then vpmaddwd with ones (|w| <= 128, |x| <= 127: the int16
 * pair sums stay below 32767). aw = |w| (ifg_abs8 of w). */
IFG_AI __m256i ifg_dot_s8(__m256i aw, __m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}
#endif

#endif
