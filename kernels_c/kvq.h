/* kvq.h — the compressed paged KV cache (bf16 / f16 / int8 / fp8 / int4, f32 beside them for mixed K/V
 * types): storing (quantizing) K/V rows, causal attention that reads the codes directly, and
 * the randomized Walsh–Hadamard rotation applied to queries and keys. */
#ifndef IFG_KVQ_H
#define IFG_KVQ_H

#include "core.h"

// cdef-begin
enum ifg_kv_type { IFG_KV_F32 = 0, IFG_KV_BF16 = 1, IFG_KV_I8 = 2, IFG_KV_I4 = 3, IFG_KV_F16 = 4, IFG_KV_FP8 = 5,
                   IFG_KV_I8C = 6, IFG_KV_I4C = 7 };
/* Shape rules of the compressed layout: block_size a multiple of POS (position vectors of the
   key kernel), head_dim a multiple of CHUNK (the AVX2 kernels' vectors of channels), at most MAX_BS
   positions per block. */
enum ifg_kvq_shape { IFG_KVQ_POS = 16, IFG_KVQ_CHUNK = 8, IFG_KVQ_MAX_BS = 256 };
/* What a layer rotates (ifg_kv_cache.rotate[l], bits): its queries and keys before the keys are
   stored, its values before they are stored (and the attention output back). */
enum ifg_kv_rotate { IFG_KV_ROT_K = 1, IFG_KV_ROT_V = 2 };

/* One layer's K (or V) pool is [n_blocks][n_kv_heads][part]; a part is one kv head's share of one
   block, ifg_kvq_part_bytes(type, block_size, head_dim, group) bytes:
     K part: scaled types (int8, fp8, int4): scales f16 [head_dim/group][block_size], then codes
             [head_dim][block_size] (channel-major: a key kernel vector holds 16 positions of one channel)
             per-channel keys (int8c, int4c; keys only): f16 scales [block_size/POS][head_dim], f16 mins
             [block_size/POS][head_dim], then codes [head_dim][block_size] (unsigned)
     V part: scaled types: scales f16 [block_size][head_dim/group], then codes [block_size][head_dim]
   codes: f32, bf16 (round to nearest even), f16 (IEEE half, round to nearest even),
   int8 (d = amax/127, q = rint(x/d) in -127..127), fp8 (d = amax/448, q = x/d rounded to the
   nearest E4M3 value, ties to the even code, saturated at ±448; one byte per value),
   int4 (d = -m/8 for m the value of largest magnitude, q = rint(x/d) clamped to -8..7, stored
   q+8; the code matrix [rows][cols] as above packs two rows in one row of bytes, [rows/2][cols]:
   byte c of byte row i holds column c of row 2i in its low nibble and of row 2i+1 in its high
   one — a key part's channels 2i, 2i+1 at one position, a value part's positions 2i, 2i+1 at
   one channel: the pairs a bf16 dot product multiplies).
   d is rounded to f16 (nearest even) first; x/d is computed as x * (1/d) in f32 with that d; the
   value read back is q * d in f32. group divides
   head_dim and is head_dim or a multiple of 16.
   int8c / int4c (KIVI keys): one channel of the POS positions of a group: mn = f16(min),
   d = f16((max - mn) / L) for L = 255 / 15, q = rint((x - mn) * (1/d)) clamped to 0..L (d = 0:
   q = 0); read back as q * d + mn. int4c packs as int4 (nibble = q). A group is quantized when
   its last position is stored; until then its rows live in f32 in the caller's *stage*:
   [n_seqs][stage_rows][n_kv_heads*head_dim] f32 per layer, position p of sequence s at row
   p % stage_rows (stage_rows a multiple of POS, >= 2*POS so a rejected draft that crossed into
   the next group leaves the previous one intact). A query at position p reads the groups before
   p's own quantized and its own group (p & ~(POS-1) .. p) in f32 — from this call's k rows when
   they hold the position, else from the stage — so its keys do not depend on how positions
   were split into calls. Within one call a sequence's rows are in increasing position order;
   ifg_kvq_stage writes the call's rows to the stage after attention. k / stage unused (NULL
   allowed) when the key type is not per-channel. */
size_t ifg_kvq_part_bytes(int type, int block_size, int head_dim, int group);
/* Store k[t], v[t] (rows of n_kv_heads*head_dim at stride ldkv) at (seq[t], pos[t]) as
   ifg_kv_store does, quantizing into the layout above. */
void ifg_kvq_store(void *k_cache, void *v_cache, int k_type, int v_type, int group, const float *k,
                   const float *v, int ldkv, const float *stage, int stage_rows, const int32_t *block_table,
                   int max_blocks, int block_size, const int32_t *seq, const int32_t *pos, int T, int n_kv_heads,
                   int head_dim, int n_threads);
/* ifg_attention_window over the compressed cache (window <= 0: no window); k / ldk: this call's
   key rows as given to the store (read for per-channel keys). */
void ifg_kvq_attention(float *out, int ldo, const float *q, int ldq, const void *k_cache, const void *v_cache,
                       int k_type, int v_type, int group, const float *k, int ldk, const float *stage,
                       int stage_rows, const int32_t *block_table, int max_blocks, int block_size,
                       const int32_t *seq, const int32_t *pos, int T, int n_heads, int n_kv_heads, int head_dim,
                       float scale, int window, int n_threads);
/* Copy this call's key rows to the stage (after its attention; per-channel keys). */
void ifg_kvq_stage(float *stage, int stage_rows, const float *k, int ldk, const int32_t *seq, const int32_t *pos,
                   int T, int n_kv_heads, int head_dim, int n_threads);
/* x_h ← H·(signs ⊙ x_h) / sqrt(head_dim) for every head h of every row (rows of n_heads*head_dim
   at stride ld): an orthogonal rotation, so rotating both queries and keys leaves q·k unchanged
   while spreading a channel's outlier over all channels before quantizing. head_dim a power of
   two. H is the Sylvester Hadamard matrix (fast Walsh–Hadamard butterflies, stride 1 first). */
void ifg_hadamard(float *x, int ld, const float *signs, int rows, int n_heads, int head_dim, int n_threads);
/* The inverse (transpose) of ifg_hadamard: x_h ← signs ⊙ (H·x_h) / sqrt(head_dim) — the same
   butterflies, the signs after them. Values stored rotated give an attention output rotated the
   same way; this takes it back. */
void ifg_hadamard_t(float *x, int ld, const float *signs, int rows, int n_heads, int head_dim, int n_threads);
// cdef-end

/* Orphaned work-sharing bodies: call from inside a parallel region (all threads). */
void ifg_kvq_store_part(void *k_cache, void *v_cache, int k_type, int v_type, int group, const float *k,
                        const float *v, int ldkv, const float *stage, int stage_rows, const int32_t *block_table,
                        int max_blocks, int block_size, const int32_t *seq, const int32_t *pos, int T,
                        int n_kv_heads, int head_dim);
void ifg_kvq_attention_part(float *out, int ldo, const float *q, int ldq, const void *k_cache,
                            const void *v_cache, int k_type, int v_type, int group, const float *k, int ldk,
                            const float *stage, int stage_rows, const int32_t *block_table, int max_blocks,
                            int block_size, const int32_t *seq, const int32_t *pos, int T, int n_heads,
                            int n_kv_heads, int head_dim, float scale, int window);
void ifg_kvq_stage_part(float *stage, int stage_rows, const float *k, int ldk, const int32_t *seq,
                        const int32_t *pos, int T, int n_kv_heads, int head_dim);
void ifg_hadamard_part(float *x, int ld, const float *signs, int rows, int n_heads, int head_dim);
void ifg_hadamard_t_part(float *x, int ld, const float *signs, int rows, int n_heads, int head_dim);

/* Layout helpers shared by the store (kvq.c) and the attention (kvq_attention.c). */
#define KVQ_MAX_HD 256 /* head_dim bound of the kernels' stack rows */

/* int8, fp8, int4: codes with one f16 scale per group of values of one position */
static inline int kvq_scaled(int type) { return type == IFG_KV_I8 || type == IFG_KV_I4 || type == IFG_KV_FP8; }
/* int8c, int4c: keys with an f16 scale and min per channel of POS positions */
static inline int kvq_chan(int type) { return type == IFG_KV_I8C || type == IFG_KV_I4C; }

static inline size_t kvq_scale_bytes(int type, int bs, int hd, int group) {
    if (kvq_chan(type)) return (size_t)(bs / IFG_KVQ_POS) * (size_t)hd * 2 * sizeof(uint16_t);
    return kvq_scaled(type) ? (size_t)bs * (size_t)(hd / group) * sizeof(uint16_t) : 0;
}

/* An E4M3 code as the bits of the f16 holding its value / 256 (exact, subnormals included). */
static inline uint16_t kvq_e4m3_f16(uint8_t c) { return (uint16_t)(((c & 0x80) << 8) | ((c & 0x7F) << 7)); }

/* int4 code (row, col) of a packed code matrix of `cols` columns (two rows a byte row). */
static inline void kvq_put4(uint8_t *codes, int row, int col, int cols, int8_t q) {
    uint8_t *b = codes + (size_t)(row >> 1) * cols + col;
    const int sh = (row & 1) * 4;
    *b = (uint8_t)((*b & ~(0xF << sh)) | ((q + 8) << sh));
}
static inline int kvq_get4(const uint8_t *codes, int row, int col, int cols) {
    return (codes[(size_t)(row >> 1) * cols + col] >> ((row & 1) * 4) & 0xF) - 8;
}

#endif
