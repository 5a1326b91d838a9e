/* embed.c — embedding rows to f32: f32 copies, bf16 widens (shift into the top half),
 * f16 converts with F16C / AVX-512 (exact, like the scalar ifg_f16_to_f32). */
#include "embed.h"
#include "quant.h"
#include "quant_k.h"
#include "quant_gguf.h"
#include "simd.h"

/* A bf16 / f16 row to f32 (both exact). */
static void embed_half_row(float *o, const uint16_t *h, int dtype, int n) {
    int i = 0;
#ifdef IFG_SIMD
    for (; i + IFG_VW <= n; i += IFG_VW) ifg_vstore(o + i, ifg_vload_w(h, dtype, (size_t)i));
    if (i < n) ifg_vstore_n(o + i, ifg_vload_w_n(h, dtype, (size_t)i, n - i), n - i);
#else
    for (; i < n; i++) o[i] = dtype == IFG_BF16 ? ifg_bf16_to_f32(h[i]) : ifg_f16_to_f32(h[i]);
#endif
}

void ifg_embed_part(float *out, const void *table, int dtype, const int32_t *tokens, int T, int dim) {
    IFG_FOR
    for (int t = 0; t < T; t++) {
        float *o = out + (size_t)t * dim;
        size_t row = (size_t)tokens[t] * (size_t)dim;
        if (ifg_is_quant(dtype)) { /* q8_0 / q4_0 / q5_0 table: dim is a multiple of 32 */
            ifg_dequant_row(o, (const uint8_t *)table + (size_t)tokens[t] * ifg_quant_row_bytes(dtype, dim), dtype, dim);
            continue;
        }
        if (ifg_is_quant_k(dtype)) { /* q4_k / fp8 table */
            ifg_qk_dequant_row(o, (const uint8_t *)table + (size_t)tokens[t] * ifg_quant_k_row_bytes(dtype, dim), dtype, dim);
            continue;
        }
        if (ifg_is_quant_gguf(dtype)) { /* q4_1 / q5_1 table */
            ifg_qg_dequant_row(o, (const uint8_t *)table + (size_t)tokens[t] * ifg_quant_gguf_row_bytes(dtype, dim), dtype, dim);
            continue;
        }
        switch (dtype) {
        case IFG_BF16:
        case IFG_F16:  embed_half_row(o, (const uint16_t *)table + row, dtype, dim); break;
        default:       memcpy(o, (const float *)table + row, (size_t)dim * sizeof(float)); break;
        }
    }
}

void ifg_embed(float *out, const void *table, int dtype, const int32_t *tokens, int T, int dim, int n_threads) {
    IFG_PARALLEL(n_threads) { ifg_embed_part(out, table, dtype, tokens, T, dim); }
}
