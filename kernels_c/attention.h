/* attention.h — paged KV cache and causal attention over it (f32). */
#ifndef IFG_ATTENTION_H
#define IFG_ATTENTION_H

#include "core.h"

// cdef-begin
/* k_cache and v_cache of one layer are [n_blocks][block_size][n_kv_heads][head_dim] f32. Sequence s owns
   blocks block_table[s*max_blocks + j]; position p lives in block block_table[s*max_blocks + p/block_size],
   row p % block_size. kv_store writes k[t], v[t] (rows of n_kv_heads*head_dim at stride ldkv) at (seq[t], pos[t]). */
void ifg_kv_store(float *k_cache, float *v_cache, const float *k, const float *v, int ldkv,
                  const int32_t *block_table, int max_blocks, int block_size,
                  const int32_t *seq, const int32_t *pos, int T, int n_kv_heads, int head_dim, int n_threads);
/* Causal attention for T query tokens of ragged sequences: token t (sequence seq[t], position pos[t])
   attends to positions 0..pos[t] of its sequence in the cache (stored there first). q and out are
   [T][n_heads][head_dim] with row strides ldq/ldo. GQA: query head h uses kv head h / (n_heads/n_kv_heads).
   Online softmax (one pass, running max and sum), scores = q.k * scale. head_dim <= 256. */
void ifg_attention(float *out, int ldo, const float *q, int ldq, const float *k_cache, const float *v_cache,
                   const int32_t *block_table, int max_blocks, int block_size,
                   const int32_t *seq, const int32_t *pos, int T, int n_heads, int n_kv_heads, int head_dim,
                   float scale, int n_threads);
/* The same with a sliding window: token t attends to positions max(0, pos[t]-window+1)..pos[t]
   (window <= 0: all of them), as Mistral's and Phi-3's sliding-window layers. */
void ifg_attention_window(float *out, int ldo, const float *q, int ldq, const float *k_cache, const float *v_cache,
                          const int32_t *block_table, int max_blocks, int block_size,
                          const int32_t *seq, const int32_t *pos, int T, int n_heads, int n_kv_heads, int head_dim,
                          float scale, int window, int n_threads);
// cdef-end

#define IFG_ATTN_MAX_HEAD_DIM 256

/* Orphaned work-sharing bodies: call from inside a parallel region (all threads). */
void ifg_kv_store_part(float *k_cache, float *v_cache, const float *k, const float *v, int ldkv,
                       const int32_t *block_table, int max_blocks, int block_size,
                       const int32_t *seq, const int32_t *pos, int T, int n_kv_heads, int head_dim);
void ifg_attention_part(float *out, int ldo, const float *q, int ldq, const float *k_cache, const float *v_cache,
                        const int32_t *block_table, int max_blocks, int block_size,
                        const int32_t *seq, const int32_t *pos, int T, int n_heads, int n_kv_heads, int head_dim,
                        float scale);
void ifg_attention_window_part(float *out, int ldo, const float *q, int ldq, const float *k_cache,
                               const float *v_cache, const int32_t *block_table, int max_blocks, int block_size,
                               const int32_t *seq, const int32_t *pos, int T, int n_heads, int n_kv_heads,
                               int head_dim, float scale, int window);

#endif
