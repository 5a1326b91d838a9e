/* quantize_q5k.c — f32 rows → q5_k blocks as ggml's reference quantizer does (what llama-quantize
 * writes without an importance matrix), byte for byte infeng.quant.q5_k.quantize_q5_k_ref: the same
 * f32 operations in the same order (sums left to right, round to nearest even). The build has no
 * FP contraction (-std=c11), so a * b + c stays two roundings as in numpy. */
#include "quant_gguf.h"

static inline float q5q_level(float v) { /* round to nearest even, clamped to 0..31 */
    const float r = rintf(v);
    return r < 0.0f ? 0.0f : r > 31.0f ? 31.0f : r;
}

/* Weighted least-squares (scale, min <= 0) of 32 weights over 16 candidate inverse scales; L gets
 * the levels of the best. Returns the scale; *the_min = -min. */
static float q5q_fit(const float *x, const float *w, uint8_t *L, float *the_min) {
    float lo = x[0], hi = x[0], sum_w = w[0], sum_x = w[0] * x[0];
    for (int i = 1; i < 32; i++) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (lo > 0.0f) lo = 0.0f;
    if (hi == lo) {
        memset(L, 0, 32);
        *the_min = -lo;
        return 0.0f;
    }
    const float iscale = 31.0f / (hi - lo);
    float scale = 1.0f / iscale, mn = lo, best = 0.0f;
    for (int i = 0; i < 32; i++) {
        const float l = q5q_level(iscale * (x[i] - lo));
        L[i] = (uint8_t)(int)l;
        const float diff = scale * l + lo - x[i];
        best += w[i] * (diff * diff);
    }
    for (int s = 0; s <= 15; s++) { /* as ggml: a winning candidate's min is the next ones' origin */
        const float isc = (-0.5f + 0.1f * (float)s + 31.0f) / (hi - mn);
        float la[32], sl = 0.0f, sl2 = 0.0f, sxl = 0.0f;
        for (int i = 0; i < 32; i++) {
            la[i] = q5q_level(isc * (x[i] - mn));
            sl += w[i] * la[i];
            sl2 += w[i] * la[i] * la[i];
            sxl += w[i] * la[i] * x[i];
        }
        const float D = sum_w * sl2 - sl * sl;
        if (!(D > 0.0f)) continue;
        float ts = (sum_w * sxl - sum_x * sl) / D, tm = (sl2 * sum_x - sl * sxl) / D;
        if (tm > 0.0f) {
            tm = 0.0f;
            ts = sxl / sl2;
        }
        float cur = 0.0f;
        for (int i = 0; i < 32; i++) {
            const float diff = ts * la[i] + tm - x[i];
            cur += w[i] * (diff * diff);
        }
        if (cur < best) {
            for (int i = 0; i < 32; i++) L[i] = (uint8_t)(int)la[i];
            best = cur;
            scale = ts;
            mn = tm;
        }
    }
    *the_min = -mn;
    return scale;
}

static void q5q_block(uint8_t *y, const float *x) {
    uint8_t L[256], ls[8], lm[8];
    float scales[8], mins[8], max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < 8; j++) {
        const float *xs = x + 32 * j;
        float sum_x2 = 0.0f, w[32];
        for (int l = 0; l < 32; l++) sum_x2 += xs[l] * xs[l];
        const float av = sqrtf(sum_x2 / 32.0f);
        for (int l = 0; l < 32; l++) w[l] = av + fabsf(xs[l]);
        scales[j] = q5q_fit(xs, w, L + 32 * j, &mins[j]);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_s = max_scale > 0.0f ? 63.0f / max_scale : 0.0f, inv_m = max_min > 0.0f ? 63.0f / max_min : 0.0f;
    for (int j = 0; j < 8; j++) {
        const float a = rintf(inv_s * scales[j]), b = rintf(inv_m * mins[j]);
        ls[j] = (uint8_t)(a < 63.0f ? a : 63.0f);
        lm[j] = (uint8_t)(b < 63.0f ? b : 63.0f);
    }
    const uint16_t dh = ifg_f64_to_f16((double)(max_scale / 63.0f)), mh = ifg_f64_to_f16((double)(max_min / 63.0f));
    memset(y, 0, IFG_Q5_K_BLOCK);
    memcpy(y, &dh, 2);
    memcpy(y + 2, &mh, 2);
    for (int j = 0; j < 4; j++) { /* q4_k's packing of 8 six-bit scales and mins */
        y[4 + j] = (uint8_t)((ls[j] & 63) | (ls[j + 4] >> 4) << 6);
        y[8 + j] = (uint8_t)((lm[j] & 63) | (lm[j + 4] >> 4) << 6);
        y[12 + j] = (uint8_t)((ls[j + 4] & 15) | (lm[j + 4] & 15) << 4);
    }
    const float d = ifg_f16_to_f32(dh), dmin = ifg_f16_to_f32(mh);
    for (int j = 0; j < 8; j++) {
        const float dj = d * (float)ls[j];
        if (dj == 0.0f) continue; /* keep the fit's levels */
        const float dm = dmin * (float)lm[j];
        for (int i = 0; i < 32; i++) L[32 * j + i] = (uint8_t)(int)q5q_level((x[32 * j + i] + dm) / dj);
    }
    for (int j = 0; j < 8; j++)
        for (int l = 0; l < 32; l++) {
            const uint8_t q = L[32 * j + l];
            y[16 + l] |= (uint8_t)((q >> 4) << j);
            y[48 + 32 * (j / 2) + l] |= (uint8_t)((q & 15) << (4 * (j & 1)));
        }
}

void ifg_quantize_q5_k(uint8_t *dst, const float *x, int N, int K, int n_threads) {
    const long long nb = (long long)N * (K / 256);
    IFG_PARALLEL(n_threads) {
        IFG_FOR
        for (long long b = 0; b < nb; b++) q5q_block(dst + b * IFG_Q5_K_BLOCK, x + b * 256);
    }
}
