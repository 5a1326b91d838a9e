/* quant_gguf.h — matrix products against the GGUF block types that have a minimum or 16-weight
 * sub-block scales: q4_1 / q5_1 (quant_affine.c), q6_k (quant_q6k.c). Layouts:
 * infeng/quant/affine.py, infeng/quant/q6_k.py.
 *
 * q4_1 / q5_1: W is [N][K], K a multiple of 32, each row K/32 blocks: fp16 d, fp16 m, (q5_1: 4
 *   bytes qh, bit j = bit 4 of element j), 16 bytes of low nibbles (element j low, j + 16 high
 *   nibble of byte j). value = q * d + m with q unsigned (0..15 / 0..31). x is quantized per
 *   token and 32-block to int8 as for q8_0 (ifg_quantize_x: d_x, q_x and the block sum s_x), and
 *   each block adds (d * d_x) * sum(q * q_x) + m * (d_x * s_x), the dot product in integers.
 * q6_k: W is [N][K], K a multiple of 256, each row K/256 blocks of 210 bytes (6-bit levels q,
 *   an int8 scale per 16 weights, fp16 d; value = d * sc * (q - 32)). x is quantized as above;
 *   per 32-block, the integer dot products of 4 consecutive weights with x start from
 *   -32 * (the sum of those 4 q_x), so that they sum (q - 32) * q_x, and each 16-weight half is
 *   scaled by d * sc * d_x.
 * q5_k: W is [N][K], K a multiple of 256, each row K/256 blocks of 176 bytes (5-bit levels q, a
 *   6-bit scale and min per 32 weights as q4_k's, fp16 d and dmin; value = d*sc*q - dmin*m). As
 *   q4_k: per 32-block (d*sc) * d_x * sum(q * q_x) - (dmin*m) * (d_x * s_x).
 * Reached through ifg_matmul / ifg_matmul_part and ifg_embed (wtype IFG_Q4_1 / IFG_Q5_1 /
 * IFG_Q6_K / IFG_Q5_K). */
#ifndef IFG_QUANT_GGUF_H
#define IFG_QUANT_GGUF_H

#include "core.h"

struct ifg_xq;

static inline int ifg_is_quant_affine(int dtype) { return dtype == IFG_Q4_1 || dtype == IFG_Q5_1; }
static inline int ifg_is_quant_gguf(int dtype) {
    return ifg_is_quant_affine(dtype) || dtype == IFG_Q6_K || dtype == IFG_Q5_K || dtype == IFG_Q4_1X16 ||
           dtype == IFG_Q6_KX16 || dtype == IFG_Q5_KX16 || dtype == IFG_Q5_1X16;
}
/* The row-interleaved ones (their row ranges go in whole groups of 16). */
static inline int ifg_is_quant_gguf_x16(int dtype) {
    return dtype == IFG_Q4_1X16 || dtype == IFG_Q6_KX16 || dtype == IFG_Q5_KX16 || dtype == IFG_Q5_1X16;
}
/* The ones whose products take x quantized once by the caller (ifg_xq; forward.c shares it
 * between the projections of one input). */
static inline int ifg_quant_gguf_takes_xq(int dtype) {
    return ifg_is_quant_affine(dtype) || ifg_is_quant_gguf_x16(dtype);
}

#define IFG_Q6_K_BLOCK 210
#define IFG_Q5_K_BLOCK 176
/* Bytes of one row of n weights (n a multiple of the type's block). */
static inline size_t ifg_quant_gguf_row_bytes(int dtype, int n) {
    if (dtype == IFG_Q6_K) return (size_t)(n / 256) * IFG_Q6_K_BLOCK;
    if (dtype == IFG_Q5_K) return (size_t)(n / 256) * IFG_Q5_K_BLOCK;
    return (size_t)(n / 32) * (dtype == IFG_Q4_1 ? 20u : 24u);
}

// cdef-begin
/* o[0..n) = the dequantized row of a q4_1 / q5_1 / q6_k / q5_k matrix, in f32 exactly as
 * infeng.quant.dequantize gives it (q4_1 / q5_1: q * d + m, not fused; q6_k: (d * sc) * (q - 32);
 * q5_k: (d * sc) * q - dmin * m). */
void ifg_qg_dequant_row(float *o, const uint8_t *row, int dtype, int n);
/* dst (N rows of K/256 q6_k blocks) = x (f32 [N][K], K a multiple of 256) quantized as ggml's
 * quantize_row_q6_K_ref, byte for byte infeng.quant.q6_k.quantize_q6_k_ref (quantize_q6k.c).
 * Rows split over threads; allocates nothing. */
void ifg_quantize_q6_k(uint8_t *dst, const float *x, int N, int K, int n_threads);
/* The same for q5_k (ggml's quantize_row_q5_K_ref; infeng.quant.q5_k.quantize_q5_k_ref; quantize_q5k.c). */
void ifg_quantize_q5_k(uint8_t *dst, const float *x, int N, int K, int n_threads);
// cdef-end

/* Rows [r0, r1) of y (=|+=) x · Wᵀ. Allocates nothing: x is quantized into a fixed stack buffer
 * of ~40 KiB per thread (16 tokens × 2048 k at a time; partial sums of longer K go through y),
 * unless xq (x already quantized for all tokens, quant.h) is given. Each output's summation
 * order depends only on K: results are bitwise the same for any thread count. */
void ifg_qg_mm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                    int T, int r0, int r1, int K, int accumulate, const struct ifg_xq *xq);
/* Row-interleaved q4_1 (IFG_Q4_1X16; N a multiple of 16, built at load time from the GGUF-order
 * blocks by ifg_quant_interleave / infeng.quant.interleave). W is N/16 groups of 16 rows; a group
 * is K/32 group-blocks of 320 bytes (= 16 × 20): 0..31 the 16 rows' fp16 d (row r at 2r), 32..63
 * their fp16 m, 64..319 the nibbles as q4_0x16's: chunk v (64 bytes), row r, byte 4r + j: low
 * nibble level of k = 8v + j, high of k = 8v + 4 + j. Its product is q4_0x16's kernel
 * (ifg_qmm_x16_rows, quant_x16.c) with the minimums' term added.
 * Row-interleaved q5_1 (IFG_Q5_1X16): group-blocks of 384 bytes (= 16 × 24): bytes 0..319 as
 * q4_1x16's with the low 4 bits of the levels, then 64 bytes of 5th bits: row r, byte 4r + j,
 * bit 2v + h: bit 4 of the level of k = 8v + 4h + j (the plane q5_kx16 keeps per sub-block). */
/* Row-interleaved q6_k (IFG_Q6_KX16; N a multiple of 16, from GGUF order by ifg_quant_interleave /
 * infeng.quant.interleave). W is N/16 groups of 16 rows; a group is K/256 group-blocks of 3360
 * bytes (= 16 × 210):
 *   0..31       the 16 rows' fp16 d (row r at 2r);
 *   32..287     byte 32 + 16s + r: row r's int8 scale of 16-weight sub-block s;
 *   288..2335   32-block c (k = 32c..32c+31) at 288 + 256c: 4 × 64 bytes, chunk v, row r, byte
 *               4r + j: low 4 bits of the level of k = 32c + 8v + j (low nibble), of k = 32c + 8v + 4 + j (high);
 *   2336..3359  32-block c at 2336 + 128c: 2 × 64 bytes, vector m, row r, byte 4r + j, bits
 *               2v..2v+1: the high 2 bits of the level of k = 32c + 8v + 4m + j.
 * quant_q6kx16.c. */
void ifg_q6k_mm_x16_rows(float *y, int ldy, const float *x, int ldx, const void *w, int T, int r0, int r1,
                         int K, int accumulate, const struct ifg_xq *xq);
void ifg_q6_k_interleave(void *dst, const void *src, int N, int K, int n_threads);
/* Row-interleaved q5_k (IFG_Q5_KX16): group-blocks of 2816 bytes (= 16 × 176); bytes 0..2303 as
 * q4_kx16's (quant_k.h) with the low 4 bits of the levels, then 512 bytes of 5th bits: sub-block s
 * at 2304 + 64s, row r, byte 4r + j, bit 2v + h: bit 4 of the level of k = 32s + 8v + 4h + j.
 * quant_kx16.c. */
void ifg_q5k_mm_x16_rows(float *y, int ldy, const float *x, int ldx, const void *w, int T, int r0, int r1,
                         int K, int accumulate, const struct ifg_xq *xq);
void ifg_q5_k_interleave(void *dst, const void *src, int N, int K, int n_threads);
/* q6_k's product and row lookup (quant_q6k.c; ifg_qg_* dispatch to them). */
void ifg_q6k_mm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int T, int r0, int r1,
                     int K, int accumulate);
void ifg_q6k_dequant_row(float *o, const uint8_t *row, int n);
/* q5_k's (quant_q5k.c). */
void ifg_q5k_mm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int T, int r0, int r1,
                     int K, int accumulate);
void ifg_q5k_dequant_row(float *o, const uint8_t *row, int n);

#endif
