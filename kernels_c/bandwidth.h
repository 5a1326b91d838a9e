/* bandwidth.h — a STREAM-like read test: how fast can the threads stream memory? */
#ifndef IFG_BANDWIDTH_H
#define IFG_BANDWIDTH_H

#include "core.h"

// cdef-begin
/* The sum of x[0..n) (f32 loads, several independent f32 accumulators per thread, partial
 * sums combined in f64), read once front to back with the threads splitting it into contiguous
 * chunks. Used to time read bandwidth over a buffer much larger than the caches: the result is
 * returned so the reads cannot be optimised away. Allocates nothing. */
double ifg_read_sum(const float *x, size_t n, int n_threads);
// cdef-end

#endif
