/* lora.c — the low-rank part of mixed-adapter batches: scheduling over threads and fusion with
 * the base projection (the tile kernels are in lora_tiles.c).
 *
 * Two phases over all segments at once:
 *  1. shrink: the partial sums hp[c][t] = x[t][kc..kc+LO_KC) · Aᵀ for every adapted row t and
 *     k-chunk c. Units (segment, chunk of LO_RC rows, k-chunk) are split evenly over the threads
 *     in that order: in decode (a row or two per adapter) the threads split each adapter's A by
 *     k, each reading its own part of it once; in prefill they also split the rows. One
 *     worksharing loop, one barrier; in the forward pass (ifg_lora_shrink_group_part) the
 *     shrinks of the projections sharing an input (wq wk wv, w_gate w_up) join the loop that
 *     rounds that input for the base, so adapters add no barrier to a step: each cost 0.5-2 ms
 *     on this shared 2-core machine under load (a thread descheduled while the other waits),
 *     a few µs when idle. In a prefill there each thread rounds a run of rows and shrinks those
 *     rows, all k, right after (the runs split by the rows' shrink cost).
 *  2. expand y[t] += h[t]·Bᵀ (then DoRA's row factor), where h[t] = h_scale ⊙ Σ_c hp[c][t]
 *     (chunks added in order, by each thread for the rows it expands, into a stack buffer).
 *     Threads split the 16-output blocks of packed Bᵀ.
 * In the forward pass phase 2 rides on the base projection (ifg_lora_matmul_part): on the
 * interleaved int8 bases (q8_0x16 / q4_0x16) the GEMM calls the expand back (ifg_mm_epilogue)
 * for every 128 rows of a token tile as soon as they are final, so the low-rank part goes into
 * y while it is in L1 and the Bᵀ reads interleave with the base arithmetic; on other bases each
 * thread computes its rows of x·Wᵀ for a slab of LO_SLAB tokens and expands into them at once.
 * As a pass of its own, a prefill's expand re-read and re-wrote all of y (T × N floats, 23 MB
 * for TinyLlama's w_gate at T = 1024) and cost 4× its arithmetic.
 *
 * The k-chunks and tiles are fixed by the batch, not by the threads, so results are bitwise
 * identical for any thread count. Rows without an adapter are not touched. */
#include "lora_tiles.h"
#include "matmul.h"
#include "quant.h"

#define LO_RC 32       /* rows per shrink unit */
#define LO_HB 8192     /* floats of a thread's stack buffer of summed h */
#define LO_SLAB 128    /* tokens per slab of the fused projection */
#define LO_FUSE_T 16   /* rows up to which the shrinks round x themselves in the loop that rounds it */

int ifg_lora_h_rows(int T, int K) { return IFG_LORA_SETS * ((K + LO_KC - 1) / LO_KC) * T; }

static inline int lo_team(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

static inline int lo_rows(const struct ifg_lora *const *lora, const int32_t *seg_start, int s) {
    return lora[s] ? seg_start[s + 1] - seg_start[s] : 0;
}

/* x[t0..t1)[k0..k1) rounded per 32-block as ifg_quantize_x does into q/d/s (strides LO_KC,
 * LO_KC / 32), a last partial block as if zero-padded (its q past k1 zero). */
static void lo_round_x(int8_t *q, float *d, int32_t *s, const float *x, int ldx, int t0, int t1, int k0, int k1) {
    const int kf = k0 + (k1 - k0) / IFG_QK * IFG_QK; /* end of the whole blocks */
    if (kf > k0) ifg_quantize_x(q, d, s, x, ldx, t0, t1 - t0, k0, kf, LO_KC, LO_KC / IFG_QK);
    if (kf == k1) return;
    for (int t = t0; t < t1; t++) {
        float tail[IFG_QK] = {0};
        memcpy(tail, x + (size_t)t * ldx + kf, sizeof(float) * (k1 - kf));
        const size_t i = (size_t)(t - t0);
        ifg_quantize_x(q + i * LO_KC + (kf - k0), d + i * (LO_KC / IFG_QK) + (kf - k0) / IFG_QK,
                       s + i * (LO_KC / IFG_QK) + (kf - k0) / IFG_QK, tail, IFG_QK, 0, 1, 0, IFG_QK, IFG_QK, 1);
    }
}

/* One shrink unit: rows [t0, t1) of segment adapter L over [k0, k1) into its chunk's partial sums. */
static void lo_shrink_unit(float *hp, int ldh, const float *x, int ldx, const struct ifg_xq *xq,
                           const struct ifg_lora *L, int t0, int t1, int k0, int k1) {
    if (L->a_dtype != IFG_LORA_I8) {
        ifg_lora_tile_shrink(hp, ldh, x, ldx, L, t0, t1, k0, k1);
        return;
    }
    if (xq) { /* rounded once by the caller for the base's integer GEMM */
        const struct ifg_lora_xr xr = {xq->q + (size_t)t0 * xq->ldq + k0, xq->d + (size_t)t0 * xq->ldd + k0 / IFG_QK,
                                 xq->s + (size_t)t0 * xq->ldd + k0 / IFG_QK, xq->ldq, xq->ldd};
        ifg_lora_tile_shrink8(hp, ldh, &xr, L, t0, t1, k0, k1);
        return;
    }
    int8_t q[LO_RC * LO_KC] __attribute__((aligned(64)));
    float d[LO_RC * LO_KC / IFG_QK];
    int32_t s[LO_RC * LO_KC / IFG_QK];
    lo_round_x(q, d, s, x, ldx, t0, t1, k0, k1);
    const struct ifg_lora_xr xr = {q, d, s, LO_KC, LO_KC / IFG_QK};
    ifg_lora_tile_shrink8(hp, ldh, &xr, L, t0, t1, k0, k1);
}

/* Shrink units (segment, LO_RC-row chunk, k-chunk) of one projection, in that order. */
static long long lo_units(int K, const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg) {
    const int nkc = (K + LO_KC - 1) / LO_KC;
    long long units = 0;
    for (int s = 0; s < n_seg; s++) {
        const int rows = lo_rows(lora, seg_start, s);
        if (rows > 0) units += (long long)((rows + LO_RC - 1) / LO_RC) * nkc;
    }
    return units;
}

/* Units [u0, u1) of one projection's shrink, by the calling thread. */
static void lo_shrink_units(float *h, int ldh, const float *x, int ldx, int K, const struct ifg_lora *const *lora,
                            const int32_t *seg_start, int n_seg, const struct ifg_xq *xq, long long u0, long long u1) {
    const int nkc = (K + LO_KC - 1) / LO_KC;
    const size_t ttot = (size_t)seg_start[n_seg];
    long long u = 0;
    for (int s = 0; s < n_seg && u < u1; s++) {
        const int rows = lo_rows(lora, seg_start, s);
        if (rows <= 0) continue;
        for (int r0 = 0; r0 < rows && u < u1; r0 += LO_RC)
            for (int kc = 0; kc < nkc && u < u1; kc++, u++)
                if (u >= u0) {
                    const int t0 = seg_start[s] + r0, t1 = t0 + (rows - r0 < LO_RC ? rows - r0 : LO_RC);
                    const int k0 = kc * LO_KC, k1 = k0 + LO_KC < K ? k0 + LO_KC : K;
                    lo_shrink_unit(h + (size_t)kc * ttot * ldh, ldh, x, ldx, xq, lora[s], t0, t1, k0, k1);
                }
    }
}

void ifg_lora_shrink_part(float *h, int ldh, const float *x, int ldx, int K, const struct ifg_lora *const *lora,
                          const int32_t *seg_start, int n_seg, const struct ifg_xq *xq) {
    const long long units = lo_units(K, lora, seg_start, n_seg);
    if (!units) return; /* the same for every thread: no worksharing to skip */
    const int nc = lo_team();
    IFG_FOR
    for (int c = 0; c < nc; c++) /* thread c: units [u0, u1) */
        lo_shrink_units(h, ldh, x, ldx, K, lora, seg_start, n_seg, xq, units * c / nc, units * (c + 1) / nc);
}

float *ifg_lora_h_set(float *h, int ldh, int T, int K, int j) {
    return h + (size_t)j * ((K + LO_KC - 1) / LO_KC) * T * ldh;
}

/* Rows [ta, tb) of every adapted segment of one projection, all k-chunks, by the calling thread. */
static void lo_shrink_run(float *h, int ldh, const float *x, int ldx, int K, const struct ifg_lora *const *lora,
                           const int32_t *seg_start, int n_seg, const struct ifg_xq *xq, int ta, int tb) {
    const int nkc = (K + LO_KC - 1) / LO_KC;
    const size_t ttot = (size_t)seg_start[n_seg];
    for (int s = 0; s < n_seg; s++) {
        const int a = seg_start[s] > ta ? seg_start[s] : ta, c = seg_start[s + 1] < tb ? seg_start[s + 1] : tb;
        if (!lora[s] || a >= c) continue;
        for (int t0 = a; t0 < c; t0 += LO_RC) {
            const int t1 = t0 + LO_RC < c ? t0 + LO_RC : c;
            for (int kc = 0; kc < nkc; kc++) {
                const int k0 = kc * LO_KC, k1 = k0 + LO_KC < K ? k0 + LO_KC : K;
                lo_shrink_unit(h + (size_t)kc * ttot * ldh, ldh, x, ldx, xq, lora[s], t0, t1, k0, k1);
            }
        }
    }
}

/* A prefill row's share of the fused rounding and shrinks, in 64ths of an int8 multiply-add per k
 * and rank (a bf16_dp one costs 2 of them, an f32 / bf16 one 4; rounding a value of x ~12): the threads split
 * the rows by it, so rows without adapters do not leave one thread all the shrinks. */
#define LO_QCOST 12
static long long lo_seg_cost(const struct ifg_lora *const *const *sel, int n, int s) {
    long long c = LO_QCOST;
    for (int j = 0; j < n; j++)
        if (sel[j][s]) {
            const int dt = sel[j][s]->a_dtype;
            c += (long long)sel[j][s]->rank * (dt == IFG_LORA_I8 ? 1 : dt == IFG_BF16_DP ? 2 : 4);
        }
    return c;
}

/* Span s of the rows, [*a, *b), and its cost per row: s = -1 the rows before the first segment,
 * n_seg those after the last (LO_QCOST each), else segment s. */
static long long lo_span(const struct ifg_lora *const *const *sel, int n, const int32_t *seg_start, int n_seg, int T,
                         int s, int *a, int *b) {
    *a = s < 0 ? 0 : seg_start[s];
    *b = s < 0 ? seg_start[0] : s < n_seg ? seg_start[s + 1] : T;
    return s >= 0 && s < n_seg ? lo_seg_cost(sel, n, s) : LO_QCOST;
}

/* The first row t whose rows [0, t) cost at least `target`. */
static int lo_split_row(const struct ifg_lora *const *const *sel, int n, const int32_t *seg_start, int n_seg, int T,
                        long long target) {
    long long acc = 0;
    int t = 0;
    for (int s = -1; s <= n_seg; s++) {
        int a, b;
        const long long c = lo_span(sel, n, seg_start, n_seg, T, s, &a, &b);
        if (b <= a) continue;
        if (acc + c * (b - a) >= target) return a + (int)((target - acc + c - 1) / c);
        acc += c * (b - a);
        t = b;
    }
    return t;
}

void ifg_lora_shrink_group_part(float *h, int ldh, const float *x, int ldx, int T, int K,
                                const struct ifg_lora *const *const *sel, int n, const int32_t *seg_start, int n_seg,
                                const struct ifg_xq *xq) {
    const int nc = lo_team();
    if (xq && T > LO_FUSE_T) { /* a prefill: each thread rounds a run of rows of x and shrinks those
                                * same rows, reading back what it just wrote: one worksharing loop
                                * and its barrier, the one the base's rounding of x takes anyway */
        long long cost = 0;
        for (int s = -1; s <= n_seg; s++) {
            int a, b;
            const long long c = lo_span(sel, n, seg_start, n_seg, T, s, &a, &b);
            if (b > a) cost += c * (b - a);
        }
        IFG_FOR
        for (int c = 0; c < nc; c++) {
            const int ta = c ? lo_split_row(sel, n, seg_start, n_seg, T, cost * c / nc) : 0;
            const int tb = c + 1 < nc ? lo_split_row(sel, n, seg_start, n_seg, T, cost * (c + 1) / nc) : T;
            for (int t = ta; t < tb; t++)
                ifg_quantize_x(xq->q + (size_t)t * xq->ldq, xq->d + (size_t)t * xq->ldd, xq->s + (size_t)t * xq->ldd,
                               x, ldx, t, 1, 0, K, xq->ldq, xq->ldd);
            for (int j = 0; j < n; j++)
                lo_shrink_run(ifg_lora_h_set(h, ldh, T, K, j), ldh, x, ldx, K, sel[j], seg_start, n_seg, xq, ta, tb);
        }
        return;
    }
    long long units[IFG_LORA_SETS], any = xq != NULL;
    for (int j = 0; j < n; j++) any |= units[j] = lo_units(K, sel[j], seg_start, n_seg);
    if (!any) return;
    IFG_FOR
    for (int c = 0; c < nc; c++) { /* thread c: its share of x's rows and of every projection's units */
        if (xq)
            for (int t = T * c / nc; t < T * (c + 1) / nc; t++)
                ifg_quantize_x(xq->q + (size_t)t * xq->ldq, xq->d + (size_t)t * xq->ldd, xq->s + (size_t)t * xq->ldd,
                               x, ldx, t, 1, 0, K, xq->ldq, xq->ldd);
        for (int j = 0; j < n; j++) /* xq being written: int8 adapters round x themselves, alike */
            lo_shrink_units(ifg_lora_h_set(h, ldh, T, K, j), ldh, x, ldx, K, sel[j], seg_start, n_seg, NULL,
                            units[j] * c / nc, units[j] * (c + 1) / nc);
    }
}

/* hb[(t - t0) * ldh + i] = the summed, scaled h of every adapted row t in [t0, t1). */
static void lo_sum_rows(float *hb, const float *h, int ldh, int K, const struct ifg_lora *const *lora,
                        const int32_t *seg_start, int n_seg, int t0, int t1) {
    const int nkc = (K + LO_KC - 1) / LO_KC;
    for (int s = 0; s < n_seg; s++) {
        const int a = seg_start[s] > t0 ? seg_start[s] : t0, c = seg_start[s + 1] < t1 ? seg_start[s + 1] : t1;
        if (!lora[s] || a >= c) continue;
        ifg_lora_tile_sum(hb + (size_t)(a - t0) * ldh, ldh, h, ldh, nkc, (size_t)seg_start[n_seg], lora[s], a, c);
        if (lora[s]->b_dtype == IFG_LORA_I8)
            for (int t = a; t < c; t++) ifg_lora_tile_quant_h(hb + (size_t)(t - t0) * ldh, lora[s]->rank);
        else if (lora[s]->b_dtype == IFG_BF16_DP)
            for (int t = a; t < c; t++) ifg_lora_tile_round_h(hb + (size_t)(t - t0) * ldh, lora[s]->rank);
    }
}

/* y += h·Bᵀ (then DoRA) for rows [t0, t1) and outputs [n0, n1), hb as lo_sum_rows left it. */
static void lo_expand_rows(float *y, int ldy, const float *hb, int ldh, int N, const struct ifg_lora *const *lora,
                           const int32_t *seg_start, int n_seg, int t0, int t1, int n0, int n1) {
    for (int s = 0; s < n_seg; s++) {
        const int a = seg_start[s] > t0 ? seg_start[s] : t0, c = seg_start[s + 1] < t1 ? seg_start[s + 1] : t1;
        if (lora[s] && a < c)
            ifg_lora_tile_expand(y + (size_t)a * ldy, ldy, hb + (size_t)(a - t0) * ldh, ldh, lora[s], 0, c - a, n0 / LO_VB,
                      (n1 + LO_VB - 1) / LO_VB, n1 < N ? n1 : N);
    }
}

void ifg_lora_expand_rows(float *y, int ldy, const float *h, int ldh, int N, int K,
                          const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                          int t0, int t1, int n0, int n1) {
    float hb[LO_HB] __attribute__((aligned(64))); /* h of a run of rows, chunks summed and scaled */
    const int step = LO_HB / ldh;
    for (int ta = t0; ta < t1 && n0 < n1; ta += step) {
        const int tb = ta + step < t1 ? ta + step : t1;
        lo_sum_rows(hb, h, ldh, K, lora, seg_start, n_seg, ta, tb);
        lo_expand_rows(y, ldy, hb, ldh, N, lora, seg_start, n_seg, ta, tb, n0, n1);
    }
}

void ifg_lora_apply_part(float *y, int ldy, const float *x, int ldx, int N, int K,
                         const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                         float *h, int max_rank) {
    if (N <= 0) return;
    ifg_lora_shrink_part(h, max_rank, x, ldx, K, lora, seg_start, n_seg, NULL);
    const int nc = lo_team();
    IFG_FOR
    for (int c = 0; c < nc; c++) { /* thread c: whole 16-output blocks */
        int n0, n1;
        ifg_chunk(N, LO_VB, c, nc, &n0, &n1);
        ifg_lora_expand_rows(y, ldy, h, max_rank, N, K, lora, seg_start, n_seg, 0, seg_start[n_seg], n0, n1);
    }
}

/* DoRA on a residual (accumulate) goes through tmp: before the projection (back = 0) tmp gets
 * y's rows without DoRA and zero in the DoRA rows, the projection accumulates into it; after
 * it (back = 1) the rows without DoRA are copied back and the DoRA rows added to the residual.
 * A row without DoRA so gets y + x·Wᵀ + its low-rank part in the order it gets in a batch with no
 * DoRA adapter: its bits do not depend on its neighbours' adapters. */
static void lo_tmp_rows(float *tmp, int N, float *y, int ldy, const struct ifg_lora *const *lora,
                        const int32_t *seg_start, int n_seg, int t0, int t1, int r0, int r1, int back) {
    for (int s = 0; s < n_seg; s++) {
        const int a = seg_start[s] > t0 ? seg_start[s] : t0, c = seg_start[s + 1] < t1 ? seg_start[s + 1] : t1;
        const int dora = lo_rows(lora, seg_start, s) > 0 && lora[s]->dora;
        for (int t = a; t < c; t++) {
            float *yr = y + (size_t)t * ldy, *tr = tmp + (size_t)t * N;
            for (int n = r0; n < r1; n++) {
                if (!back) tr[n] = dora ? 0.0f : yr[n];
                else yr[n] = dora ? yr[n] + tr[n] : tr[n];
            }
        }
    }
}

static int lo_gcd(int a, int b) { return b ? lo_gcd(b, a % b) : a; }

/* Output rows per thread of the fused projection: whole 16-output blocks and whole row groups
 * of the base kernel. */
static int lo_row_align(int wtype) {
    const int ra = ifg_matmul_row_align(wtype);
    return ra / lo_gcd(ra, LO_VB) * LO_VB;
}

/* The expand as a GEMM epilogue (ifg_mm_epilogue): called by the x16 kernels for each group
 * pair's rows of each token tile once final, so the low-rank part goes into y while it is in
 * L1 and the Bᵀ reads interleave with the base weights' arithmetic. The summed h of the token
 * tile is kept in the thread's stack buffer across the calls of that tile. */
struct lo_epi {
    struct ifg_mm_epilogue base;
    const float *h; int ldh, N, K, n_seg;
    const struct ifg_lora *const *lora; const int32_t *seg_start;
    float *hb; int *hb_rows; /* hb_rows[0..1]: the token rows summed into hb */
};

static void lo_epi_fn(const struct ifg_mm_epilogue *b, float *y, int ldy, int t0, int t1, int n0, int n1) {
    const struct lo_epi *e = (const struct lo_epi *)b;
    if ((size_t)(t1 - t0) * e->ldh > LO_HB) { /* too many rows for the buffer: sum them per call */
        ifg_lora_expand_rows(y, ldy, e->h, e->ldh, e->N, e->K, e->lora, e->seg_start, e->n_seg, t0, t1, n0, n1);
        return;
    }
    if (e->hb_rows[0] != t0 || e->hb_rows[1] != t1) { /* a new token tile: sum its h once */
        lo_sum_rows(e->hb, e->h, e->ldh, e->K, e->lora, e->seg_start, e->n_seg, t0, t1);
        e->hb_rows[0] = t0;
        e->hb_rows[1] = t1;
    }
    lo_expand_rows(y, ldy, e->hb, e->ldh, e->N, e->lora, e->seg_start, e->n_seg, t0, t1, n0, n1);
}

void ifg_lora_matmul_part(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                          int T, int N, int K, int accumulate,
                          const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                          float *h, int max_rank, float *tmp, const struct ifg_xq *xq) {
    if (T <= 0 || N <= 0) return;
    ifg_lora_shrink_part(h, max_rank, x, ldx, K, lora, seg_start, n_seg, xq);
    ifg_lora_project_part(y, ldy, x, ldx, w, wtype, T, N, K, accumulate, lora, seg_start, n_seg, h, max_rank, tmp, xq, 1);
}

/* Thread c's rows [r0, r1) of the fused projection (ifg_lora_project_part's loop body). */
static void lo_project_rows(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                            int T, int N, int K, int accumulate,
                            const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                            float *h, int max_rank, float *tmp, const struct ifg_xq *xq, int via_tmp, int r0, int r1) {
    if (ifg_is_qx16(wtype) && !via_tmp) { /* the kernel calls the expand back, tile by tile */
        /* each expand prefetches the next one's Bᵀ (LO_PF ahead); the first one's, here, arrives
         * while the GEMM computes the first rows */
        for (int s = 0; s < n_seg; s++)
            if (lo_rows(lora, seg_start, s) > 0) {
                const struct ifg_lora *L = lora[s];
                const char *b = (const char *)L->b + (size_t)(r0 / LO_VB) * L->rank * LO_VB * LO_ES(L->b_dtype);
                for (int o = 0; o < LO_PF; o += 64) __builtin_prefetch(b + o, 0, LO_PFL);
            }
        float hb[LO_HB] __attribute__((aligned(64)));
        int hb_rows[2] = {-1, -1};
        const struct lo_epi e = {{lo_epi_fn}, h, max_rank, N, K, n_seg, lora, seg_start, hb, hb_rows};
        ifg_qmm_x16_rows(y, ldy, x, ldx, w, wtype, T, r0, r1, K, accumulate, &e.base, xq);
        return;
    }
    const int tb = ifg_matmul_token_block(wtype), TS = tb * (LO_SLAB / tb > 1 ? LO_SLAB / tb : 1);
    for (int t0 = 0; t0 < T; t0 += TS) { /* token slabs: this slab of y is still in cache */
        const int t1 = t0 + TS < T ? t0 + TS : T;
        float *yo = via_tmp ? tmp : y;
        const int ldo = via_tmp ? N : ldy;
        if (via_tmp) lo_tmp_rows(tmp, N, y, ldy, lora, seg_start, n_seg, t0, t1, r0, r1, 0);
        /* the slab's rows of x as the caller rounded them once for all threads (NULL: the GEMM
         * rounds its slab itself, in every thread) */
        const struct ifg_xq xs = xq ? (struct ifg_xq){xq->q + (size_t)t0 * xq->ldq, xq->d + (size_t)t0 * xq->ldd,
                                                      xq->s + (size_t)t0 * xq->ldd, xq->ldq, xq->ldd}
                                    : (struct ifg_xq){0};
        ifg_matmul_rows_xq(yo + (size_t)t0 * ldo, ldo, x + (size_t)t0 * ldx, ldx, w, wtype, t1 - t0, r0, r1, K,
                           accumulate, xq ? &xs : NULL);
        ifg_lora_expand_rows(yo, ldo, h, max_rank, N, K, lora, seg_start, n_seg, t0, t1, r0, r1);
        if (via_tmp) lo_tmp_rows(tmp, N, y, ldy, lora, seg_start, n_seg, t0, t1, r0, r1, 1);
    }
}

void ifg_lora_project_part(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                           int T, int N, int K, int accumulate,
                           const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                           float *h, int max_rank, float *tmp, const struct ifg_xq *xq, int wait) {
    if (T <= 0 || N <= 0) return;
    int dora = 0;
    for (int s = 0; s < n_seg; s++) dora |= lo_rows(lora, seg_start, s) > 0 && lora[s]->dora;
    /* rows per thread: whole 16-output blocks and whole row groups of the base kernel */
    const int align = lo_row_align(wtype);
    const int via_tmp = accumulate && dora; /* DoRA scales the projection, not the residual */
    const int nc = lo_team();
    IFG_FOR_NOWAIT
    for (int c = 0; c < nc; c++) {
        int r0, r1;
        ifg_chunk(N, align, c, nc, &r0, &r1);
        if (r0 < r1) lo_project_rows(y, ldy, x, ldx, w, wtype, T, N, K, accumulate, lora, seg_start, n_seg,
                                     h, max_rank, tmp, xq, via_tmp, r0, r1);
    }
    ifg_wait_if(wait || via_tmp); /* tmp is shared scratch: a projection through it always waits */
}

void ifg_lora_apply(float *y, int ldy, const float *x, int ldx, int N, int K,
                    const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                    float *h, int max_rank, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_lora_apply_part(y, ldy, x, ldx, N, K, lora, seg_start, n_seg, h, max_rank);
    }
}

void ifg_lora_matmul(float *y, int ldy, const float *x, int ldx, const void *w, int wtype,
                     int T, int N, int K, int accumulate,
                     const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                     float *h, int max_rank, float *tmp, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_lora_matmul_part(y, ldy, x, ldx, w, wtype, T, N, K, accumulate, lora, seg_start, n_seg, h, max_rank, tmp,
                             NULL);
    }
}

