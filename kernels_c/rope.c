/* rope.c — RoPE. One token per work item: its cos/sin table (scalar libm, f32 angle as HF
 * computes it) is built once, in chunks of ROPE_CHUNK frequencies, and applied to every head
 * with the rotation vectorised over i. */
#include "rope.h"
#include "simd.h"

#define ROPE_CHUNK 128

/* x1' = x1·c - x2·s, x2' = x2·c + x1·s for i < n: vectors (AVX-512 masks its tail), then scalar. */
static void rope_rotate(float *x1p, float *x2p, const float *c, const float *s, int n) {
    int i = 0;
#ifdef IFG_SIMD
    for (; i + IFG_VW <= n; i += IFG_VW) {
        const ifg_vf x1 = ifg_vload(x1p + i), x2 = ifg_vload(x2p + i), cv = ifg_vload(c + i), sv = ifg_vload(s + i);
        ifg_vstore(x1p + i, ifg_vfms(x1, cv, ifg_vmul(x2, sv)));
        ifg_vstore(x2p + i, ifg_vfma(x2, cv, ifg_vmul(x1, sv)));
    }
#if defined(IFG_AVX512)
    if (i < n) {
        const int r = n - i;
        const ifg_vf x1 = ifg_vload_n(x1p + i, r), x2 = ifg_vload_n(x2p + i, r);
        const ifg_vf cv = ifg_vload_n(c + i, r), sv = ifg_vload_n(s + i, r);
        ifg_vstore_n(x1p + i, ifg_vfms(x1, cv, ifg_vmul(x2, sv)), r);
        ifg_vstore_n(x2p + i, ifg_vfma(x2, cv, ifg_vmul(x1, sv)), r);
        i = n;
    }
#endif
#endif
    for (; i < n; i++) { /* the scalar reference (and AVX2's tail) */
        float a = x1p[i], b = x2p[i];
        x1p[i] = a * c[i] - b * s[i];
        x2p[i] = b * c[i] + a * s[i];
    }
}

void ifg_rope_part(float *x, int ldx, const int32_t *pos, const float *inv_freq, int freq_stride, int T,
                   int n_heads, int head_dim) {
    int half = head_dim / 2;
    IFG_FOR
    for (int t = 0; t < T; t++) {
        float c[ROPE_CHUNK], s[ROPE_CHUNK];
        float p = (float)pos[t];
        const float *freq = inv_freq + (size_t)t * freq_stride;
        float *xt = x + (size_t)t * ldx;
        for (int i0 = 0; i0 < half; i0 += ROPE_CHUNK) {
            int n = half - i0 < ROPE_CHUNK ? half - i0 : ROPE_CHUNK;
            for (int i = 0; i < n; i++) {
                float a = p * freq[i0 + i];
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
    IFG_PARALLEL(n_threads) { ifg_rope_part(x, ldx, pos, inv_freq, 0, T, n_heads, head_dim); }
}
