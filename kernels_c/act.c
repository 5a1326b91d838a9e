/* act.c — SwiGLU's elementwise half: gate = silu(gate) * up.
 * SIMD paths use the polynomial exp of act.h (~1.5e-7 relative); scalar uses libm expf. */
#include "act.h"

#define ACT_CHUNK 4096 /* elements per work item (a multiple of every vector width) */

static inline float act_silu_mul1(float g, float u) { return g / (1.0f + expf(-g)) * u; }

static void act_silu_mul_span(float *g, const float *u, size_t n) {
    size_t i = 0;
#if defined(IFG_AVX512)
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i);
        __m512 e = ifg_exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
    if (i < n) {
        __mmask16 m = ifg_tailmask16((int)(n - i));
        __m512 x = _mm512_maskz_loadu_ps(m, g + i);
        __m512 e = ifg_exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_mask_storeu_ps(g + i, m, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)),
                                                      _mm512_maskz_loadu_ps(m, u + i)));
        i = n;
    }
#elif defined(IFG_AVX2)
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 e = ifg_exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    if (i < n) {
        __m256i m = ifg_tailmask8((int)(n - i));
        __m256 x = _mm256_maskload_ps(g + i, m);
        __m256 e = ifg_exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_maskstore_ps(g + i, m, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)),
                                                    _mm256_maskload_ps(u + i, m)));
        i = n;
    }
#endif
    for (; i < n; i++) g[i] = act_silu_mul1(g[i], u[i]);
}

void ifg_silu_mul_part(float *gate, const float *up, size_t n) {
    long nchunks = (long)((n + ACT_CHUNK - 1) / ACT_CHUNK);
    IFG_FOR
    for (long c = 0; c < nchunks; c++) {
        size_t i0 = (size_t)c * ACT_CHUNK, len = n - i0 < ACT_CHUNK ? n - i0 : ACT_CHUNK;
        act_silu_mul_span(gate + i0, up + i0, len);
    }
}

void ifg_silu_mul(float *gate, const float *up, size_t n, int n_threads) {
    IFG_PARALLEL(n_threads) { ifg_silu_mul_part(gate, up, n); }
}
