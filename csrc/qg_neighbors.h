/*
 * qg_neighbors.h - class-neighbour kNN (cosine similarity between flattened class embeddings).
 */
#ifndef QG_NEIGHBORS_H
#define QG_NEIGHBORS_H
#include "qg_common.h"
#ifdef __cplusplus
extern "C" {
#endif

/*
 * For each of the N rows of E ([N, D] row-major float32, not modified, need not be normalised),
 * find the k most cosine-similar OTHER rows (self excluded by index).
 *   idx: [N, k] int64 out, sorted by decreasing similarity; ties go to the lower index.
 *   sim: [N, k] float32 out or NULL.
 * Rows are L2-normalised implicitly (x / max(||x||, 1e-12)); a zero row has similarity 0 to all.
 * Memory beyond the inputs: O(N + N*k + blocks); the N x N matrix is never formed. Each block
 * pair (I, J), I <= J, is computed once and feeds the top-k of both I's and J's rows.
 * Precision: float32 products summed in float32 over D-panels of 256 columns, panels summed in
 * double, then (float)(dot * (w_i * w_j)) with w = 1 / max(||x||, 1e-12) from double norms (rows
 * are prescaled by exact powers of two, so |x| up to FLT_MAX does not overflow). The order and the
 * tie rule apply to these returned float32 values; a pair's value is computed once, so it is the
 * same bits in both rows' lists.
 * Requires 1 <= k <= N-1. Bit-identical for any thread count. Polls ctx between blocks.
 * Returns QG_EINVAL for bad sizes, QG_ENONFINITE if E holds NaN/Inf, QG_ENOMEM, QG_EINTR.
 */
int qg_neighbors_topk_f32(const float *E, int64_t N, int64_t D, int64_t k,
                          int64_t *idx, float *sim, const qg_ctx *ctx);

/* Scalar reference (single thread, straightforward loops, double accumulation): same contract. */
int qg_neighbors_topk_ref_f32(const float *E, int64_t N, int64_t D, int64_t k,
                              int64_t *idx, float *sim, const qg_ctx *ctx);

#ifdef __cplusplus
}
#endif
#endif
