/* forward.c — one decode/prefill step of a Llama model, the layer loop top to bottom.
 *
 * One OpenMP parallel region spans the whole step; every kernel inside is the `_part` form,
 * whose `omp for` loops split work among the region's threads and end in a barrier, so ops run
 * in order with no fork/join per op. Nothing is allocated: buffers come from the caller. */
#include "forward.h"
#include "matmul.h"
#include "norm.h"
#include "rope.h"
#include "act.h"
#include "embed.h"
#include "attention.h"
#include "kvq.h"
#include "lora.h"
#include "quant.h"
#include "quant_k.h"
#include "quant_gguf.h"

static void mm(float *y, int ldy, const float *x, int ldx, const struct ifg_weight *w, int T, int acc) {
    ifg_matmul_part(y, ldy, x, ldx, w->data, w->dtype, T, w->rows, w->cols, acc);
}

/* The input x [T][K] of projections p0..p0+n of layer l quantized once into the scratch's xq,
 * when one of them is an int8-activation product that takes it (q8_0x16 / q4_0x16 / q4_kx16 and
 * the GGUF types', quant_gguf.h) or has an int8 adapter in this batch (lora.h),
 * which would each round x in every thread (the threads split the rows of W, so each needs all
 * of x) or in every shrink unit otherwise: the same int8 values, computed once. The shrinks of
 * the projections' adapters (x·Aᵀ) run in the same worksharing loop: adapters add no barrier.
 * Returns the quantized x, or NULL (no scratch, or nothing that reads it). */
static const struct ifg_xq *quant_input(struct ifg_xq *xq, const struct ifg_scratch *s, const float *x, int ldx,
                                        int T, int K, const struct ifg_layer *L, const struct ifg_lora_batch *lb,
                                        int l, int p0, int n) {
    const struct ifg_weight *w[7] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
    const struct ifg_lora *sel[IFG_LORA_SETS][IFG_LORA_MAX_SEG];
    const struct ifg_lora *const *sels[IFG_LORA_SETS];
    int any = 0, adapted = 0;
    for (int p = p0; p < p0 + n; p++) {
        any |= ifg_is_qx16(w[p]->dtype) || ifg_is_qkx16(w[p]->dtype) || ifg_quant_gguf_takes_xq(w[p]->dtype);
        sels[p - p0] = sel[p - p0];
        for (int i = 0; lb && i < lb->n_seg; i++) {
            const struct ifg_lora *a = sel[p - p0][i] = lb->seg[i] ? lb->seg[i][l * 7 + p] : NULL;
            any |= a && a->a_dtype == IFG_LORA_I8 && lb->seg_start[i + 1] > lb->seg_start[i];
            adapted |= a != NULL;
        }
    }
    const int use = s->xq && any && K % IFG_QK == 0;
    if (use) {
        xq->q = s->xq;
        xq->d = s->xq_d;
        xq->s = s->xq_s;
        xq->ldq = K;
        xq->ldd = K / IFG_QK;
    }
    if (adapted) ifg_lora_shrink_group_part(lb->h, lb->max_rank, x, ldx, T, K, sels, n, lb->seg_start, lb->n_seg,
                                            use ? xq : NULL);
    else if (use) ifg_quantize_x_part(xq, x, ldx, T, K);
    return use ? xq : NULL;
}

const char *ifg_op_name(int op) {
    static const char *names[IFG_OP_COUNT] = {
        "embed", "attn_norm", "wq", "wk", "wv", "rope", "kv_store", "attention", "wo", "ffn_norm",
        "w_gate", "w_up", "silu_mul", "w_down", "final_norm", "output"};
    return op >= 0 && op < IFG_OP_COUNT ? names[op] : "?";
}

/* Profiling hooks, called by every thread right after an op's closing barrier. TIME: thread 0
 * stamps the end of op of layer l (no barrier; the others go on). TRACE: one thread copies the
 * op's output rows (width floats at stride ld) into the trace, then all wait, so the next op
 * cannot overwrite the source first. Both cost one predictable branch when off. */
#ifdef _OPENMP
#define IFG_NOW() omp_get_wtime()
#else
#define IFG_NOW() 0.0
#endif
#define TIME(l, op) do { if (s->op_times) { IFG_PRAGMA(omp master) \
    s->op_times[1 + (size_t)(l) * IFG_OP_COUNT + (op)] = IFG_NOW(); } } while (0)
#define TRACE(l, op, src, width) do { if (s->trace) { IFG_SINGLE \
    trace_rows(s->trace, l, op, src, width, T, tw, toff); } } while (0)

/* Offsets of each traced op inside one layer's trace block, in floats per token. */
static void trace_layout(const struct ifg_model *m, size_t off[IFG_OP_COUNT], size_t *per_token) {
    const int dim = m->dim, hidden = m->hidden_dim, q_dim = m->n_heads * m->head_dim,
              kv_dim = m->n_kv_heads * m->head_dim;
    int w[IFG_OP_COUNT] = {0};
    w[IFG_OP_ATTN_NORM] = dim; w[IFG_OP_WQ] = q_dim; w[IFG_OP_WK] = kv_dim; w[IFG_OP_WV] = kv_dim;
    w[IFG_OP_ATTENTION] = q_dim; w[IFG_OP_WO] = dim; w[IFG_OP_FFN_NORM] = dim;
    w[IFG_OP_W_GATE] = hidden; w[IFG_OP_W_UP] = hidden; w[IFG_OP_SILU_MUL] = hidden; w[IFG_OP_W_DOWN] = dim;
    size_t acc = 0;
    for (int op = 0; op < IFG_OP_COUNT; op++) { off[op] = acc; acc += w[op]; }
    *per_token = acc;
}

static void trace_rows(float *trace, int l, int op, const float *src, int width, int T,
                       size_t per_token, const size_t *off) {
    float *dst = trace + (size_t)l * per_token * T + off[op] * T;
    for (int t = 0; t < T; t++)
        memcpy(dst + (size_t)t * width, src + (size_t)t * width, sizeof(float) * width);
}

int ifg_trace_floats_per_token(const struct ifg_model *m) {
    size_t off[IFG_OP_COUNT], per;
    trace_layout(m, off, &per);
    return (int)per;
}

/* A projection of layer l (p: 0..6 = wq wk wv wo w_gate w_up w_down) over all T rows, with the
 * low-rank part of each row segment's adapter added in the same pass (lora.h), its shrink done
 * by quant_input as the j-th of its group. The base weights are read once for the batch. wq, wk
 * and w_gate end without a barrier when nothing looks at their output before the next
 * projection's (no trace, no per-op timing): their siblings read the same input, their own set
 * of the shrink's sums, and write other buffers. */
static void proj(float *y, int ldy, const float *x, int ldx, const struct ifg_weight *w, int T,
                 int acc, const struct ifg_lora_batch *lb, int l, int p, int j, const struct ifg_xq *xq,
                 const struct ifg_scratch *s) {
    const struct ifg_lora *sel[IFG_LORA_MAX_SEG];
    int any = 0;
    for (int i = 0; lb && i < lb->n_seg; i++) {
        sel[i] = lb->seg[i] ? lb->seg[i][l * 7 + p] : NULL;
        any |= sel[i] != NULL;
    }
    const int wait = (p != 0 && p != 1 && p != 4) || s->trace || s->op_times;
    if (!any)
        ifg_matmul_part_xq_wait(y, ldy, x, ldx, w->data, w->dtype, T, w->rows, w->cols, acc, xq, wait);
    else
        ifg_lora_project_part(y, ldy, x, ldx, w->data, w->dtype, T, w->rows, w->cols, acc, sel, lb->seg_start,
                              lb->n_seg, ifg_lora_h_set(lb->h, lb->max_rank, T, w->cols, j), lb->max_rank, lb->tmp, xq,
                              wait);
}

/* y[t][0..n) += b for T rows at stride ld. */
static void add_bias_part(float *y, int ld, const float *b, int T, int n) {
    IFG_FOR
    for (int t = 0; t < T; t++) {
        float *yr = y + (size_t)t * ld;
        for (int i = 0; i < n; i++) yr[i] += b[i];
    }
}

int ifg_forward(const struct ifg_model *m, struct ifg_scratch *s, struct ifg_kv_cache *kv,
                const int32_t *tokens, const int32_t *pos, const int32_t *seq, int T,
                const int32_t *out_rows, int n_out, float *logits, int n_threads) {
    return ifg_forward_lora(m, s, kv, tokens, pos, seq, T, out_rows, n_out, logits, NULL, n_threads);
}

int ifg_forward_lora(const struct ifg_model *m, struct ifg_scratch *s, struct ifg_kv_cache *kv,
                     const int32_t *tokens, const int32_t *pos, const int32_t *seq, int T,
                     const int32_t *out_rows, int n_out, float *logits,
                     const struct ifg_lora_batch *lb, int n_threads) {
    const int dim = m->dim, hidden = m->hidden_dim, hd = m->head_dim;
    const int q_dim = m->n_heads * hd, kv_dim = m->n_kv_heads * hd;
    const size_t layer_kv = (size_t)kv->n_blocks * kv->block_size * kv_dim;
    const float default_scale = 1.0f / sqrtf((float)hd);
    const int NL = m->n_layers;
    size_t toff[IFG_OP_COUNT], tw;
    trace_layout(m, toff, &tw);
    if (s->op_times) s->op_times[0] = IFG_NOW();

    IFG_PARALLEL(n_threads) {
        ifg_embed_part(s->x, m->tok_embeddings.data, m->tok_embeddings.dtype, tokens, T, dim);
        TIME(NL, IFG_OP_EMBED);
        for (int l = 0; l < m->n_layers; l++) {
            const struct ifg_layer *L = &m->layers[l];
            const int kt = kv->k_type ? kv->k_type[l] : IFG_KV_F32, vt = kv->v_type ? kv->v_type[l] : IFG_KV_F32;
            void *kc = (char *)kv->k + (kv->k_off ? (size_t)kv->k_off[l] : l * layer_kv * sizeof(float));
            void *vc = (char *)kv->v + (kv->v_off ? (size_t)kv->v_off[l] : l * layer_kv * sizeof(float));
            const float att_scale = L->attn_scale > 0.0f ? L->attn_scale : default_scale;

            /* attention block: x += wo · attention(rope(wq·norm(x)), cache) */
            ifg_rmsnorm_part(s->xb, s->x, L->attn_norm, T, dim, m->norm_eps);
            TIME(l, IFG_OP_ATTN_NORM); TRACE(l, IFG_OP_ATTN_NORM, s->xb, dim);
            struct ifg_xq xqs;
            const struct ifg_xq *xq = quant_input(&xqs, s, s->xb, dim, T, dim, L, lb, l, 0, 3);
            proj(s->q, q_dim, s->xb, dim, &L->wq, T, 0, lb, l, 0, 0, xq, s);
            TIME(l, IFG_OP_WQ); TRACE(l, IFG_OP_WQ, s->q, q_dim);
            proj(s->k, kv_dim, s->xb, dim, &L->wk, T, 0, lb, l, 1, 1, xq, s);
            TIME(l, IFG_OP_WK); TRACE(l, IFG_OP_WK, s->k, kv_dim);
            proj(s->v, kv_dim, s->xb, dim, &L->wv, T, 0, lb, l, 2, 2, xq, s);
            TIME(l, IFG_OP_WV); TRACE(l, IFG_OP_WV, s->v, kv_dim);
            if (L->q_bias) add_bias_part(s->q, q_dim, L->q_bias, T, q_dim);
            if (L->k_bias) add_bias_part(s->k, kv_dim, L->k_bias, T, kv_dim);
            if (L->v_bias) add_bias_part(s->v, kv_dim, L->v_bias, T, kv_dim);
            if (L->q_norm) ifg_rmsnorm_part(s->q, s->q, L->q_norm, T * m->n_heads, hd, m->norm_eps);
            if (L->k_norm) ifg_rmsnorm_part(s->k, s->k, L->k_norm, T * m->n_kv_heads, hd, m->norm_eps);
            if (!L->no_rope) {
                const float *freq = s->row_inv_freq ? s->row_inv_freq : m->inv_freq;
                const int stride = s->row_inv_freq ? hd / 2 : 0;
                ifg_rope_part(s->q, q_dim, pos, freq, stride, T, m->n_heads, hd);
                ifg_rope_part(s->k, kv_dim, pos, freq, stride, T, m->n_kv_heads, hd);
            }
            const int rot = kv->rot_signs && kv->rotate ? kv->rotate[l] : 0;
            if (rot & IFG_KV_ROT_K) { /* q·k unchanged; keys quantize better */
                ifg_hadamard_part(s->q, q_dim, kv->rot_signs, T, m->n_heads, hd);
                ifg_hadamard_part(s->k, kv_dim, kv->rot_signs, T, m->n_kv_heads, hd);
            }
            if (rot & IFG_KV_ROT_V) /* values quantize better; the output is rotated back below */
                ifg_hadamard_part(s->v, kv_dim, kv->rot_signs, T, m->n_kv_heads, hd);
            TIME(l, IFG_OP_ROPE);
            if (kt == IFG_KV_F32 && vt == IFG_KV_F32) {
                ifg_kv_store_part(kc, vc, s->k, s->v, kv_dim, kv->block_table, kv->max_blocks,
                                  kv->block_size, seq, pos, T, m->n_kv_heads, hd);
                TIME(l, IFG_OP_KV_STORE);
                ifg_attention_window_part(s->att, q_dim, s->q, q_dim, kc, vc, kv->block_table, kv->max_blocks,
                                          kv->block_size, seq, pos, T, m->n_heads, m->n_kv_heads, hd,
                                          att_scale, L->window);
            } else {
                float *stage = kv->stage ? kv->stage + (size_t)l * kv->n_seqs * kv->stage_rows * kv_dim : NULL;
                ifg_kvq_store_part(kc, vc, kt, vt, kv->group, s->k, s->v, kv_dim, stage, kv->stage_rows,
                                   kv->block_table, kv->max_blocks, kv->block_size, seq, pos, T, m->n_kv_heads, hd);
                TIME(l, IFG_OP_KV_STORE);
                ifg_kvq_attention_part(s->att, q_dim, s->q, q_dim, kc, vc, kt, vt, kv->group, s->k, kv_dim, stage,
                                       kv->stage_rows, kv->block_table, kv->max_blocks, kv->block_size, seq, pos,
                                       T, m->n_heads, m->n_kv_heads, hd, att_scale, L->window);
                if (stage && (kt == IFG_KV_I8C || kt == IFG_KV_I4C)) /* after every item read the old rows */
                    ifg_kvq_stage_part(stage, kv->stage_rows, s->k, kv_dim, seq, pos, T, m->n_kv_heads, hd);
            }
            if (rot & IFG_KV_ROT_V) ifg_hadamard_t_part(s->att, q_dim, kv->rot_signs, T, m->n_heads, hd);
            TIME(l, IFG_OP_ATTENTION); TRACE(l, IFG_OP_ATTENTION, s->att, q_dim);
            xq = quant_input(&xqs, s, s->att, q_dim, T, q_dim, L, lb, l, 3, 1);
            proj(s->x, dim, s->att, q_dim, &L->wo, T, 1, lb, l, 3, 0, xq, s);
            TIME(l, IFG_OP_WO); TRACE(l, IFG_OP_WO, s->x, dim);

            /* MLP block: x += w_down · (silu(w_gate·norm(x)) * w_up·norm(x)) */
            ifg_rmsnorm_part(s->xb, s->x, L->ffn_norm, T, dim, m->norm_eps);
            TIME(l, IFG_OP_FFN_NORM); TRACE(l, IFG_OP_FFN_NORM, s->xb, dim);
            xq = quant_input(&xqs, s, s->xb, dim, T, dim, L, lb, l, 4, 2);
            proj(s->hb, hidden, s->xb, dim, &L->w_gate, T, 0, lb, l, 4, 0, xq, s);
            TIME(l, IFG_OP_W_GATE); TRACE(l, IFG_OP_W_GATE, s->hb, hidden);
            proj(s->hb2, hidden, s->xb, dim, &L->w_up, T, 0, lb, l, 5, 1, xq, s);
            TIME(l, IFG_OP_W_UP); TRACE(l, IFG_OP_W_UP, s->hb2, hidden);
            ifg_silu_mul_part(s->hb, s->hb2, (size_t)T * hidden);
            TIME(l, IFG_OP_SILU_MUL); TRACE(l, IFG_OP_SILU_MUL, s->hb, hidden);
            xq = quant_input(&xqs, s, s->hb, hidden, T, hidden, L, lb, l, 6, 1);
            proj(s->x, dim, s->hb, hidden, &L->w_down, T, 1, lb, l, 6, 0, xq, s);
            TIME(l, IFG_OP_W_DOWN); TRACE(l, IFG_OP_W_DOWN, s->x, dim);
        }
        /* logits only for the rows asked for (the last token of each prefill chunk) */
        IFG_FOR
        for (int i = 0; i < n_out; i++)
            memcpy(s->xb + (size_t)i * dim, s->x + (size_t)out_rows[i] * dim, sizeof(float) * dim);
        ifg_rmsnorm_part(s->xb, s->xb, m->final_norm, n_out, dim, m->norm_eps);
        TIME(NL, IFG_OP_FINAL_NORM);
        mm(logits, m->vocab_size, s->xb, dim, &m->output, n_out, 0);
        TIME(NL, IFG_OP_OUTPUT);
    }
    return 0;
}
