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
 * Memory beyond the inputs: O(N + N*k + threads * block scratch + (N/block)^2 / 2 bytes); the
 * N x N matrix is never formed. Each block pair (I, J), I <= J, is computed once and feeds the
 * top-k of both I's and J's rows.
 * Precision: float32 products summed in float32 over D-panels of 256 columns (in d order, one
 * chain per pair), then the panel sums added in d order -- in double on the portable path, in
 * float32 on the AVX2 and AVX-512 paths (multiply-adds fused there) -- then (float)(dot * (w_i * w_j)) with
 * w = 1 / max(||x||, 1e-12) from double norms (rows are prescaled by exact powers of two, so
 * |x| up to FLT_MAX does not overflow). Error of the cosine: <= 256 * 2^-24 (portable) or
 * (256 + D/256) * 2^-24 (AVX2 / AVX-512) times sum_d |x_d y_d| / (||x|| ||y||) <= 1, i.e. <= 1.5e-5 /
 * 2.1e-5 (D = 25,088) in the worst case, ~1e-7 typically; tests use rtol 1e-5 / atol 1e-6.
 * The order and the tie rule apply to these returned float32 values; a pair's value is computed
 * once, so it is the same bits in both rows' lists.
 * Threads: ctx->n_threads at most, fewer for small problems; ISA: ctx->isa picks the variant
 * (AVX-512 when >= QG_ISA_AVX512, AVX2+FMA when >= QG_ISA_AVX2 on x86-64, else portable C); the
 * AVX2 and AVX-512 variants give the same bits (the same FMA chain per pair), the portable one may
 * differ from them in the last bits; never between thread counts.
 * Requires 1 <= k <= N-1. Bit-identical for any thread count. Polls ctx between blocks.
 * Returns QG_EINVAL for bad sizes, QG_ENONFINITE if E holds NaN/Inf, QG_ENOMEM, QG_EINTR.
 */
int qg_neighbors_topk_f32(const float *E, int64_t N, int64_t D, int64_t k,
                          int64_t *idx, float *sim, const qg_ctx *ctx);

/* Scalar reference (single thread, straightforward loops, double accumulation): same contract. */
int qg_neighbors_topk_ref_f32(const float *E, int64_t N, int64_t D, int64_t k,
                              int64_t *idx, float *sim, const qg_ctx *ctx);

/*
 * Cross-block top-k between two disjoint row sets of one class table (the off-diagonal block of
 * qg_neighbors_topk_f32, for a table sharded over processes): A [na, D] holds the rows with global
 * ids a_id0 .. a_id0 + na - 1, B [nb, D] those with ids b_id0 .. b_id0 + nb - 1 (row-major float32,
 * not modified, need not be normalised; the id ranges must not overlap). For each row of A its
 * ka most similar rows of B, and for each row of B its kb most similar rows of A; A x A and B x B
 * are never computed.
 *   idx_a: [na, ka] int64 out, global ids of B's rows; sim_a: [na, ka] float32 out or NULL.
 *   idx_b: [nb, kb] int64 out, global ids of A's rows; sim_b: [nb, kb] float32 out or NULL.
 * Requires na, nb >= 1, 1 <= ka <= nb, 1 <= kb <= na (the caller clips k), a_id0, b_id0 >= 0.
 * Order and tie rule as qg_neighbors_topk_f32: decreasing similarity, ties to the lower global id.
 * Exactness: on the same ISA variant every similarity has the same float32 bits as
 * qg_neighbors_topk_f32 gives that pair on the concatenated table (the per-row prescale and
 * weight depend on the row only, the dot product is summed over the same QG_NB_PANEL-column
 * panels in d order whatever side a row is on, and the epilogue is symmetric), so merging the
 * lists of the diagonal and cross blocks of a partition under (sim desc, id asc) reproduces the
 * single-table result exactly. Same error budget as qg_neighbors_topk_f32.
 * Memory beyond the inputs and outputs: O(na + nb) + threads * block scratch + one byte per block
 * pair. Threads: ctx->n_threads at most, and at most the number of blocks of the shorter side
 * (each block pair holds one block of each side, so every list has one writer at a time).
 * Bit-identical for any thread count. Polls ctx between blocks.
 * Returns QG_EINVAL for bad sizes / overlapping ids, QG_EOVERFLOW, QG_ENONFINITE if A or B holds
 * NaN/Inf, QG_ENOMEM, QG_EINTR.
 */
int qg_neighbors_cross_topk_f32(const float *A, int64_t na, int64_t a_id0, const float *B, int64_t nb,
                                int64_t b_id0, int64_t D, int64_t ka, int64_t *idx_a, float *sim_a, int64_t kb,
                                int64_t *idx_b, float *sim_b, const qg_ctx *ctx);

/* Scalar reference of qg_neighbors_cross_topk_f32 (single thread, double accumulation, as
 * qg_neighbors_topk_ref_f32, whose similarity bits it reproduces pair by pair): same contract. */
int qg_neighbors_cross_topk_ref_f32(const float *A, int64_t na, int64_t a_id0, const float *B, int64_t nb,
                                    int64_t b_id0, int64_t D, int64_t ka, int64_t *idx_a, float *sim_a,
                                    int64_t kb, int64_t *idx_b, float *sim_b, const qg_ctx *ctx);

/*
 * Benchmark helper (single thread): `iters` iterations of 12 independent multiply-add chains on
 * the widest vectors of the path chosen by ctx->isa (AVX-512: 12 zmm FMA chains; AVX2: 12 ymm FMA
 * chains, the shape of the 6x16 micro-kernel; portable: what the compiler makes of 12 x 8 float chains). Returns the
 * floating-point operations done (2 per lane and step), so flops / wall time is the measured
 * per-core peak. *sink receives a result-dependent value (keeps the loop alive); may be NULL.
 */
double qg_neighbors_fma_probe(int64_t iters, const qg_ctx *ctx, float *sink);

#ifdef __cplusplus
}
#endif
#endif
