/* lora_tiles.h — the tile kernels of the LoRA shrink and expand (lora_tiles.c), as the
 * scheduling and fusion driver (lora.c) calls them. Internal: not part of the cffi ABI. */
#ifndef IFG_LORA_TILES_H
#define IFG_LORA_TILES_H
#include "lora.h"
#include "matmul.h" /* IFG_BF16_DP */

#define LO_KC 512      /* k per shrink unit: each has its own partial sums */
#define LO_VB IFG_LORA_VB
#define LO_PF 2048     /* prefetch distance in bytes along a weight stream */
#define LO_PFL 3       /* its locality hint (3: all cache levels) */
#define LO_ES(DT) ((DT) == IFG_LORA_I8 ? 1 : (DT) == IFG_BF16 || (DT) == IFG_BF16_DP ? 2 : 4) /* bytes per weight */

/* x rounded per 32-block for an int8 shrink (ifg_quantize_x's rounding, or the caller's ifg_xq):
 * row t0 + i's int8 at q[i * ldq + k - k0], its block b's scale and sum of q at d / s[i * ldd + b]. */
struct ifg_lora_xr { const int8_t *q; const float *d; const int32_t *s; int ldq, ldd; };

/* hp[t][i] = Σ_{k0 <= k < k1} x[t][k] A[k][i] for rows [t0, t1); A f32, bf16 or bf16_dp (then
 * x rounded to bf16 and [k0, k1) one k-chunk: k0 even, k1 - k0 <= LO_KC). */
void ifg_lora_tile_shrink(float *hp, int ldh, const float *x, int ldx, const struct ifg_lora *L,
                          int t0, int t1, int k0, int k1);
/* int8 A: hp[t][i] = Σ_b d_t,b · Σ_{k in block b} q_t[k] A[k][i] for rows [t0, t1) and the
 * blocks of [k0, k1) in order, each added with one multiply-add (fmaf in the reference: every
 * ISA gets the same bits). A packed as lora.h says, zero past K, as q is past k1. */
void ifg_lora_tile_shrink8(float *hp, int ldh, const struct ifg_lora_xr *xr, const struct ifg_lora *L,
                           int t0, int t1, int k0, int k1);
/* hb[(t - t0) * ldb + i] = h_scale[i] · Σ_c hp[c][t][i] (nkc chunks in order, chunk stride ttot
 * rows) for rows [t0, t1). */
void ifg_lora_tile_sum(float *hb, int ldb, const float *hp, int ldh, int nkc, size_t ttot,
                       const struct ifg_lora *L, int t0, int t1);
/* A row of summed, scaled h (R floats) rounded in place to what the int8 expand reads. */
void ifg_lora_tile_quant_h(float *row, int R);
/* A row of summed, scaled h (R floats) rounded in place to what the bf16_dp expand reads. */
void ifg_lora_tile_round_h(float *row, int R);
/* y[t][n] += h[t]·Bᵀ (then DoRA's factor) for rows [t0, t1) and the outputs of 16-blocks
 * [nb0, nb1) below N; any Bᵀ dtype (int8: h as ifg_lora_tile_quant_h leaves it, bf16_dp:
 * as ifg_lora_tile_round_h does). */
void ifg_lora_tile_expand(float *y, int ldy, const float *h, int ldh, const struct ifg_lora *L,
                          int t0, int t1, int nb0, int nb1, int N);
#endif
