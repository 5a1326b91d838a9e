/* sample.h — next-token choice from one row of logits. */
#ifndef IFG_SAMPLE_H
#define IFG_SAMPLE_H

#include "core.h"

// cdef-begin
/* First index of the maximum of x[0..n) (n >= 1). */
int ifg_argmax(const float *x, int n);
/* Sampling as HF orders it. temperature <= 0 (or top_k == 1) → argmax. Else s = logits / temperature
   (f32); tokens are ordered by s descending, ties by ascending index (= descending probability);
   top_k > 0 keeps the first k of that order; top_p < 1 keeps the smallest prefix whose cumulative
   probability (renormalised after top_k) reaches top_p (at least one token); the draw is the inverse
   CDF at coin in [0,1) over the kept tokens in that order. probs/idx are caller scratch of n
   (probs ends as the unnormalised exp(s - max s)). Expected O(n): selections, no sort. */
int ifg_sample(const float *logits, int n, float temperature, int top_k, float top_p, float coin,
               float *probs, int32_t *idx);
// cdef-end

#endif
