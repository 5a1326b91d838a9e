/* quantize_q6k.c — f32 rows → q6_k blocks as ggml's reference quantizer does (what llama-quantize
 * writes without an importance matrix), byte for byte infeng.quant.q6_k.quantize_q6_k_ref: the same
 * f32 operations in the same order (sums left to right, round to nearest even, x / d divided).
 * The build has no FP contraction (-std=c11), so a * b + c stays two roundings as in numpy. */
#include "quant_gguf.h"

#define Q6Q_EPS 1e-15f

static inline float q6q_rint(float v) { return rintf(v); } /* nearest, ties to even (default mode) */
static inline float q6q_clamp(float v, float lo, float hi) { return v < lo ? lo : v > hi ? hi : v; }

/* Least-squares scale of 16 weights, weighted by x², over 19 candidate inverse scales; L gets the
 * levels (0..63) of the best. Returns the scale (0 for an all-zero group, whose L is 0). */
static float q6q_fit(const float *x, uint8_t *L) {
    float amax = 0.0f, mx = 0.0f;
    for (int i = 0; i < 16; i++)
        if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); mx = x[i]; }
    if (amax < Q6Q_EPS) {
        memset(L, 0, 16);
        return 0.0f;
    }
    float lv[16], sumlx = 0.0f, suml2 = 0.0f;
    float iscale = -32.0f / mx;
    for (int i = 0; i < 16; i++) {
        lv[i] = q6q_clamp(q6q_rint(iscale * x[i]), -32.0f, 31.0f);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * lv[i];
        suml2 += w * lv[i] * lv[i];
    }
    for (int i = 0; i < 16; i++) L[i] = (uint8_t)(int)(lv[i] + 32.0f);
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f, best = scale * sumlx;
    for (int s = -9; s <= 9; s++) {
        if (s == 0) continue;
        iscale = -(32.0f + 0.1f * (float)s) / mx;
        float slx = 0.0f, sl2 = 0.0f;
        for (int i = 0; i < 16; i++) {
            lv[i] = q6q_clamp(q6q_rint(iscale * x[i]), -32.0f, 31.0f);
            const float w = x[i] * x[i];
            slx += w * x[i] * lv[i];
            sl2 += w * lv[i] * lv[i];
        }
        if (sl2 > 0.0f && slx * slx > best * sl2) {
            for (int i = 0; i < 16; i++) L[i] = (uint8_t)(int)(lv[i] + 32.0f);
            scale = slx / sl2;
            best = scale * slx;
        }
    }
    return scale;
}

static void q6q_block(uint8_t *y, const float *x) {
    uint8_t L[256];
    float scales[16], max_scale = 0.0f, max_abs = 0.0f;
    for (int s = 0; s < 16; s++) {
        scales[s] = q6q_fit(x + 16 * s, L + 16 * s);
        if (fabsf(scales[s]) > max_abs) { max_abs = fabsf(scales[s]); max_scale = scales[s]; }
    }
    memset(y, 0, IFG_Q6_K_BLOCK);
    if (max_abs < Q6Q_EPS) return; /* all zero, d = 0 */
    const float iscale = -128.0f / max_scale;
    const uint16_t dh = ifg_f64_to_f16((double)(1.0f / iscale));
    memcpy(y + 208, &dh, 2);
    const float d = ifg_f16_to_f32(dh);
    for (int s = 0; s < 16; s++) {
        const float r = q6q_rint(iscale * scales[s]);
        const int8_t sc = (int8_t)(int)(r < 127.0f ? r : 127.0f);
        y[192 + s] = (uint8_t)sc;
        const float dj = d * (float)sc;
        if (dj == 0.0f) continue; /* keep the fit's levels */
        for (int i = 0; i < 16; i++)
            L[16 * s + i] = (uint8_t)(int)(q6q_clamp(q6q_rint(x[16 * s + i] / dj), -32.0f, 31.0f) + 32.0f);
    }
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *q = L + 128 * h + l; /* elements l, 32 + l, 64 + l, 96 + l of the half */
            y[64 * h + l] = (uint8_t)((q[0] & 15) | (q[64] & 15) << 4);
            y[64 * h + 32 + l] = (uint8_t)((q[32] & 15) | (q[96] & 15) << 4);
            y[128 + 32 * h + l] = (uint8_t)(q[0] >> 4 | (q[32] >> 4) << 2 | (q[64] >> 4) << 4 | (q[96] >> 4) << 6);
        }
}

void ifg_quantize_q6_k(uint8_t *dst, const float *x, int N, int K, int n_threads) {
    const long long nb = (long long)N * (K / 256);
    IFG_PARALLEL(n_threads) {
        IFG_FOR
        for (long long b = 0; b < nb; b++) q6q_block(dst + b * IFG_Q6_K_BLOCK, x + b * 256);
    }
}
