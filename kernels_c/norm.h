/* norm.h — RMSNorm (HF LlamaRMSNorm semantics, f32). */
#ifndef IFG_NORM_H
#define IFG_NORM_H

#include "core.h"

// cdef-begin
/* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w for T contiguous rows of dim; out may alias x.
   The sum of squares is accumulated in f64. */
void ifg_rmsnorm(float *out, const float *x, const float *w, int T, int dim, float eps, int n_threads);
// cdef-end

/* Orphaned work-sharing body (rows split with omp for): call from inside a parallel region. */
void ifg_rmsnorm_part(float *out, const float *x, const float *w, int T, int dim, float eps);

#endif
