/* core.h — what every kernel family shares: dtypes, ISA selection macros, scalar
 * conversions. Kernels take pointers, sizes and strides; they allocate nothing. */
#ifndef IFG_CORE_H
#define IFG_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define IFG_AVX512 1
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define IFG_AVX2 1
#endif
#if defined(IFG_AVX2) || defined(IFG_AVX512)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

// cdef-begin
/* Element types of weight tensors (activations are always f32). */
/* IFG_Q8_0 / IFG_Q4_0 / IFG_Q5_0: GGUF-compatible 32-blocks (34 / 18 / 22 bytes), matmul
 * weights and embedding tables (quant.h). */
/* IFG_Q8_0X16 / IFG_Q4_0X16: the same blocks repacked 16 rows at a time for the kernels (quant.h). */
/* IFG_Q4_K / IFG_FP8: GGUF Q4_K 256-super-blocks (144 bytes), E4M3 32-blocks with a bf16 scale
 * (34 bytes), matmul weights only (quant_k.h). IFG_Q4_KX16: q4_k repacked 16 rows at a time (quant_k.h). */
/* IFG_Q4_1 / IFG_Q5_1: GGUF 32-blocks with a scale and a minimum (20 / 24 bytes); IFG_Q6_K /
 * IFG_Q5_K: GGUF Q6_K / Q5_K 256-super-blocks (210 / 176 bytes); matmul weights and embedding
 * tables (quant_gguf.h).
 * IFG_Q4_1X16 / IFG_Q6_KX16 / IFG_Q5_KX16 / IFG_Q5_1X16: q4_1 / q6_k / q5_k / q5_1 repacked 16 rows
 * at a time for the kernels (quant_gguf.h). */
enum ifg_dtype { IFG_F32 = 0, IFG_BF16 = 1, IFG_F16 = 2, IFG_Q8_0 = 3, IFG_Q4_0 = 4,
                 IFG_Q8_0X16 = 5, IFG_Q4_0X16 = 6, IFG_Q4_K = 7, IFG_FP8 = 8, IFG_Q4_KX16 = 9,
                 IFG_Q5_0 = 10, IFG_Q4_1 = 11, IFG_Q5_1 = 12,
                 IFG_Q6_K = 13, IFG_Q4_1X16 = 14, IFG_Q5_K = 15,
                 IFG_Q6_KX16 = 16, IFG_Q5_KX16 = 17, IFG_Q5_1X16 = 18 };

/* Which variant this library is: "scalar", "avx2" or "avx512". */
const char *ifg_isa(void);
/* How many OpenMP threads a kernel call with n_threads = 0 would use. */
int ifg_default_threads(void);
/* CPU features from cpuid, with xgetbv to check that the OS saves the wide registers. */
struct ifg_cpu {
    int avx2, fma, f16c, avx512f, avx512bw, avx512vl, avx512dq, avx512vnni, avx512bf16, avxvnni;
};
void ifg_cpu_detect(struct ifg_cpu *out);
/* Which cache the decode GEMVs' software prefetches fill: 1 = L1 (prefetcht0), 2 = L2
 * (prefetcht1). The CPU decides by default (2 on AMD family 19h, where prefetcht0 cut the
 * DRAM rate of the GEMVs 1.2-1.7x; 1 elsewhere: Zen 5 is 3-14 % faster with it); level 0
 * restores that default. */
void ifg_set_prefetch_level(int level);
int ifg_prefetch_level(void);
// cdef-end

/* OpenMP pragmas as macros so the scalar reference reads cleanly. A public kernel opens a
 * parallel region with IFG_PARALLEL(n); its work is split with orphaned `omp for`
 * (schedule(static): the same thread count always gives the same split, so results are
 * deterministic). Called inside the forward pass's own region, the same body joins it. */
#define IFG_PRAGMA(x) _Pragma(#x)
#define IFG_PARALLEL(n) IFG_PRAGMA(omp parallel num_threads(ifg_threads(n)))
#define IFG_FOR IFG_PRAGMA(omp for schedule(static))
#define IFG_FOR_NOWAIT IFG_PRAGMA(omp for schedule(static) nowait)
#define IFG_BARRIER IFG_PRAGMA(omp barrier)
#define IFG_SINGLE IFG_PRAGMA(omp single)
/* The closing barrier of an IFG_FOR_NOWAIT loop, when the caller's next step needs it (the
 * same for every thread: an omp for's implicit barrier, made optional). */
static inline void ifg_wait_if(int wait) {
    if (wait) {
        IFG_BARRIER
    }
}

static inline int ifg_threads(int n) {
#ifdef _OPENMP
    return n > 0 ? n : omp_get_max_threads();
#else
    (void)n; return 1;
#endif
}

/* Work a GEMM hands back while its output is in cache: once rows [n0, n1) of tokens [t0, t1)
 * of y are final (after the last k-block), fn(e, y, ldy, ...) may update them in place. The
 * fused LoRA projection adds the low-rank part this way (lora.c). */
struct ifg_mm_epilogue {
    void (*fn)(const struct ifg_mm_epilogue *e, float *y, int ldy, int t0, int t1, int n0, int n1);
};

/* Rows [*lo, *hi) of chunk c out of nc: N split in groups of `align` rows, groups spread evenly
 * over the chunks (how kernels split output rows among threads). */
static inline void ifg_chunk(int N, int align, int c, int nc, int *lo, int *hi) {
    long long ng = ((long long)N + align - 1) / align;
    long long r0 = ng * c / nc * align, r1 = ng * (c + 1) / nc * align;
    *lo = (int)(r0 < N ? r0 : N);
    *hi = (int)(r1 < N ? r1 : N);
}

/* bf16 is the top half of an f32. Round-to-nearest-even on the way in. */
static inline float ifg_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t ifg_f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
/* IEEE half → f32, exact for every input (subnormals, inf, NaN). */
static inline float ifg_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);
    else if (exp != 0) u = sign | ((exp + 112u) << 23) | (man << 13);
    else if (man == 0) u = sign;
    else { /* subnormal: normalise */
        int e = -1; do { e++; man <<= 1; } while (!(man & 0x400u));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f; memcpy(&f, &u, 4); return f;
}
/* double → IEEE half, round to nearest even (overflow → inf; never NaN here); of an f32, the
 * same as numpy's float32 → float16 (one rounding from the exact value). For the quantizers. */
static inline uint16_t ifg_f64_to_f16(double v) {
    uint64_t u;
    memcpy(&u, &v, 8);
    const uint16_t sign = (uint16_t)((u >> 48) & 0x8000u);
    const uint64_t a = u & 0x7fffffffffffffffull;
    if (a >= 0x7ff0000000000000ull) return sign | 0x7c00u | (a > 0x7ff0000000000000ull ? 0x200u : 0u);
    if (a < 0x0010000000000000ull) return sign; /* zero or a double subnormal: far below half's range */
    const int e = (int)(a >> 52) - 1023;
    if (e > 15) return sign | 0x7c00u;
    const uint64_t m = (a & 0x000fffffffffffffull) | 0x0010000000000000ull; /* 53 significant bits */
    const int shift = e >= -14 ? 42 : 28 - e;                                  /* bits dropped */
    if (shift > 63) return sign;
    uint64_t q = m >> shift;
    const uint64_t rem = m & ((1ull << shift) - 1), half = 1ull << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q++;
    if (e >= -14) /* q in [1024, 2048]: 2048 carries into the exponent (up to inf), as it should */
        return sign | (uint16_t)(((uint32_t)(e + 15) << 10) + (uint32_t)(q - 1024));
    return sign | (uint16_t)q; /* subnormal (q == 1024 is the smallest normal, also right) */
}
/* Load one weight element of any dtype as f32 (scalar paths only). */
static inline float ifg_load_f32(const void *w, int dtype, size_t i) {
    switch (dtype) {
    case IFG_BF16: return ifg_bf16_to_f32(((const uint16_t *)w)[i]);
    case IFG_F16:  return ifg_f16_to_f32(((const uint16_t *)w)[i]);
    default:       return ((const float *)w)[i];
    }
}
static inline size_t ifg_dtype_size(int dtype) { return dtype == IFG_F32 ? 4 : 2; }

#endif
