/* quant.h — matrix products against block-quantized weights (GGUF-compatible q8_0 / q4_0 / q5_0).
 *
 * W is [N][K] stored as N rows of K/32 blocks (q8_0: fp16 d + 32 int8, 34 bytes; q4_0: fp16 d +
 * 16 bytes of nibbles, 18 bytes; q5_0: fp16 d + 4 bytes qh (bit j = bit 4 of element j) + 16
 * bytes of low nibbles as q4_0's, 22 bytes; see infeng/quant). K must be a multiple of 32.
 * x is quantized per token and 32-block to int8 with an f32 scale (d = max|x|/127,
 * q = roundf(x * (1/d))), then each block's dot product is done in integers and scaled by
 * d_w * d_x in f32. Reached through ifg_matmul / ifg_matmul_part (wtype IFG_Q8_0 / IFG_Q4_0 /
 * IFG_Q5_0).
 * A loaded model runs matrices with 16k rows on the row-interleaved copies (IFG_Q8_0X16 /
 * IFG_Q4_0X16, quant_x16.c, layout below): the plain kernels here serve the other matrices. */
#ifndef IFG_QUANT_H
#define IFG_QUANT_H

#include "core.h"
#include "simd.h"

#define IFG_QK 32

/* Rows [r0, r1) of y (=|+=) x · Wᵀ for a quantized W. Allocates nothing: the quantized x
 * lives in a fixed stack buffer of ~36 KiB per thread (a block of 16 tokens × 2048 k; longer
 * K is done in 2048-wide chunks whose partial sums go through y), so there is no limit on K. */
void ifg_qmm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                  int T, int r0, int r1, int K, int accumulate);

/* Bytes of one 32-block, and of one row of n weights (n a multiple of 32). */
static inline size_t ifg_quant_block_bytes(int dtype) {
    return dtype == IFG_Q8_0 ? 34u : dtype == IFG_Q5_0 ? 22u : 18u;
}
static inline size_t ifg_quant_row_bytes(int dtype, int n) {
    return (size_t)(n / IFG_QK) * ifg_quant_block_bytes(dtype);
}
/* o[0..n) = the dequantized row (q * d, in f32: exactly what infeng.quant.dequantize gives). */
void ifg_dequant_row(float *o, const uint8_t *row, int dtype, int n);

static inline int ifg_is_quant(int dtype) { return dtype == IFG_Q8_0 || dtype == IFG_Q4_0 || dtype == IFG_Q5_0; }


/* Row-interleaved layouts (IFG_Q8_0X16 / IFG_Q4_0X16; N a multiple of 16, built at load time by
 * infeng.quant.interleave from the GGUF-order blocks). W is N/16 groups of 16 rows; a group is
 * K/32 group-blocks, one per 32-block of k, each:
 *   32 bytes: the 16 rows' fp16 scales d (row r at bytes 2r, 2r+1);
 *   q8_0x16: 8 × 64 bytes; chunk c holds for row r (bytes 4r..4r+3) u = w + 128 (unsigned) of
 *            k = 4c..4c+3 of the block  (544 bytes = 16 × 34);
 *   q4_0x16: 4 × 64 bytes; chunk v holds for row r byte 4r + j: low nibble q of k = 8v + j,
 *            high nibble q of k = 8v + 4 + j, q = w + 8 as in q4_0  (288 bytes = 16 × 18).
 * So one 64-byte load is 16 rows × 4 k (q4_0: two of them), which vpdpbusd with x's 4 int8 of
 * those k broadcast advances at once. */
// cdef-begin
/* Quantize x[t..t+tt)[k0..k1) per 32-block: q[i*ldq + k - k0] int8, d[i*ldd + b] its scale,
 * s[i*ldd + b] the block's sum of q (every ISA
 * quantizes x bit for bit alike, as infeng.quant.quantize_activations). */
void ifg_quantize_x(int8_t *q, float *d, int32_t *s, const float *x, int ldx, int t, int tt,
                    int k0, int k1, int ldq, int ldd);
/* Repack a GGUF-order q8_0 / q4_0 / q4_k / q4_1 / q5_1 / q6_k / q5_k matrix src (N rows of K/32 or K/256 blocks,
 * N a multiple of 16) into its interleaved layout dst (the same number of bytes; q4_k's is in
 * quant_k.h, q4_1's, q5_1's, q6_k's and q5_k's in quant_gguf.h); groups of rows split over threads. The numpy reference is
 * infeng.quant.interleave.interleave. */
void ifg_quant_interleave(void *dst, const void *src, int dtype, int N, int K, int n_threads);
/* x quantized per token and 32-block once (ifg_quantize_x's rounding), for several GEMMs over
 * the same input and every thread to share: row t's k-th int8 at q[t*ldq + k], block b's scale
 * and sum of q at d / s[t*ldd + b]. */
struct ifg_xq {
    int8_t *q; float *d; int32_t *s;
    int ldq, ldd;
};
/* ifg_matmul with x already quantized into xq (the products that take it read it instead of
 * rounding x again; the others ignore it): what forward.c's projections do. */
void ifg_matmul_xq(float *y, int ldy, const float *x, int ldx, const void *w, int wtype, int T, int N, int K,
                   int accumulate, const struct ifg_xq *xq, int n_threads);
// cdef-end
static inline int ifg_is_qx16(int dtype) { return dtype == IFG_Q8_0X16 || dtype == IFG_Q4_0X16; }
/* Rows [0, T) of x over K (a multiple of 32) into xq (worksharing loop, ends in a barrier). */
void ifg_quantize_x_part(const struct ifg_xq *xq, const float *x, int ldx, int T, int K);
/* Rows [r0, r1) (multiples of 16) of y (=|+=) x · Wᵀ for an interleaved W; allocates nothing
 * (a ~90 KiB stack buffer per thread holds a tile of quantized x). epi (NULL: none) is called for
 * every group pair's rows of every token tile once they are final. xq: x already quantized (or
 * NULL: each call quantizes x into its own stack tile). */
void ifg_qmm_x16_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                      int T, int r0, int r1, int K, int accumulate, const struct ifg_mm_epilogue *epi,
                      const struct ifg_xq *xq);

#endif
