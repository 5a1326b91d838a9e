/* quantize_k.c — f32 matrix → q4_k blocks (GGUF Q4_K), the C twin of the numpy quantizer in
 * infeng/quant/q4_k.py (quantize_q4_k_ref): the same algorithm in double precision with the
 * same operations in the same order, so that the bytes are identical (tests/test_quant_k.py).
 *
 * What "the same order" takes:
 *  - a sum over a 32-weight sub-block is numpy's pairwise sum for 32 elements: 8 partial sums
 *    (lane j takes elements j, j+8, j+16, j+24), then ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)),
 *    added to the reduction's identity 0.0;
 *  - a max over the 8 sub-blocks keeps the later of two equal values (numpy's result for
 *    mixed +0.0 / -0.0, which decides the sign bit of an fp16 d or dmin of 0);
 *  - d and dmin are rounded from double straight to fp16 (as numpy's astype does: no detour
 *    through f32, which could round twice);
 *  - no fused multiply-adds: the library is built with -std=c11, where GCC does not contract.
 * The element-wise loops are written over whole sub-blocks so the compiler can vectorize them;
 * element-wise double operations give the same bits at any vector width. */
#include "quant_k.h"

#define QZ_SUB 32
#define QZ_STEPS 16 /* candidate inverse scales (14 + 0.15 step) / span, step = 0..16 */

static inline double qz_sum32(const double *a) {
    double r[8];
    for (int j = 0; j < 8; j++) r[j] = a[j];
    for (int i = 8; i < QZ_SUB; i += 8)
        for (int j = 0; j < 8; j++) r[j] += a[i + j];
    return 0.0 + (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])));
}

static inline double qz_clip(double v, double hi) { return v < 0.0 ? 0.0 : v > hi ? hi : v; }

/* numpy's max over n values: a later equal value replaces the running one. */
static inline double qz_max(const double *a, int n) {
    double m = a[0];
    for (int i = 1; i < n; i++) m = m > a[i] ? m : a[i];
    return m;
}

/* The weights of the least-squares fit of one sub-block (infeng.quant.q4_k._fit_weights). */
static void qz_fit_weights(double *w, const double *x, const double *imp) {
    double xx[QZ_SUB];
    for (int j = 0; j < QZ_SUB; j++) xx[j] = x[j] * x[j];
    const double mean = qz_sum32(xx) / 32.0;
    if (!imp) {
        const double av = sqrt(mean);
        for (int j = 0; j < QZ_SUB; j++) w[j] = av + fabs(x[j]);
    } else {
        for (int j = 0; j < QZ_SUB; j++) w[j] = imp[j] * sqrt(mean + xx[j]);
    }
}

/* The best (scale >= 0, offset <= 0) of one sub-block (infeng.quant.q4_k._fit_sub_blocks). */
static void qz_fit_sub_block(const double *x, const double *w, double *scale, double *offset) {
    double xmin = x[0], xmax = x[0];
    for (int j = 1; j < QZ_SUB; j++) {
        xmin = x[j] < xmin ? x[j] : xmin;
        xmax = x[j] > xmax ? x[j] : xmax;
    }
    const double lo = xmin < 0.0 ? xmin : 0.0;
    double span = xmax - lo;
    const int flat = span <= 0.0;
    if (flat) span = 1.0;
    double q[QZ_SUB], a[QZ_SUB], b[QZ_SUB], c[QZ_SUB];
    for (int j = 0; j < QZ_SUB; j++) a[j] = w[j] * x[j];
    const double sw = qz_sum32(w), swx = qz_sum32(a);
    double bs = flat ? 0.0 : span / 15.0, bo = lo;
    for (int j = 0; j < QZ_SUB; j++) {
        q[j] = qz_clip(rint((x[j] - lo) / span * 15.0), 15.0);
        const double r = bs * q[j] + lo - x[j];
        a[j] = w[j] * (r * r);
    }
    double be = qz_sum32(a);
    for (int step = 0; step <= QZ_STEPS; step++) {
        const double iscale = (14.0 + 0.15 * step) / span;
        for (int j = 0; j < QZ_SUB; j++) {
            q[j] = qz_clip(rint((x[j] - lo) * iscale), 15.0);
            a[j] = w[j] * q[j];
            b[j] = a[j] * q[j];
            c[j] = a[j] * x[j];
        }
        const double swq = qz_sum32(a), swqq = qz_sum32(b), swqx = qz_sum32(c);
        const double det = sw * swqq - swq * swq;
        if (!(det > 0.0)) continue; /* not a candidate (numpy computes it and drops it) */
        double s = (sw * swqx - swq * swx) / det, o = (swqq * swx - swq * swqx) / det;
        if (o > 0.0) { /* the format needs o <= 0: refit the scale alone with o = 0 */
            s = swqq > 0.0 ? swqx / swqq : 0.0;
            o = 0.0;
        }
        if (!(s >= 0.0)) continue;
        for (int j = 0; j < QZ_SUB; j++) {
            const double r = s * q[j] + o - x[j];
            a[j] = w[j] * (r * r);
        }
        const double e = qz_sum32(a);
        if (e < be) {
            bs = s;
            bo = o;
            be = e;
        }
    }
    *scale = bs;
    *offset = bo;
}

/* One super-block: 256 weights x (f32), importances imp (NULL or 256) → 144 bytes. */
static void qz_block(uint8_t *out, const float *xf, const double *imp) {
    double x[IFG_QK_K], w[QZ_SUB], scale[8], mins[8];
    for (int i = 0; i < IFG_QK_K; i++) x[i] = (double)xf[i];
    for (int s = 0; s < 8; s++) {
        double off;
        qz_fit_weights(w, x + QZ_SUB * s, imp ? imp + QZ_SUB * s : NULL);
        qz_fit_sub_block(x + QZ_SUB * s, w, &scale[s], &off);
        mins[s] = -off;
    }
    /* 6-bit scales and mins against the super-block maxima, as stored (fp16) */
    const uint16_t dh = ifg_f64_to_f16(qz_max(scale, 8) / 63.0), mh = ifg_f64_to_f16(qz_max(mins, 8) / 63.0);
    const double df = (double)ifg_f16_to_f32(dh), dmf = (double)ifg_f16_to_f32(mh);
    uint8_t sc[8], mq[8];
    for (int s = 0; s < 8; s++) {
        sc[s] = (uint8_t)(df > 0.0 ? qz_clip(rint(scale[s] / df), 63.0) : 0.0);
        mq[s] = (uint8_t)(dmf > 0.0 ? qz_clip(rint(mins[s] / dmf), 63.0) : 0.0);
    }
    memcpy(out, &dh, 2);
    memcpy(out + 2, &mh, 2);
    for (int j = 0; j < 4; j++) { /* the 12 scale bytes (layout in infeng/quant/q4_k.py) */
        out[4 + j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        out[8 + j] = (uint8_t)((mq[j] & 63) | ((mq[j + 4] >> 4) << 6));
        out[12 + j] = (uint8_t)((sc[j + 4] & 15) | ((mq[j + 4] & 15) << 4));
    }
    /* levels with the stored (quantized) scale and min */
    uint8_t q[IFG_QK_K];
    for (int s = 0; s < 8; s++) {
        const double step = df * (double)sc[s], base = dmf * (double)mq[s];
        const double inv = step > 0.0 ? 1.0 / step : 0.0;
        for (int j = 0; j < QZ_SUB; j++)
            q[QZ_SUB * s + j] = (uint8_t)qz_clip(rint((x[QZ_SUB * s + j] + base) * inv), 15.0);
    }
    for (int c = 0; c < 4; c++) /* byte 16 + 32c + l: element 64c + l low, 64c + 32 + l high */
        for (int l = 0; l < 32; l++) out[16 + 32 * c + l] = (uint8_t)(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
}

void ifg_quantize_q4_k(uint8_t *dst, const float *x, const double *importance, int N, int K, int n_threads) {
    const int nsb = K / IFG_QK_K;
    const long long total = (long long)N * nsb;
    IFG_PARALLEL(n_threads) {
        IFG_FOR
        for (long long i = 0; i < total; i++) { /* one super-block each: static split, any order */
            const long long r = i / nsb, b = i % nsb;
            qz_block(dst + (size_t)i * IFG_Q4_K_BLOCK, x + (size_t)r * K + (size_t)b * IFG_QK_K,
                     importance ? importance + (size_t)b * IFG_QK_K : NULL);
        }
    }
}
