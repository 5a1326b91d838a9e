/* embed.c — embedding rows to f32: f32 copies, bf16 widens (shift into the top half),
 * f16 converts with F16C / AVX-512 (exact, like the scalar ifg_f16_to_f32). */
#include "embed.h"
#include "quant.h"
#include "quant_k.h"
#include "quant_gguf.h"

static void embed_bf16_row(float *o, const uint16_t *h, int n) {
    int i = 0;
#if defined(IFG_AVX512)
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, h + i));
        _mm512_mask_storeu_ps(o + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
#elif defined(IFG_AVX2)
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + i)));
        _mm256_storeu_ps(o + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
#endif
    for (; i < n; i++) o[i] = ifg_bf16_to_f32(h[i]);
}

static void embed_f16_row(float *o, const uint16_t *h, int n) {
    int i = 0;
#if defined(IFG_AVX512)
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(o + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + i)));
    }
#elif defined(IFG_AVX2)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(o + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) o[i] = ifg_f16_to_f32(h[i]);
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
        case IFG_BF16: embed_bf16_row(o, (const uint16_t *)table + row, dim); break;
        case IFG_F16:  embed_f16_row(o, (const uint16_t *)table + row, dim); break;
        default:       memcpy(o, (const float *)table + row, (size_t)dim * sizeof(float)); break;
        }
    }
}

void ifg_embed(float *out, const void *table, int dtype, const int32_t *tokens, int T, int dim, int n_threads) {
    IFG_PARALLEL(n_threads) { ifg_embed_part(out, table, dtype, tokens, T, dim); }
}
