/* rope.h — rotary position embedding, HF Llama "rotate_half" layout. */
#ifndef IFG_ROPE_H
#define IFG_ROPE_H

#include "core.h"

// cdef-begin
/* In place on x[t*ldx + h*head_dim + i] for T tokens and n_heads heads (head_dim even).
   angle = (float)pos[t] * inv_freq[i] in f32, c = cosf(angle), s = sinf(angle); for i < head_dim/2:
   x[i] = x1*c - x2*s, x[i + head_dim/2] = x2*c + x1*s with x1 = x[i], x2 = x[i + head_dim/2].
   inv_freq has head_dim/2 entries (rope scaling is the caller's business). */
void ifg_rope(float *x, int ldx, const int32_t *pos, const float *inv_freq, int T, int n_heads, int head_dim, int n_threads);
// cdef-end

/* Orphaned work-sharing body (tokens split with omp for): call from inside a parallel region.
   Token t's frequencies are inv_freq + t*freq_stride (0: the same for all). */
void ifg_rope_part(float *x, int ldx, const int32_t *pos, const float *inv_freq, int freq_stride, int T,
                   int n_heads, int head_dim);

#endif
