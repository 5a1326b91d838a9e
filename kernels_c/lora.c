/* lora.c — the low-rank part of mixed-adapter batches.
 *
 * For each segment of rows that share an adapter: shrink h = x·Aᵀ (rank outputs per row), then
 * expand y += h·Bᵀ, both with the matmul kernels (so every weight dtype and ISA path is covered
 * and the work is split over threads by output rows), then the DoRA row scaling. Rows without an
 * adapter are skipped: the base projection, computed once for the whole batch, is all they get. */
#include "lora.h"
#include "matmul.h"

void ifg_lora_apply_part(float *y, int ldy, const float *x, int ldx, int N, int K,
                         const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                         float *h, int max_rank) {
    for (int s = 0; s < n_seg; s++) {
        const struct ifg_lora *L = lora[s];
        int t0 = seg_start[s], n = seg_start[s + 1] - t0;
        if (!L || n <= 0) continue;
        float *hs = h + (size_t)t0 * max_rank;
        float *ys = y + (size_t)t0 * ldy;
        ifg_matmul_part(hs, max_rank, x + (size_t)t0 * ldx, ldx, L->a, L->a_dtype, n, L->rank, K, 0);
        ifg_matmul_part(ys, ldy, hs, max_rank, L->b, L->b_dtype, n, N, L->rank, 1);
        if (L->dora) {
            IFG_FOR
            for (int t = 0; t < n; t++) {
                float *row = ys + (size_t)t * ldy;
                for (int j = 0; j < N; j++) row[j] *= L->dora[j];
            }
        }
    }
}

void ifg_lora_apply(float *y, int ldy, const float *x, int ldx, int N, int K,
                    const struct ifg_lora *const *lora, const int32_t *seg_start, int n_seg,
                    float *h, int max_rank, int n_threads) {
    IFG_PARALLEL(n_threads) {
        ifg_lora_apply_part(y, ldy, x, ldx, N, K, lora, seg_start, n_seg, h, max_rank);
    }
}
