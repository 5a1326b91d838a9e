/* peak.h — the machine's instruction throughput: the compute ceiling kernels are measured against. */
#ifndef IFG_PEAK_H
#define IFG_PEAK_H

#include "core.h"

// cdef-begin
/* The instructions the kernels' inner loops are built from (register width as named). */
enum ifg_peak_op { IFG_PEAK_VPDPBUSD_ZMM = 0, IFG_PEAK_VDPBF16PS_ZMM = 1, IFG_PEAK_VFMADD_ZMM = 2,
                   IFG_PEAK_VFMADD_YMM = 3, IFG_PEAK_VPMADDUBSW_YMM = 4, IFG_PEAK_N_OPS = 5 };
/* Issue op `rounds` x 16 times on each of n_threads threads, as 16 independent register chains
 * (enough to hide its latency, so only its throughput bounds the loop). Returns the instructions
 * issued by all threads, or 0 when this build cannot issue op (the scalar build issues none). */
long long ifg_peak(int op, long long rounds, int n_threads);
// cdef-end

#endif
