/* matmul.h — dense matrix products against a weight matrix: y = x · Wᵀ.
 * W is row-major [N][K] (one row per output feature, as stored in checkpoints) of dtype
 * f32, bf16 or f16; activations x and outputs y are f32 and all compute is f32. */
#ifndef IFG_MATMUL_H
#define IFG_MATMUL_H

#include "core.h"

// cdef-begin
/* A kernel form of bf16 weights, outside enum ifg_dtype (no file stores it): the same bytes,
 * row-major, multiplied with x rounded to bf16 (nearest even) and f32 sums — AVX-512 BF16's
 * vdpbf16ps, 32 products per instruction (matmul_bf16dp.c); other builds round x and run the
 * bf16 kernels. The loader hands it out for bf16 matrices when asked (docs/kernels.md). */
enum ifg_matmul_dtype { IFG_BF16_DP = 48 };
/* y[t*ldy + n] (= or +=) sum_k x[t*ldx + k] * W[n*K + k], for t < T, n < N.
 * W is row-major [N][K] of dtype wtype (IFG_F32, IFG_BF16, IFG_F16, IFG_BF16_DP); x and y are f32.
 * IFG_Q8_0 / IFG_Q4_0 / IFG_Q5_0 weights (K a multiple of 32) go to the integer kernels of quant.h.
 * accumulate != 0 adds into y (used for residual connections). T == 1 is the decode GEMV,
 * T > 1 the prefill GEMM (cache-blocked). Compute is f32 (f32 accumulation). */
void ifg_matmul(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                int T, int N, int K, int accumulate, int n_threads);
// cdef-end

/* The work of ifg_matmul, for every thread of an enclosing parallel region to call together
 * (orphaned `omp for`, schedule(static); ends with the loop's implicit barrier). Threads
 * split N into contiguous row ranges. Outputs are bitwise the same for a given thread count
 * (in fact for any thread count: the summation order of each output does not depend on
 * which thread or tile computes it). y must not overlap x or W. Allocates nothing; the GEMM
 * (T > 1) uses a fixed stack buffer of < 25 KiB per thread for a tile of x. */
void ifg_matmul_part(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                     int T, int N, int K, int accumulate);

/* Rows [r0, r1) of that product for T tokens, by the calling thread alone (what one thread of
 * ifg_matmul_part computes). r0 must be a multiple of ifg_matmul_row_align(wtype), and so must
 * r1 unless it is N. Each output comes out bit for bit as ifg_matmul_part computes it, for any
 * T in either (f32 / bf16 / f16 / bf16_dp: the GEMV sums in the GEMM's order). */
void ifg_matmul_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                     int T, int r0, int r1, int K, int accumulate);
/* The same with x already quantized for the products that quantize it (q8_0x16 / q4_0x16: quant.h's
 * struct ifg_xq; NULL: each call quantizes x itself; other formats ignore it). */
struct ifg_xq;
void ifg_matmul_part_xq(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                        int T, int N, int K, int accumulate, const struct ifg_xq *xq);
void ifg_matmul_rows_xq(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                        int T, int r0, int r1, int K, int accumulate, const struct ifg_xq *xq);
/* The same; wait == 0 leaves out the closing barrier: for a product whose output nothing reads
 * before the next barrier (the forward pass's wq and wk ahead of wv, w_gate ahead of w_up). */
void ifg_matmul_part_xq_wait(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                             int T, int N, int K, int accumulate, const struct ifg_xq *xq, int wait);
int ifg_matmul_row_align(int wtype);
/* IFG_BF16_DP rows [r0, r1) on AVX-512 BF16 (matmul_bf16dp.c; as ifg_matmul_rows). */
void ifg_mm_bf16dp_rows(float *y, int ldy, const float *x, int ldx, const void *w, int T, int r0, int r1, int K,
                        int accumulate);
int ifg_mm_bf16dp_token_block(void);
/* Tokens per block of the GEMM of wtype: calls over token ranges that are multiples of it
 * stream the weights no more often than one call over all tokens. */
int ifg_matmul_token_block(int wtype);

#endif
