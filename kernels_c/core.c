/* core.c — identity of this build and the CPU it runs on. */
#include "core.h"
#include <cpuid.h>

#ifndef IFG_BUILD_ISA
#define IFG_BUILD_ISA "scalar"
#endif

const char *ifg_isa(void) { return IFG_BUILD_ISA; }
int ifg_default_threads(void) { return ifg_threads(0); }

static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

void ifg_cpu_detect(struct ifg_cpu *c) {
    memset(c, 0, sizeof *c);
    unsigned a, b, cx, d;
    if (!__get_cpuid(1, &a, &b, &cx, &d)) return;
    int osxsave = (cx >> 27) & 1, fma = (cx >> 12) & 1, f16c = (cx >> 29) & 1;
    if (!osxsave) return;
    uint64_t xcr0 = xgetbv0();
    int os_avx = (xcr0 & 0x6) == 0x6;              /* XMM and YMM state */
    int os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0; /* opmask, ZMM_Hi256, Hi16_ZMM */
    if (!os_avx || __get_cpuid_max(0, 0) < 7) return;
    __cpuid_count(7, 0, a, b, cx, d);
    c->avx2 = (b >> 5) & 1;
    c->fma = fma;
    c->f16c = f16c;
    if (os_avx512) {
        c->avx512f = (b >> 16) & 1;
        c->avx512dq = (b >> 17) & 1;
        c->avx512bw = (b >> 30) & 1;
        c->avx512vl = (b >> 31) & 1;
        c->avx512vnni = (cx >> 11) & 1;
    }
    __cpuid_count(7, 1, a, b, cx, d);
    c->avxvnni = (a >> 4) & 1;
    if (os_avx512) c->avx512bf16 = (a >> 5) & 1;
}

/* The default prefetch level (core.h): L2 on AMD family 19h (Zen 3/4), measured on a Zen 4. */
static int cpu_prefetch_level(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return 1;
    const int amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u; /* "AuthenticAMD" */
    if (!amd || !__get_cpuid(1, &a, &b, &c, &d)) return 1;
    const unsigned family = ((a >> 8) & 0xf) + (((a >> 8) & 0xf) == 0xf ? (a >> 20) & 0xff : 0);
    return family == 0x19 ? 2 : 1;
}

/* 0: not chosen yet. Relaxed atomics: kernel threads read it while another may set it, and
 * threads racing to choose store the same value. */
static int prefetch_level;
void ifg_set_prefetch_level(int level) {
    __atomic_store_n(&prefetch_level, level == 1 || level == 2 ? level : 0, __ATOMIC_RELAXED);
}
int ifg_prefetch_level(void) {
    int level = __atomic_load_n(&prefetch_level, __ATOMIC_RELAXED);
    if (!level) {
        level = cpu_prefetch_level();
        __atomic_store_n(&prefetch_level, level, __ATOMIC_RELAXED);
    }
    return level;
}
