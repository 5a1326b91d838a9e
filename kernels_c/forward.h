/* forward.h — the whole Llama forward pass of one step as one C call (llama2.c style). */
#ifndef IFG_FORWARD_H
#define IFG_FORWARD_H
#include "core.h"
#include "lora.h"

// cdef-begin
/* A weight matrix [rows][cols] (row-major) of some dtype; cols is the input width. */
struct ifg_weight {
    const void *data;
    int dtype;
    int rows, cols;
};

struct ifg_layer {
    const float *attn_norm;            /* [dim] */
    struct ifg_weight wq, wk, wv, wo;  /* [q_dim][dim], [kv_dim][dim] x2, [dim][q_dim] */
    const float *ffn_norm;             /* [dim] */
    struct ifg_weight w_gate, w_up;    /* [hidden][dim] */
    struct ifg_weight w_down;          /* [dim][hidden] */
    /* Per-architecture parts; zero / NULL is plain Llama. */
    const float *q_bias, *k_bias, *v_bias; /* [q_dim], [kv_dim] x2 added after the projection (Qwen2) */
    const float *q_norm, *k_norm;      /* [head_dim] per-head RMSNorm of q and k before RoPE (Qwen3) */
    int window;                        /* attend to the last `window` positions only; 0 = all */
    int no_rope;                       /* 1: this layer skips RoPE (SmolLM3's NoPE layers) */
    float attn_scale;                  /* score scale; 0 = 1/sqrt(head_dim) */
};

struct ifg_model {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size;
    float norm_eps;
    const float *inv_freq;             /* [head_dim/2] RoPE frequencies, scaling applied */
    struct ifg_weight tok_embeddings;  /* [vocab][dim] */
    const float *final_norm;           /* [dim] */
    struct ifg_weight output;          /* [vocab][dim]; the embedding table when tied */
    struct ifg_layer *layers;          /* [n_layers] */
};

/* Activation buffers for up to max_tokens tokens per call, owned by the caller. */
struct ifg_scratch {
    int max_tokens;
    float *x;      /* [max_tokens][dim] residual stream */
    float *xb;     /* [max_tokens][dim] normed input of a block */
    float *q;      /* [max_tokens][q_dim] */
    float *k, *v;  /* [max_tokens][kv_dim] */
    float *att;    /* [max_tokens][q_dim] attention output */
    float *hb;     /* [max_tokens][hidden] gate, then silu(gate) * up */
    float *hb2;    /* [max_tokens][hidden] up */
    /* A projection input quantized once for the q8_0x16 / q4_0x16 products that read it (quant.h's
     * struct ifg_xq): [max_tokens][K] int8 and [max_tokens][K/32] scales and sums, K the widest
     * input (max of dim, q_dim, hidden). NULL = each product quantizes x itself. */
    int8_t *xq;
    float *xq_d;
    int32_t *xq_s;
    /* Profiling (infeng profile), both NULL = off and free. op_times: [1 + (n_layers+1)*IFG_OP_COUNT]
     * omp_get_wtime() seconds: [0] when the step starts, [1 + l*IFG_OP_COUNT + op] when op of
     * layer l ends (all threads past it); layer n_layers holds embed, final_norm and output.
     * trace: per layer l and traced op (IFG_OP_ATTN_NORM..IFG_OP_W_DOWN, rope and kv_store
     * excepted; see ifg_trace_floats_per_token) the op's output for the T tokens, [l][op][T][width]. */
    double *op_times;
    float *trace;
    /* [max_tokens][head_dim/2] RoPE frequencies of each token, or NULL = m->inv_freq for all: rope
     * scaling that depends on the sequence's length (LongRoPE, dynamic NTK) is the caller's. */
    const float *row_inv_freq;
};

/* The ops of one step, in execution order (the names are ifg_op_name's). */
enum ifg_op {
    IFG_OP_EMBED = 0, IFG_OP_ATTN_NORM = 1, IFG_OP_WQ = 2, IFG_OP_WK = 3, IFG_OP_WV = 4,
    IFG_OP_ROPE = 5, IFG_OP_KV_STORE = 6, IFG_OP_ATTENTION = 7, IFG_OP_WO = 8, IFG_OP_FFN_NORM = 9,
    IFG_OP_W_GATE = 10, IFG_OP_W_UP = 11, IFG_OP_SILU_MUL = 12, IFG_OP_W_DOWN = 13,
    IFG_OP_FINAL_NORM = 14, IFG_OP_OUTPUT = 15, IFG_OP_COUNT = 16
};
const char *ifg_op_name(int op);
/* Floats per token per layer of the trace (s->trace needs n_layers * T * this). */
int ifg_trace_floats_per_token(const struct ifg_model *m);

/* Paged KV cache: per layer a pool of n_blocks blocks of block_size positions; sequence s owns
 * blocks block_table[s*max_blocks + j]. Layer l's K and V pools start k_off[l] / v_off[l] bytes
 * into k / v and hold the types k_type[l] / v_type[l] (enum ifg_kv_type): both f32 is the
 * [n_blocks][block_size][n_kv_heads][head_dim] f32 layout of attention.h, anything else the
 * compressed layout of kvq.h (groups of `group` values per scale). The four arrays NULL: every
 * layer f32, one after the other. rot_signs [head_dim] (±1) and rotate[l] & IFG_KV_ROT_K: layer l's
 * queries and keys are rotated (ifg_hadamard) before the keys are stored; & IFG_KV_ROT_V: its values
 * are rotated before they are stored and the attention output rotated back (ifg_hadamard_t);
 * rot_signs NULL: no rotation. */
struct ifg_kv_cache {
    void *k, *v;
    int n_blocks, block_size, max_blocks;
    const int32_t *block_table;
    const int32_t *k_type, *v_type;
    const int64_t *k_off, *v_off;
    int group;
    const float *rot_signs;
    const int32_t *rotate;
    float *stage;                   /* per-channel keys' f32 rows (kvq.h): [n_layers][n_seqs][stage_rows][kv_dim] */
    int stage_rows, n_seqs;
};

/* One step over a ragged batch: token t is tokens[t] at position pos[t] of sequence seq[t].
 * Stores every token's K/V, then attends causally, so a batch may mix prefill chunks of new
 * sequences with single decode tokens of running ones. Logits of the tokens listed in
 * out_rows[0..n_out) go to logits[n_out][vocab]. T <= s->max_tokens. Returns 0. */
int ifg_forward(const struct ifg_model *m, struct ifg_scratch *s, struct ifg_kv_cache *kv,
                const int32_t *tokens, const int32_t *pos, const int32_t *seq, int T,
                const int32_t *out_rows, int n_out, float *logits, int n_threads);
/* The same step with per-segment LoRA/DoRA adapters (lora.h); lb = NULL is ifg_forward. */
int ifg_forward_lora(const struct ifg_model *m, struct ifg_scratch *s, struct ifg_kv_cache *kv,
                     const int32_t *tokens, const int32_t *pos, const int32_t *seq, int T,
                     const int32_t *out_rows, int n_out, float *logits,
                     const struct ifg_lora_batch *lb, int n_threads);
// cdef-end
#endif
