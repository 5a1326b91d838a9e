/* bandwidth.c — read-bandwidth probe (see bandwidth.h). */
#include "bandwidth.h"

static double sum_range(const float *x, size_t lo, size_t hi) {
    size_t i = lo;
    double total = 0.0;
#if defined(IFG_AVX512)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 64 <= hi; i += 64) {
        a0 = _mm512_add_ps(a0, _mm512_loadu_ps(x + i));
        a1 = _mm512_add_ps(a1, _mm512_loadu_ps(x + i + 16));
        a2 = _mm512_add_ps(a2, _mm512_loadu_ps(x + i + 32));
        a3 = _mm512_add_ps(a3, _mm512_loadu_ps(x + i + 48));
    }
    total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(IFG_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= hi; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + i));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(x + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps(x + i + 24));
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    for (int j = 0; j < 8; j++) total += lanes[j];
#else
    float a[8] = {0};
    for (; i + 8 <= hi; i += 8)
        for (int j = 0; j < 8; j++) a[j] += x[i + j];
    for (int j = 0; j < 8; j++) total += a[j];
#endif
    for (; i < hi; i++) total += x[i];
    return total;
}

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
