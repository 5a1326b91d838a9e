/* act.c — SwiGLU's elementwise half: gate = silu(gate) * up.
 * SIMD paths use the polynomial exp of act.h (~1.5e-7 relative); scalar uses libm expf. */
#include "act.h"

#define ACT_CHUNK 4096 /* elements per work item (a multiple of every vector width) */

#ifdef IFG_SIMD
static void act_silu_mul_span(float *g, const float *u, size_t n) {
    const ifg_vf one = ifg_vset1(1.0f);
    size_t i = 0;
    for (; i + IFG_VW <= n; i += IFG_VW) {
        const ifg_vf x = ifg_vload(g + i), e = ifg_vexp(ifg_vsub(ifg_vzero(), x));
        ifg_vstore(g + i, ifg_vmul(ifg_vdiv(x, ifg_vadd(one, e)), ifg_vload(u + i)));
    }
    if (i < n) {
        const int r = (int)(n - i);
        const ifg_vf x = ifg_vload_n(g + i, r), e = ifg_vexp(ifg_vsub(ifg_vzero(), x));
        ifg_vstore_n(g + i, ifg_vmul(ifg_vdiv(x, ifg_vadd(one, e)), ifg_vload_n(u + i, r)), r);
    }
}
#else
static void act_silu_mul_span_ref(float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
#define act_silu_mul_span act_silu_mul_span_ref
#endif

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
