/* rope.c — RoPE. One token per work item: its cos/sin table (scalar libm, f32 angle as HF
 * computes it) is built once, in chunks of ROPE_CHUNK frequencies, and applied to every head
 * with the rotation vectorised over i. */
#include "rope.h"

#define ROPE_CHUNK 128

static void rope_rotate(float *x1p, float *x2p, const float *c, const float *s, int n) {
    int i = 0;
#if defined(IFG_AVX512)
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        __m512 x1 = _mm512_maskz_loadu_ps(m, x1p + i), x2 = _mm512_maskz_loadu_ps(m, x2p + i);
        __m512 cv = _mm512_maskz_loadu_ps(m, c + i), sv = _mm512_maskz_loadu_ps(m, s + i);
        _mm512_mask_storeu_ps(x1p + i, m, _mm512_fmsub_ps(x1, cv, _mm512_mul_ps(x2, sv)));
        _mm512_mask_storeu_ps(x2p + i, m, _mm512_fmadd_ps(x2, cv, _mm512_mul_ps(x1, sv)));
    }
#elif defined(IFG_AVX2)
    for (; i + 8 <= n; i += 8) {
        __m256 x1 = _mm256_loadu_ps(x1p + i), x2 = _mm256_loadu_ps(x2p + i);
        __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
        _mm256_storeu_ps(x1p + i, _mm256_fmsub_ps(x1, cv, _mm256_mul_ps(x2, sv)));
        _mm256_storeu_ps(x2p + i, _mm256_fmadd_ps(x2, cv, _mm256_mul_ps(x1, sv)));
    }
#endif
    for (; i < n; i++) {
        float a = x1p[i], b = x2p[i];
        x1p[i] = a * c[i] - b * s[i];
        x2p[i] = b * c[i] + a * s[i];
    }
}

void ifg_rope_part(float *x, int ldx, const int32_t *pos, const float *inv_freq, int T, int n_heads, int head_dim) {
    int half = head_dim / 2;
    IFG_FOR
    for (int t = 0; t < T; t++) {
        float c[ROPE_CHUNK], s[ROPE_CHUNK];
        float p = (float)pos[t];
        float *xt = x + (size_t)t * ldx;
        for (int i0 = 0; i0 < half; i0 += ROPE_CHUNK) {
            int n = half - i0 < ROPE_CHUNK ? half - i0 : ROPE_CHUNK;
            for (int i = 0; i < n; i++) {
                float a = p * inv_freq[i0 + i];
                c[i] = cosf(a);
                s[i] = sinf(a);
            }
            for (int h = 0; h < n_heads; h++) {
                float *xh = xt + (size_t)h * head_dim + i0;
                rope_rotate(xh, xh + half, c, s, n);
            }
        }
    }
}

void ifg_rope(float *x, int ldx, const int32_t *pos, const float *inv_freq, int T, int n_heads, int head_dim, int n_threads) {
    IFG_PARALLEL(n_threads) { ifg_rope_part(x, ldx, pos, inv_freq, T, n_heads, head_dim); }
}
