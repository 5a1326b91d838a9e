/* kvq.c — compressed paged KV cache: store (quantize) and the Walsh–Hadamard rotation; attention
 * over the codes is kvq_attention.c, the layout helpers both use are in kvq.h. */
#include "kvq.h"
#include "act.h"

size_t ifg_kvq_part_bytes(int type, int bs, int hd, int group) {
    const size_t n = (size_t)bs * hd, sc = kvq_scale_bytes(type, bs, hd, group);
    switch (type) {
    case IFG_KV_F32: return n * 4;
    case IFG_KV_BF16: case IFG_KV_F16: return n * 2;
    case IFG_KV_I8: case IFG_KV_FP8: case IFG_KV_I8C: return sc + n;
    case IFG_KV_I4: case IFG_KV_I4C: return sc + n / 2;
    }
    return 0;
}

/* ---- quantizing one group (scalar in every build: a store touches each value once) ---------- */
/* Nearest E4M3 code of v (ties to the even code), saturated at ±448: with v's binade 2^e
 * (e >= -6, the subnormal spacing below) the grid step is 2^(e-3), so rint(a/step) is exact. */
static uint8_t kvq_e4m3(float v) {
    const float a = fminf(fabsf(v), 448.0f);
    int ex;
    (void)frexpf(a, &ex);
    const int e = ex - 1 < -6 ? -6 : ex - 1;
    const float step = ldexpf(1.0f, e - 3), r = rintf(a / step) * step;
    int code;
    if (r >= 0x1p-6f) {
        (void)frexpf(r, &ex);
        code = ((ex - 1 + 7) << 3) | (int)(ldexpf(r, -(ex - 1)) * 8.0f - 8.0f);
    } else {
        code = (int)rintf(r * 512.0f);
    }
    return (uint8_t)(code | (signbit(v) && code ? 0x80 : 0));
}


/* Codes q[0..n) of x[0..n) and their scale d as f16 bits (x ≈ q·d; the codes use the rounded d). */
static uint16_t kvq_quant_group(const float *x, int n, int type, int8_t *q) {
    float amax = 0.0f, m = 0.0f;
    for (int i = 0; i < n; i++)
        if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); m = x[i]; }
    const uint16_t d16 = ifg_f64_to_f16((double)(type == IFG_KV_FP8 ? amax / 448.0f
                                                 : type == IFG_KV_I8 ? amax / 127.0f : m / -8.0f));
    const float d = ifg_f16_to_f32(d16), id = d != 0.0f ? 1.0f / d : 0.0f;
    if (type == IFG_KV_FP8) {
        for (int i = 0; i < n; i++) q[i] = (int8_t)kvq_e4m3(x[i] * id);
        return d16;
    }
    const int lo = type == IFG_KV_I8 ? -127 : -8, hi = type == IFG_KV_I8 ? 127 : 7;
    for (int i = 0; i < n; i++) {
        float r = rintf(x[i] * id);
        q[i] = (int8_t)(r < lo ? lo : r > hi ? hi : r);
    }
    return d16;
}


/* Key row x[hd] into position r of key part kp (channel-major). */
static void kvq_put_k(uint8_t *kp, int type, const float *x, int r, int bs, int hd, int group) {
    uint8_t *codes = kp + kvq_scale_bytes(type, bs, hd, group);
    if (type == IFG_KV_F32) {
        for (int d = 0; d < hd; d++) ((float *)codes)[(size_t)d * bs + r] = x[d];
    } else if (type == IFG_KV_BF16) {
        for (int d = 0; d < hd; d++) ((uint16_t *)codes)[(size_t)d * bs + r] = ifg_f32_to_bf16(x[d]);
    } else if (type == IFG_KV_F16) {
        for (int d = 0; d < hd; d++) ((uint16_t *)codes)[(size_t)d * bs + r] = ifg_f64_to_f16((double)x[d]);
    } else {
        int8_t q[KVQ_MAX_HD];
        for (int g = 0; g < hd / group; g++)
            ((uint16_t *)kp)[(size_t)g * bs + r] = kvq_quant_group(x + g * group, group, type, q + g * group);
        for (int d = 0; d < hd; d++) {
            if (type != IFG_KV_I4) ((int8_t *)codes)[(size_t)d * bs + r] = q[d];
            else kvq_put4(codes, d, r, bs, q[d]);
        }
    }
}

/* Value row x[hd] into position r of value part vp (row-major). */
static void kvq_put_v(uint8_t *vp, int type, const float *x, int r, int bs, int hd, int group) {
    uint8_t *codes = vp + kvq_scale_bytes(type, bs, hd, group);
    if (type == IFG_KV_F32) {
        memcpy((float *)codes + (size_t)r * hd, x, (size_t)hd * sizeof(float));
    } else if (type == IFG_KV_BF16) {
        for (int d = 0; d < hd; d++) ((uint16_t *)codes)[(size_t)r * hd + d] = ifg_f32_to_bf16(x[d]);
    } else if (type == IFG_KV_F16) {
        for (int d = 0; d < hd; d++) ((uint16_t *)codes)[(size_t)r * hd + d] = ifg_f64_to_f16((double)x[d]);
    } else {
        int8_t q[KVQ_MAX_HD];
        const int ng = hd / group;
        for (int g = 0; g < ng; g++)
            ((uint16_t *)vp)[(size_t)r * ng + g] = kvq_quant_group(x + g * group, group, type, q + g * group);
        for (int d = 0; d < hd; d++) {
            if (type != IFG_KV_I4) ((int8_t *)codes)[(size_t)r * hd + d] = q[d];
            else kvq_put4(codes, r, d, hd, q[d]);
        }
    }
}

/* ---- per-channel keys: the f32 rows of a group being filled, and its quantization ----------- */
/* Key row (kv head h) of position p2 of the sequence of call row t: from this call's rows k when
 * one holds it (a sequence's rows are in position order, so t - (pos[t] - p2) first), else from
 * the stage, where an earlier call left it. */
static const float *kvq_row(const float *k, int ldk, const float *stage, int S, const int32_t *seq,
                            const int32_t *pos, int T, int t, int p2, int kv_dim, int hd, int h) {
    const int s = seq[t];
    int t2 = t - (pos[t] - p2);
    if (t2 < 0 || t2 >= T || seq[t2] != s || pos[t2] != p2)
        for (t2 = 0; t2 < T && (seq[t2] != s || pos[t2] != p2); t2++) {}
    if (t2 < T) return k + (size_t)t2 * ldk + (size_t)h * hd;
    return stage + ((size_t)s * S + (size_t)(p2 % S)) * kv_dim + (size_t)h * hd;
}

/* One channel x[0..POS) of a group: codes q (0..L), scale and min as f16 bits (kvq.h). */
static void kvq_quant_chan(const float *x, int type, uint8_t *q, uint16_t *d16, uint16_t *m16) {
    const float L = type == IFG_KV_I8C ? 255.0f : 15.0f;
    float lo = x[0], hi = x[0];
    for (int i = 1; i < IFG_KVQ_POS; i++) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    *m16 = ifg_f64_to_f16((double)lo);
    const float mn = ifg_f16_to_f32(*m16);
    *d16 = ifg_f64_to_f16((double)((hi - mn) / L));
    const float d = ifg_f16_to_f32(*d16), id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < IFG_KVQ_POS; i++) {
        const float r = rintf((x[i] - mn) * id);
        q[i] = (uint8_t)(r < 0.0f ? 0.0f : r > L ? L : r);
    }
}

/* Quantize the group ending at position p (row t of the call) of kv head h into key part kp. */
static void kvq_put_group(uint8_t *kp, int type, const float *k, int ldk, const float *stage, int S,
                          const int32_t *seq, const int32_t *pos, int T, int t, int bs, int kv_dim, int hd, int h) {
    const int g0 = pos[t] - (IFG_KVQ_POS - 1), r0 = g0 % bs, gi = r0 / IFG_KVQ_POS;
    const float *rows[IFG_KVQ_POS];
    for (int i = 0; i < IFG_KVQ_POS; i++) rows[i] = kvq_row(k, ldk, stage, S, seq, pos, T, t, g0 + i, kv_dim, hd, h);
    uint16_t *sc = (uint16_t *)kp + (size_t)gi * hd, *mn = (uint16_t *)kp + (size_t)(bs / IFG_KVQ_POS + gi) * hd;
    uint8_t *codes = kp + kvq_scale_bytes(type, bs, hd, 0);
    for (int d = 0; d < hd; d++) {
        float x[IFG_KVQ_POS];
        uint8_t q[IFG_KVQ_POS];
        for (int i = 0; i < IFG_KVQ_POS; i++) x[i] = rows[i][d];
        kvq_quant_chan(x, type, q, sc + d, mn + d);
        for (int i = 0; i < IFG_KVQ_POS; i++) {
            if (type == IFG_KV_I8C) codes[(size_t)d * bs + r0 + i] = q[i];
            else kvq_put4(codes, d, r0 + i, bs, (int8_t)(q[i] - 8));
        }
    }
}

static int kvq_stage_ok(int k_type, const float *k, const float *stage, int S) {
    return !kvq_chan(k_type) || (k && stage && S >= 2 * IFG_KVQ_POS && S % IFG_KVQ_POS == 0);
}

void ifg_kvq_store_part(void *k_cache, void *v_cache, int k_type, int v_type, int group, const float *k,
                        const float *v, int ldkv, const float *stage, int stage_rows, const int32_t *block_table,
                        int max_blocks, int block_size, const int32_t *seq, const int32_t *pos, int T,
                        int n_kv_heads, int head_dim) {
    if (!kvq_stage_ok(k_type, k, stage, stage_rows) || kvq_chan(v_type)) return;
    const size_t kpb = ifg_kvq_part_bytes(k_type, block_size, head_dim, group),
                 vpb = ifg_kvq_part_bytes(v_type, block_size, head_dim, group);
    const int chan = kvq_chan(k_type);
    /* split by kv head: two positions of one int4 key byte are never written by two threads */
    IFG_FOR
    for (int h = 0; h < n_kv_heads; h++)
        for (int t = 0; t < T; t++) {
            const int p = pos[t];
            const size_t b = (size_t)block_table[(size_t)seq[t] * max_blocks + p / block_size];
            const size_t part = b * n_kv_heads + h;
            const size_t off = (size_t)t * ldkv + (size_t)h * head_dim;
            if (!chan)
                kvq_put_k((uint8_t *)k_cache + part * kpb, k_type, k + off, p % block_size, block_size, head_dim,
                          group);
            else if (p % IFG_KVQ_POS == IFG_KVQ_POS - 1)
                kvq_put_group((uint8_t *)k_cache + part * kpb, k_type, k, ldkv, stage, stage_rows, seq, pos, T, t,
                              block_size, n_kv_heads * head_dim, head_dim, h);
            kvq_put_v((uint8_t *)v_cache + part * vpb, v_type, v + off, p % block_size, block_size, head_dim, group);
        }
}

void ifg_kvq_store(void *k_cache, void *v_cache, int k_type, int v_type, int group, const float *k,
                   const float *v, int ldkv, const float *stage, int stage_rows, const int32_t *block_table,
                   int max_blocks, int block_size, const int32_t *seq, const int32_t *pos, int T, int n_kv_heads,
                   int head_dim, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_kvq_store_part(k_cache, v_cache, k_type, v_type, group, k, v, ldkv, stage, stage_rows, block_table,
                           max_blocks, block_size, seq, pos, T, n_kv_heads, head_dim);
    }
}

void ifg_kvq_stage_part(float *stage, int stage_rows, const float *k, int ldk, const int32_t *seq,
                        const int32_t *pos, int T, int n_kv_heads, int head_dim) {
    if (stage_rows <= 0) return;
    const int kv_dim = n_kv_heads * head_dim;
    IFG_FOR /* by kv head, rows in call order: a later position of the same row slot wins */
    for (int h = 0; h < n_kv_heads; h++)
        for (int t = 0; t < T; t++)
            memcpy(stage + ((size_t)seq[t] * stage_rows + (size_t)(pos[t] % stage_rows)) * kv_dim + (size_t)h * head_dim,
                   k + (size_t)t * ldk + (size_t)h * head_dim, (size_t)head_dim * sizeof(float));
}

void ifg_kvq_stage(float *stage, int stage_rows, const float *k, int ldk, const int32_t *seq, const int32_t *pos,
                   int T, int n_kv_heads, int head_dim, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_kvq_stage_part(stage, stage_rows, k, ldk, seq, pos, T, n_kv_heads, head_dim);
    }
}

/* ---- Walsh–Hadamard rotation ----------------------------------------------------------------- */
/* One head vector: signs, butterflies of stride 1, 2, 4, … (a+b, a-b), then the 1/sqrt(n) norm.
 * The SIMD builds run the strides of a whole vector or more as vector adds; smaller strides
 * stay scalar. Every output is the same a+b / a-b chain in every build: bitwise identical. */
static void kvq_fwht(float *v, const float *signs, int n, float norm, int transpose) {
    if (!transpose)
        for (int i = 0; i < n; i++) v[i] *= signs[i];
    int len = 1;
#ifdef IFG_SIMD
    for (; len < n && len < IFG_VW; len <<= 1)
#else
    for (; len < n; len <<= 1)
#endif
        for (int i = 0; i < n; i += 2 * len)
            for (int j = i; j < i + len; j++) {
                const float a = v[j], b = v[j + len];
                v[j] = a + b;
                v[j + len] = a - b;
            }
#ifdef IFG_SIMD
    for (; len < n; len <<= 1)
        for (int i = 0; i < n; i += 2 * len)
            for (int j = i; j < i + len; j += IFG_VW) {
                const ifg_vf a = ifg_vload(v + j), b = ifg_vload(v + j + len);
                ifg_vstore(v + j, ifg_vadd(a, b));
                ifg_vstore(v + j + len, ifg_vsub(a, b));
            }
#endif
    for (int i = 0; i < n; i++) v[i] *= norm;
    if (transpose)      /* a sign flip is exact: the transpose rounds as the forward rotation does */
        for (int i = 0; i < n; i++) v[i] *= signs[i];
}

static void hadamard_rows(float *x, int ld, const float *signs, int rows, int n_heads, int head_dim, int transpose) {
    if (head_dim <= 0 || (head_dim & (head_dim - 1))) return;
    const float norm = 1.0f / sqrtf((float)head_dim);
    const long items = (long)rows * n_heads;
    IFG_FOR
    for (long it = 0; it < items; it++)
        kvq_fwht(x + (size_t)(it / n_heads) * ld + (size_t)(it % n_heads) * head_dim, signs, head_dim, norm,
                 transpose);
}

void ifg_hadamard_part(float *x, int ld, const float *signs, int rows, int n_heads, int head_dim) {
    hadamard_rows(x, ld, signs, rows, n_heads, head_dim, 0);
}

void ifg_hadamard_t_part(float *x, int ld, const float *signs, int rows, int n_heads, int head_dim) {
    hadamard_rows(x, ld, signs, rows, n_heads, head_dim, 1);
}

void ifg_hadamard(float *x, int ld, const float *signs, int rows, int n_heads, int head_dim, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_hadamard_part(x, ld, signs, rows, n_heads, head_dim);
    }
}

void ifg_hadamard_t(float *x, int ld, const float *signs, int rows, int n_heads, int head_dim, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_hadamard_t_part(x, ld, signs, rows, n_heads, head_dim);
    }
}
