/* quant.h — matrix products against block-quantized weights (GGUF-compatible q8_0 / q4_0).
 *
 * W is [N][K] stored as N rows of K/32 blocks (q8_0: fp16 d + 32 int8, 34 bytes; q4_0: fp16 d +
 * 16 bytes of nibbles, 18 bytes; see infeng/quant). K must be a multiple of 32.
 * x is quantized per token and 32-block to int8 with an f32 scale (d = max|x|/127,
 * q = roundf(x * (1/d))), then each block's dot product is done in integers and scaled by
 * d_w * d_x in f32. Reached through ifg_matmul / ifg_matmul_part (wtype IFG_Q8_0 / IFG_Q4_0). */
#ifndef IFG_QUANT_H
#define IFG_QUANT_H

#include "core.h"

#define IFG_QK 32

/* Rows [r0, r1) of y (=|+=) x · Wᵀ for a quantized W. Allocates nothing: the quantized x
 * lives in a fixed stack buffer of ~36 KiB per thread (a block of 16 tokens × 2048 k; longer
 * K is done in 2048-wide chunks whose partial sums go through y), so there is no limit on K. */
void ifg_qmm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                  int T, int r0, int r1, int K, int accumulate);

/* Bytes of one row of n weights (n a multiple of 32). */
static inline size_t ifg_quant_row_bytes(int dtype, int n) {
    return (size_t)(n / IFG_QK) * (dtype == IFG_Q8_0 ? 34u : 18u);
}
/* o[0..n) = the dequantized row (q * d, in f32: exactly what infeng.quant.dequantize gives). */
void ifg_dequant_row(float *o, const uint8_t *row, int dtype, int n);

static inline int ifg_is_quant(int dtype) { return dtype == IFG_Q8_0 || dtype == IFG_Q4_0; }

#endif
