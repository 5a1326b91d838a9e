/* lora.h — mixed-adapter LoRA / DoRA on top of a base projection (the SGMV idea, on CPU). */
#ifndef IFG_LORA_H
#define IFG_LORA_H
#include "core.h"

// cdef-begin
/* Adapter weights may also be int8 (lora kernels only): a_dtype / b_dtype = IFG_LORA_I8, a code
 * outside enum ifg_dtype so that no weight dtype can be mistaken for it. */
enum ifg_lora_dtype { IFG_LORA_I8 = 64 };
/* The layouts the kernels stream (infeng.runtime.adapters.pack_lora_a / pack_lora_bt and their
 * _i8 forms make them at load): rank padded with zeros to a multiple of IFG_LORA_RG, Bᵀ in runs of IFG_LORA_VB. */
enum ifg_lora_layout { IFG_LORA_RG = 4, IFG_LORA_VB = 16 };

/* One adapter's low-rank pair for one projection [out=N][in=K], laid out so that each kernel
 * reads one contiguous stream (a rank-16 row of A is a single 4 KiB page: read row by row, 16
 * short streams in 16 pages starve the hardware prefetcher). With N16 = ceil(N/16):
 *   A   transposed, [K][rank]:  A[i][k] at k * rank + i (one k's ranks side by side)
 *   Bᵀ  [N16][rank][16]:        B[n][i] at ((n/16 * rank) + i) * 16 + n%16 (zero past N)
 * bf16 weights whose activations are rounded to bf16 (a_dtype / b_dtype IFG_BF16_DP, matmul.h:
 * the model's bf16_act as for its bf16 matrices) are stored for bf16 dot products (vdpbf16ps)
 * instead, pairs side by side:
 *   A   [K2/2][rank][2]:        A[i][k] at ((k/2) * rank + i) * 2 + k%2   (K2: K rounded up to even)
 *   Bᵀ  [N16][rank/2][16][2]:   B[n][i] at (((n/16) * rank/2 + i/2) * 16 + n%16) * 2 + i%2
 * (zeros past K and N), and x and h go into them rounded to bf16 (nearest even): x per shrink,
 * h per row after its chunks are summed and scaled by h_scale. Each 32-bit lane adds its pair of
 * products one at a time, the odd (upper) one first, as vdpbf16ps does.
 * An int8 Bᵀ is stored for integer dot products (VNNI) instead: unsigned bytes q + 128 (as
 * q8_0x16 stores its weights), 4 consecutive ranks of an output in each 4 bytes,
 *   Bᵀ  [N16][rank/4][16][4]:   B[n][i] at (((n/16) * rank/4 + i/4) * 16 + n%16) * 4 + i%4
 * (zero, i.e. 128, past N), and h goes into it rounded to int8: per row, after its chunks are
 * summed and scaled by h_scale, q = round(h / d) with d = max|h| / 127 (ties away from zero). An
 * int8 A is stored for integer dot products too, 4 consecutive k of a rank in each 4 bytes, k
 * padded with zeros to K32 = K rounded up to 32:
 *   A   [K32/4][rank][4]:       A[i][k] at ((k/4) * rank + i) * 4 + k%4   (bytes q + 128)
 * and x goes into it rounded per row and 32-block as q8_0 activations are (ifg_quantize_x; a last
 * partial block as if zero-padded): h[i] = Σ_b d_b · Σ_{k in b} q_x[k] A[i][k], the inner sums
 * exact in int32, the blocks added in order by multiply-adds.
 * h_scale folds every per-rank factor into the rank-space activations h = x·Aᵀ: the LoRA scale,
 * and for int8 the scale of A's row i times the scale of Bᵀ's row i (int8 values times those
 * scales are the weights). NULL = 1. */
struct ifg_lora {
    const void *a; int a_dtype;   /* A transposed, f32 / bf16 / bf16_dp / int8 */
    const void *b; int b_dtype;   /* packed Bᵀ, f32 / bf16 / bf16_dp / int8 */
    const float *h_scale;         /* [rank] or NULL */
    const float *dora;            /* [N] DoRA factor m / ‖W + s·BA‖ per output row; NULL = plain LoRA */
    int rank;                     /* a multiple of IFG_LORA_RG (padding rows are zero) */
};

/* Rows [seg_start[i], seg_start[i+1]) of the batch use adapter lora[i] (NULL: no adapter).
 * Plain LoRA: y[t] += B·(A·x[t]). DoRA: y[t] = dora ⊙ (y[t] + B·(A·x[t])), so y must then hold
 * the base projection alone. h is scratch of ifg_lora_h_rows(seg_start[n_seg], K) x max_rank
 * floats (max_rank >= every adapter's rank): the shrink's partial sums, one set per k-chunk. The base projection is computed once for all rows elsewhere; this adds only
 * the low-rank part, per segment, with no copy of adapter weights. */
void ifg_lora_apply(float *y, int ldy, const float *x, int ldx, int N, int K,
                    const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                    float *h, int max_rank, int n_threads);
/* Rows of the scratch h for T rows and input width K. */
int ifg_lora_h_rows(int T, int K); /* room for IFG_LORA_SETS projections' partial sums */

/* The base projection and the low-rank part in one pass: y (=|+=) x·Wᵀ (W as ifg_matmul takes
 * it), then each segment's adapter as ifg_lora_apply adds it. Each thread adds the low-rank
 * part to its own rows of the base output right after computing them, one slab of tokens at a
 * time, while that slab of y is still in cache (a separate pass over a prefill's y costs more
 * than the low-rank arithmetic). DoRA with accumulate != 0 scales the projection, not the
 * residual: the projection then goes through tmp ([T][N] floats; unused otherwise). */
void ifg_lora_matmul(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                     int T, int N, int K, int accumulate,
                     const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                     float *h, int max_rank, float *tmp, int n_threads);

/* The adapters of one forward step: segment i (rows seg_start[i]..seg_start[i+1]) uses the
 * adapter whose table is seg[i] ([n_layers * 7] entries, projection order wq wk wv wo w_gate
 * w_up w_down; NULL entry = projection not adapted), or none if seg[i] is NULL. */
struct ifg_lora_batch {
    int n_seg;                                  /* <= 64 */
    const int32_t *seg_start;                   /* [n_seg + 1] */
    const struct ifg_lora *const *const *seg;   /* [n_seg] */
    float *h; int max_rank;                     /* scratch [ifg_lora_h_rows(max_tokens, widest K)][max_rank] */
    float *tmp;                                 /* scratch [max_tokens][dim]: DoRA on wo / w_down */
};
// cdef-end
#define IFG_LORA_MAX_SEG 64

/* The `_part` forms, for every thread of an enclosing parallel region to call together.
 * ifg_lora_matmul_part's xq: x already quantized for a q8_0x16 / q4_0x16 base (quant.h), or NULL. */
struct ifg_xq;
void ifg_lora_apply_part(float *y, int ldy, const float *x, int ldx, int N, int K,
                         const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                         float *h, int max_rank);
void ifg_lora_matmul_part(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                          int T, int N, int K, int accumulate,
                          const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                          float *h, int max_rank, float *tmp, const struct ifg_xq *xq);
/* ifg_lora_matmul_part after phase 1 was done (by ifg_lora_shrink_group_part): the base
 * projection with the expand, and no barrier of the adapters' own. wait = 0: no closing barrier
 * either (as ifg_matmul_part_xq_wait), unless DoRA goes through tmp. */
void ifg_lora_project_part(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                           int T, int N, int K, int accumulate,
                           const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                           float *h, int max_rank, float *tmp, const struct ifg_xq *xq, int wait);
/* Phase 1 of the n <= IFG_LORA_SETS projections that share the input x [T][K] (wq wk wv, w_gate
 * w_up, or one; sel[j]: projection j's adapter per segment) and x rounded into xq (NULL: not),
 * in one worksharing loop and its one barrier: the one the base's rounding of x takes anyway,
 * so adapters add no barrier to a step. Projection j's partial sums go to
 * ifg_lora_h_set(h, ldh, T, K, j). */
#define IFG_LORA_SETS 3
void ifg_lora_shrink_group_part(float *h, int ldh, const float *x, int ldx, int T, int K,
                                const struct ifg_lora *const *const *sel, int n, const int32_t *seg_start, int n_seg,
                                const struct ifg_xq *xq);
float *ifg_lora_h_set(float *h, int ldh, int T, int K, int j);
/* Phase 1, the partial sums of x·Aᵀ per k-chunk for every adapted row (worksharing loop, ends
 * in a barrier). xq: x already rounded per 32-block (ifg_quantize_x_part), which int8 adapters
 * then read instead of rounding their rows of x themselves; or NULL. */
void ifg_lora_shrink_part(float *h, int ldh, const float *x, int ldx, int K, const struct ifg_lora *const *lora,
                          const int32_t *seg_start, int n_seg, const struct ifg_xq *xq);
/* Phase 2 by the calling thread alone: y += h·Bᵀ (then DoRA) for rows [t0, t1) and outputs
 * [n0, n1), n0 a multiple of IFG_LORA_VB; h as phase 1 left it for input width K. */
void ifg_lora_expand_rows(float *y, int ldy, const float *h, int ldh, int N, int K,
                          const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                          int t0, int t1, int n0, int n1);
#endif
