/* embed.h — token embedding lookup. */
#ifndef IFG_EMBED_H
#define IFG_EMBED_H

#include "core.h"

// cdef-begin
/* out[t][:] = table[tokens[t]][:] converted to f32; table is [vocab][dim] of dtype (IFG_F32/BF16/F16,
   or IFG_Q8_0/Q4_0/Q5_0 with dim a multiple of 32, IFG_Q4_K with dim a multiple of 256, IFG_FP8,
   IFG_Q4_1/Q5_1 with dim a multiple of 32).
   Token ids are validated by the caller. */
void ifg_embed(float *out, const void *table, int dtype, const int32_t *tokens, int T, int dim, int n_threads);
// cdef-end

/* Orphaned work-sharing body (tokens split with omp for): call from inside a parallel region. */
void ifg_embed_part(float *out, const void *table, int dtype, const int32_t *tokens, int T, int dim);

#endif
