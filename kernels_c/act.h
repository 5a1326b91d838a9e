/* act.h — activations, and the vector exp that other families share. */
#ifndef IFG_ACT_H
#define IFG_ACT_H

#include "core.h"
#include "simd.h"

// cdef-begin
/* gate[i] = silu(gate[i]) * up[i] for i < n, silu(g) = g / (1 + exp(-g)). f32. */
void ifg_silu_mul(float *gate, const float *up, size_t n, int n_threads);
// cdef-end

/* Orphaned work-sharing body of ifg_silu_mul: call from inside a parallel region (all threads). */
void ifg_silu_mul_part(float *gate, const float *up, size_t n);

/* Vector exp (Cephes expf polynomial after a two-constant ln 2 reduction), max relative error
 * ~1.5e-7 for results in the normal range: overflows to +inf above ~88.72, exp(-inf) = 0, NaN
 * in → NaN out. Results below ~1.19e-38 (x < -87.33, just above ln FLT_MIN) are flushed to 0:
 * no subnormal is ever produced, not even in an intermediate, since producing one costs a
 * microcode assist of ~100 cycles (softmax tails and masked logits hit that range all the time). */
#define IFG_EXP_HI 89.0f
#define IFG_EXP_LO -87.33f /* below it the result is 0; exp(LO) > FLT_MIN with margin */
#define IFG_EXP_LOG2E 1.44269504088896341f
#define IFG_EXP_C1 0.693359375f
#define IFG_EXP_C2 -2.12194440e-4f
#define IFG_EXP_P0 1.9875691500e-4f
#define IFG_EXP_P1 1.3981999507e-3f
#define IFG_EXP_P2 8.3334519073e-3f
#define IFG_EXP_P3 4.1665795894e-2f
#define IFG_EXP_P4 1.6666665459e-1f
#define IFG_EXP_P5 5.0000001201e-1f

#if defined(IFG_AVX512)
static inline __m512 ifg_exp16(__m512 x) {
    /* max/min return their second operand when either is NaN: keep x second so NaN survives */
    __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(IFG_EXP_LO), _CMP_NLT_UQ); /* x >= LO or NaN */
    x = _mm512_min_ps(_mm512_set1_ps(IFG_EXP_HI), _mm512_max_ps(_mm512_set1_ps(IFG_EXP_LO), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(IFG_EXP_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(IFG_EXP_C1), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(IFG_EXP_C2), r);
    __m512 y = _mm512_set1_ps(IFG_EXP_P0);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(IFG_EXP_P1));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(IFG_EXP_P2));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(IFG_EXP_P3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(IFG_EXP_P4));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(IFG_EXP_P5));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_scalef_ps(keep, y, n); /* y * 2^n, inf on overflow */
}
#endif

#if defined(IFG_AVX2)
static inline __m256 ifg_exp8(__m256 x) {
    __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(IFG_EXP_LO), _CMP_NLT_UQ); /* x >= LO or NaN */
    x = _mm256_min_ps(_mm256_set1_ps(IFG_EXP_HI), _mm256_max_ps(_mm256_set1_ps(IFG_EXP_LO), x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(IFG_EXP_LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(IFG_EXP_C1), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(IFG_EXP_C2), r);
    __m256 y = _mm256_set1_ps(IFG_EXP_P0);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(IFG_EXP_P1));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(IFG_EXP_P2));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(IFG_EXP_P3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(IFG_EXP_P4));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(IFG_EXP_P5));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n as two normal factors 2^n1 * 2^n2 (n in [-126, 128]) so that n = 128 with y < 1 still
     * gives a finite result and larger x gives inf */
    __m256i ni = _mm256_cvtps_epi32(n); /* NaN → INT_MIN: harmless, y is NaN already */
    __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    __m256i b = _mm256_set1_epi32(127);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, b), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, b), 23));
    return _mm256_and_ps(keep, _mm256_mul_ps(_mm256_mul_ps(y, s1), s2));
}
#endif

/* simd.h's vocabulary: ifg_vexp, the exp of every lane of an ifg_vf. */
#if defined(IFG_AVX512)
IFG_AI ifg_vf ifg_vexp(ifg_vf x) { return ifg_exp16(x); }
#elif defined(IFG_AVX2)
IFG_AI ifg_vf ifg_vexp(ifg_vf x) { return ifg_exp8(x); }
#endif

#endif
