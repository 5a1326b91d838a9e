/* bandwidth.c — read-bandwidth probe (see bandwidth.h). */
#include "bandwidth.h"
#include "simd.h"

/* Four independent vector accumulators (enough loads in flight to saturate a core's memory
 * path), their lanes added into f64 in order. */
#ifdef IFG_SIMD
static double sum_range(const float *x, size_t lo, size_t hi) {
    size_t i = lo;
    ifg_vf a0 = ifg_vzero(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 4 * IFG_VW <= hi; i += 4 * IFG_VW) {
        a0 = ifg_vadd(a0, ifg_vload(x + i));
        a1 = ifg_vadd(a1, ifg_vload(x + i + IFG_VW));
        a2 = ifg_vadd(a2, ifg_vload(x + i + 2 * IFG_VW));
        a3 = ifg_vadd(a3, ifg_vload(x + i + 3 * IFG_VW));
    }
    float lanes[IFG_VW];
    ifg_vstore(lanes, ifg_vadd(ifg_vadd(a0, a1), ifg_vadd(a2, a3)));
    double total = 0.0;
    for (int j = 0; j < IFG_VW; j++) total += lanes[j];
    for (; i < hi; i++) total += x[i];
    return total;
}
#else
static double sum_range_ref(const float *x, size_t lo, size_t hi) {
    size_t i = lo;
    float a[8] = {0};
    for (; i + 8 <= hi; i += 8)
        for (int j = 0; j < 8; j++) a[j] += x[i + j];
    double total = 0.0;
    for (int j = 0; j < 8; j++) total += a[j];
    for (; i < hi; i++) total += x[i];
    return total;
}
#define sum_range sum_range_ref
#endif

#define IFG_BW_MAX_THREADS 256

double ifg_read_sum(const float *x, size_t n, int n_threads) {
    double parts[IFG_BW_MAX_THREADS] = {0};   /* one per thread, summed in order: deterministic */
    int used = 1;
    if (n_threads > IFG_BW_MAX_THREADS) n_threads = IFG_BW_MAX_THREADS;
    IFG_PARALLEL(n_threads) {
        int nt = 1, id = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        id = omp_get_thread_num();
#endif
        if (nt > IFG_BW_MAX_THREADS) nt = IFG_BW_MAX_THREADS;
        if (id == 0) used = nt;
        /* contiguous chunks, cut at multiples of 64 floats (one 256-byte run) */
        size_t per = ((n + 63) / 64 + nt - 1) / nt * 64;
        size_t lo = per * id, hi = lo + per;
        if (lo > n) lo = n;
        if (hi > n) hi = n;
        if (id < nt) parts[id] = sum_range(x, lo, hi);
    }
    double total = 0.0;
    for (int i = 0; i < used; i++) total += parts[i];
    return total;
}
