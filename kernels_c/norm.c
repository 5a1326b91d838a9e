/* norm.c — RMSNorm. One row per work item; the sum of squares is accumulated in f64 in every
 * variant (HF does it in f32: this is the "or better"), then, as HF does in f32:
 * r = 1/sqrt(mean + eps), out = (x * r) * w. */
#include "norm.h"
#include "simd.h"

/* The sum of squares in f64 (AVX2's tail in the scalar loop), and out = (x * r) * w: two
 * rounded products, the same bits in a vector lane as in the scalar loop. */
#ifdef IFG_SIMD
static double norm_sumsq(const float *x, int n) {
    ifg_vd lo = ifg_vdzero(), hi = ifg_vdzero();
    int i = 0;
    for (; i + IFG_VW <= n; i += IFG_VW) ifg_vsq_f64(ifg_vload(x + i), &lo, &hi);
    if (IFG_VTAIL_MASKED && i < n) {
        ifg_vsq_f64(ifg_vload_n(x + i, n - i), &lo, &hi);
        i = n;
    }
    double s = ifg_vdsum(lo, hi);
    for (; i < n; i++) s += (double)x[i] * (double)x[i];
    return s;
}

static void norm_scale_row(float *o, const float *x, const float *w, float r, int n) {
    const ifg_vf rv = ifg_vset1(r);
    int i = 0;
    for (; i + IFG_VW <= n; i += IFG_VW) ifg_vstore(o + i, ifg_vmul(ifg_vmul(ifg_vload(x + i), rv), ifg_vload(w + i)));
    if (i < n) ifg_vstore_n(o + i, ifg_vmul(ifg_vmul(ifg_vload_n(x + i, n - i), rv), ifg_vload_n(w + i, n - i)), n - i);
}
#else
static double norm_sumsq_ref(const float *x, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += (double)x[i] * (double)x[i];
    return s;
}

static void norm_scale_row_ref(float *o, const float *x, const float *w, float r, int n) {
    for (int i = 0; i < n; i++) o[i] = (x[i] * r) * w[i];
}
#define norm_sumsq norm_sumsq_ref
#define norm_scale_row norm_scale_row_ref
#endif

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
