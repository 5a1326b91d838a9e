/* quant_k.h — matrix products against q4_k (GGUF Q4_K super-blocks) and fp8 (E4M3 with a
 * per-32-block bf16 scale) weights. Layouts: infeng/quant/q4_k.py and infeng/quant/fp8.py.
 *
 * q4_k: W is [N][K], K a multiple of 256, each row K/256 blocks of 144 bytes. x is quantized
 *   per token and 32-block to int8 exactly as for q8_0/q4_0 (d = max|x|/127, q = roundf(x/d)),
 *   with its block sums; each 32-weight sub-block's dot product is an integer one (the 4-bit
 *   levels are unsigned: u8 × s8), and y += d_x * (d*sc) * dot - d_x * sum(q_x) * (dmin*m).
 * fp8: W is [N][K], K a multiple of 32, each row K/32 blocks of 34 bytes. x stays f32: the
 *   weights are decoded to f32 in registers (E4M3 → f16 bits → f32) and used in FMAs.
 * Reached through ifg_matmul / ifg_matmul_part (wtype IFG_Q4_K / IFG_FP8). */
#ifndef IFG_QUANT_K_H
#define IFG_QUANT_K_H

#include "core.h"

#define IFG_QK_K 256
#define IFG_Q4_K_BLOCK 144
#define IFG_FP8_BLOCK 34

// cdef-begin
/* o[0..n) = the dequantized row of a q4_k or fp8 matrix (n a multiple of the block), in f32
 * exactly as infeng.quant.dequantize gives it. */
void ifg_qk_dequant_row(float *o, const uint8_t *row, int dtype, int n);
/* dst (N rows of K/256 q4_k blocks) = x (f32 [N][K], K a multiple of 256) quantized exactly as
 * infeng.quant.q4_k.quantize_q4_k_ref does (byte for byte; quantize_k.c). importance: NULL or K
 * per-column weights (finite, >= 0). Super-blocks split over threads; allocates nothing. */
void ifg_quantize_q4_k(uint8_t *dst, const float *x, const double *importance, int N, int K, int n_threads);
// cdef-end

static inline int ifg_is_quant_k(int dtype) { return dtype == IFG_Q4_K || dtype == IFG_FP8; }

/* Bytes of one row of n weights. */
static inline size_t ifg_quant_k_row_bytes(int dtype, int n) {
    return dtype == IFG_Q4_K ? (size_t)(n / IFG_QK_K) * IFG_Q4_K_BLOCK : (size_t)(n / 32) * IFG_FP8_BLOCK;
}

/* Rows [r0, r1) of y (=|+=) x · Wᵀ. Allocates nothing: q4_k quantizes x into a fixed stack
 * buffer of ~40 KiB per thread (16 tokens × 2048 k at a time; partial sums of longer K go
 * through y). Each output's summation order depends only on K, so results are bitwise the
 * same for any thread count and for T == 1 against T > 1. */
void ifg_qk_mm_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                    int T, int r0, int r1, int K, int accumulate);

/* Row-interleaved q4_k (IFG_Q4_KX16; N a multiple of 16, built at load time from the GGUF-order
 * blocks by ifg_quant_interleave / infeng.quant.interleave). W is N/16 groups of 16 rows; a group
 * is K/256 group-blocks, one per super-block, each 2304 bytes (= 16 × 144, the same size):
 *   0..31     the 16 rows' fp16 d (row r at bytes 2r, 2r+1);   32..63: their fp16 dmin;
 *   64..191   byte 64 + 16s + r: low 4 bits of row r's sub-block-s scale | low 4 bits of its min << 4;
 *   192..255  byte 192 + 16(s/2) + r, nibble s%2 (low for even s): scale >> 4 | (min >> 4) << 2;
 *   256..2303 sub-block s (k = 32s..32s+31) at 256 + 256s: 4 × 64 bytes as in q4_0x16: chunk v,
 *             row r, byte 4r + j: low nibble level of k = 32s + 8v + j, high of 32s + 8v + 4 + j.
 * So 32 bytes give 16 rows' d and dmin, 16 + 16 bytes their sub-block's scales and mins, and one
 * 64-byte load 16 rows × 8 k of levels, which two vpdpbusd with x's 4 int8 broadcast consume. */
static inline int ifg_is_qkx16(int dtype) { return dtype == IFG_Q4_KX16; }
/* Rows [r0, r1) (multiples of 16) of y (=|+=) x · Wᵀ for an IFG_Q4_KX16 W (quant_kx16.c);
 * allocates nothing (a ~90 KiB stack buffer per thread holds a tile of quantized x; from 16 tokens
 * on, 22 KiB more hold two groups' weights unpacked, quant_x16.h). */
struct ifg_xq;
void ifg_qk_mm_x16_rows(float *y, int ldy, const float *x, int ldx, const void *w, int T, int r0, int r1,
                        int K, int accumulate, const struct ifg_xq *xq);
/* GGUF-order q4_k (N rows of K/256 blocks) → IFG_Q4_KX16 (reached through ifg_quant_interleave). */
void ifg_q4_k_interleave(void *dst, const void *src, int N, int K, int n_threads);

#endif
