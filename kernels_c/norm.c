/* norm.c — RMSNorm. One row per work item; the sum of squares is accumulated in f64 in every
 * variant (HF does it in f32: this is the "or better"), then, as HF does in f32:
 * r = 1/sqrt(mean + eps), out = (x * r) * w. */
#include "norm.h"

static double norm_sumsq(const float *x, int n) {
    int i = 0;
    double s = 0.0;
#if defined(IFG_AVX512)
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        a0 = _mm512_fmadd_pd(lo, lo, a0);
        a1 = _mm512_fmadd_pd(hi, hi, a1);
    }
    if (i < n) {
        __m512 v = _mm512_maskz_loadu_ps((__mmask16)((1u << (n - i)) - 1u), x + i);
        __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        a0 = _mm512_fmadd_pd(lo, lo, a0);
        a1 = _mm512_fmadd_pd(hi, hi, a1);
        i = n;
    }
    s = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
#elif defined(IFG_AVX2)
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        a0 = _mm256_fmadd_pd(lo, lo, a0);
        a1 = _mm256_fmadd_pd(hi, hi, a1);
    }
    __m256d a = _mm256_add_pd(a0, a1);
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    s = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
#endif
    for (; i < n; i++) s += (double)x[i] * (double)x[i];
    return s;
}

static void norm_scale_row(float *o, const float *x, const float *w, float r, int n) {
    int i = 0;
#if defined(IFG_AVX512)
    __m512 rv = _mm512_set1_ps(r);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), rv), _mm512_loadu_ps(w + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(o + i, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), rv),
                                                      _mm512_maskz_loadu_ps(m, w + i)));
        i = n;
    }
#elif defined(IFG_AVX2)
    __m256 rv = _mm256_set1_ps(r);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(w + i)));
#endif
    for (; i < n; i++) o[i] = (x[i] * r) * w[i];
}

void ifg_rmsnorm_part(float *out, const float *x, const float *w, int T, int dim, float eps) {
    IFG_FOR
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * dim;
        float var = (float)(norm_sumsq(xr, dim) / dim);
        float r = 1.0f / sqrtf(var + eps);
        norm_scale_row(out + (size_t)t * dim, xr, w, r, dim);
    }
}

void ifg_rmsnorm(float *out, const float *x, const float *w, int T, int dim, float eps, int n_threads) {
    IFG_PARALLEL(n_threads) { ifg_rmsnorm_part(out, x, w, T, dim, eps); }
}
