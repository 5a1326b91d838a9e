/* peak.c — instruction-throughput probe (see peak.h). Written as inline assembly: a compiler
 * given intrinsics is free to schedule, spill or fold the chains, and then the loop measures the
 * compiler, not the core (an intrinsic version read half this machine's vpdpbusd rate). */
#include "peak.h"

/* One round: the instruction on 16 accumulators A0..A15 from two sources S, T. */
#define PK16(ins, p, s, t)                                                                              \
    ins " %%" s ", %%" t ", %%" p "0\n\t" ins " %%" s ", %%" t ", %%" p "1\n\t"                        \
    ins " %%" s ", %%" t ", %%" p "2\n\t" ins " %%" s ", %%" t ", %%" p "3\n\t"                        \
    ins " %%" s ", %%" t ", %%" p "4\n\t" ins " %%" s ", %%" t ", %%" p "5\n\t"                        \
    ins " %%" s ", %%" t ", %%" p "6\n\t" ins " %%" s ", %%" t ", %%" p "7\n\t"                        \
    ins " %%" s ", %%" t ", %%" p "8\n\t" ins " %%" s ", %%" t ", %%" p "9\n\t"                        \
    ins " %%" s ", %%" t ", %%" p "10\n\t" ins " %%" s ", %%" t ", %%" p "11\n\t"                      \
    ins " %%" s ", %%" t ", %%" p "12\n\t" ins " %%" s ", %%" t ", %%" p "13\n\t"                      \
    ins " %%" s ", %%" t ", %%" p "14\n\t" ins " %%" s ", %%" t ", %%" p "15\n\t"
#define PK_CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
                   "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc"
/* zmm: accumulators zmm0-15, sources zmm16/17 (AVX-512 only). */
#define PK_LOOP_ZMM(ins, n)                                                                             \
    __asm__ volatile("vpxord %%zmm16, %%zmm16, %%zmm16\n\tvpxord %%zmm17, %%zmm17, %%zmm17\n\t"       \
                     "1:\n\t" PK16(ins, "zmm", "zmm16", "zmm17") "dec %0\n\tjnz 1b\n\t"                \
                     : "+r"(n) : : PK_CLOBBER, "xmm16", "xmm17")
/* ymm: the two sources are two of the 16 registers, so 14 chains take the other 14 and two more
 * reuse ymm0/ymm1 (still independent of the sources). vpmaddubsw writes, not accumulates: its
 * chains are only output dependencies, which the core renames away. */
#define PK14Y(ins)                                                                                      \
    ins " %%ymm14, %%ymm15, %%ymm0\n\t" ins " %%ymm14, %%ymm15, %%ymm1\n\t"                           \
    ins " %%ymm14, %%ymm15, %%ymm2\n\t" ins " %%ymm14, %%ymm15, %%ymm3\n\t"                           \
    ins " %%ymm14, %%ymm15, %%ymm4\n\t" ins " %%ymm14, %%ymm15, %%ymm5\n\t"                           \
    ins " %%ymm14, %%ymm15, %%ymm6\n\t" ins " %%ymm14, %%ymm15, %%ymm7\n\t"                           \
    ins " %%ymm14, %%ymm15, %%ymm8\n\t" ins " %%ymm14, %%ymm15, %%ymm9\n\t"                           \
    ins " %%ymm14, %%ymm15, %%ymm10\n\t" ins " %%ymm14, %%ymm15, %%ymm11\n\t"                         \
    ins " %%ymm14, %%ymm15, %%ymm12\n\t" ins " %%ymm14, %%ymm15, %%ymm13\n\t"                         \
    ins " %%ymm14, %%ymm15, %%ymm0\n\t" ins " %%ymm14, %%ymm15, %%ymm1\n\t"
#define PK_LOOP_YMM(ins, n)                                                                             \
    __asm__ volatile("vpxor %%ymm14, %%ymm14, %%ymm14\n\tvpxor %%ymm15, %%ymm15, %%ymm15\n\t"         \
                     "1:\n\t" PK14Y(ins) "dec %0\n\tjnz 1b\n\t" : "+r"(n) : : PK_CLOBBER)

/* Rounds of op on this thread; 0 when this build has no such instruction. */
static long long peak_thread(int op, long long rounds) {
    long long n = rounds;
    if (rounds <= 0) return 0;
    switch (op) {
#if defined(IFG_AVX512) && defined(__AVX512VNNI__)
    case IFG_PEAK_VPDPBUSD_ZMM: PK_LOOP_ZMM("vpdpbusd", n); return rounds;
#endif
#if defined(IFG_AVX512) && defined(__AVX512BF16__)
    case IFG_PEAK_VDPBF16PS_ZMM: PK_LOOP_ZMM("vdpbf16ps", n); return rounds;
#endif
#if defined(IFG_AVX512)
    case IFG_PEAK_VFMADD_ZMM: PK_LOOP_ZMM("vfmadd231ps", n); return rounds;
#endif
#if defined(IFG_AVX2) || defined(IFG_AVX512)
    case IFG_PEAK_VFMADD_YMM: PK_LOOP_YMM("vfmadd231ps", n); return rounds;
    case IFG_PEAK_VPMADDUBSW_YMM: PK_LOOP_YMM("vpmaddubsw", n); return rounds;
#endif
    default: (void)n; return 0;
    }
}

long long ifg_peak(int op, long long rounds, int n_threads) {
    long long total = 0;
    if (op < 0 || op >= IFG_PEAK_N_OPS) return 0;
    IFG_PARALLEL(n_threads) {
        const long long done = peak_thread(op, rounds);
        IFG_PRAGMA(omp atomic)
        total += done;
    }
    return 16 * total;
}
