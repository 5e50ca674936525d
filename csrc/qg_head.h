/*
 * qg_head.h - the QAConv head: scalar BatchNorm -> fc -> scalar BatchNorm, forward and backward.
 *
 * Input x = concat(mp, mg) per pair: mp, mg are [M, S] (M pairs), 2S values per pair.
 *   bn:       y = bn_weight * (x - mean1) / sqrt(var1 + eps) + bn_bias, one mean/var over all M*2S values
 *   fc:       separate (shared == 0): z[m] = sum_j fc_weight[j] * y[m, j] + fc_bias, fc_weight [2S]
 *             shared   (shared == 1): z[m] = sum_s fc_weight[s] * (y[m, s] + y[m, S+s]) + 2 * fc_bias
 *   logit_bn: out = lbn_weight * (z - mean2) / sqrt(var2 + eps) + lbn_bias, one mean/var over M values
 * Weighted statistics (training only): with p->pair_weight = w [M] (finite, >= 0, sum > 0) both batch
 * statistics are weighted means over the pairs (pair m's 2S values each count w[m]; the biased
 * variance divides by the weight total), and the backward differentiates through those weighted
 * statistics. A restricted step whose sampled candidates stand for the classes it does not score uses
 * it to estimate the statistics of the full candidate set. NULL (or all ones) is the unweighted head,
 * bit for bit.
 * Training mode uses batch statistics (biased variance for normalisation) and reports them in
 * qg_head_stats; the caller updates running statistics (PyTorch BatchNorm1d semantics).
 * Eval mode uses the running statistics in qg_head_params.
 * Statistics are accumulated in double over fixed chunks: bit-identical for any thread count.
 *
 * Layout: mp, mg, gmp, gmg are C-contiguous [M, S] float32 (row m = pair m); fc_weight is
 * [2S] (separate: first S for mp) or [S] (shared). Outputs must not alias inputs.
 * Threading: row blocks of a size fixed by (M, S) alone (>= QG_CHUNK values, at most 256 blocks),
 * per-block double partials combined in block order; the logit_bn part is O(M) and serial.
 * Precision: all sums and the fc dot products in double; outputs rounded to float32 once.
 * Errors: QG_EINVAL (M < 1, M < 2 in training/backward, S < 1, eps <= 0, non-finite parameters,
 * running_var + eps <= 0 in eval, a pair weight < 0 or non-finite, or weights summing to 0), QG_ENONFINITE (NaN/Inf reached the statistics or outputs),
 * QG_ENOMEM, QG_EINTR (poll asked to stop; outputs are then unspecified).
 */
#ifndef QG_HEAD_H
#define QG_HEAD_H
#include "qg_common.h"
#ifdef __cplusplus
extern "C" {
#endif

typedef struct qg_head_params {
    int shared;                 /* 0: fc "separate" (2S -> 1); 1: fc "shared" (S -> 1 per half) */
    float eps;                  /* BatchNorm eps (1e-5) */
    float bn_weight, bn_bias, bn_running_mean, bn_running_var;
    const float *fc_weight;     /* [2S] (separate) or [S] (shared) */
    float fc_bias;
    float lbn_weight, lbn_bias, lbn_running_mean, lbn_running_var;
    const float *pair_weight;   /* [M] statistics weights, training forward / backward only; NULL: all 1 */
} qg_head_params;

typedef struct qg_head_stats {
    double mean1, var1;         /* bn batch mean and biased variance over M*2S values */
    double mean2, var2;         /* logit_bn batch mean and biased variance over M values */
} qg_head_stats;

typedef struct qg_head_grads {
    double bn_weight, bn_bias, fc_bias, lbn_weight, lbn_bias;
    float *fc_weight;           /* out: [2S] or [S], caller-allocated */
} qg_head_grads;

/* Training forward. z: [M] out (fc output, kept for backward); out: [M] logits; st: batch stats.
 * Requires M >= 2 (logit_bn needs more than one value), else QG_EINVAL. */
int qg_head_forward_train_f32(const float *mp, const float *mg, int64_t M, int64_t S,
                              const qg_head_params *p, float *z, float *out,
                              qg_head_stats *st, const qg_ctx *ctx);

/* Eval forward with running statistics. out: [M]. */
int qg_head_forward_eval_f32(const float *mp, const float *mg, int64_t M, int64_t S,
                             const qg_head_params *p, float *out, const qg_ctx *ctx);

/* Backward of the training forward. gout: [M] dL/dout. gmp, gmg: [M, S] out. g: parameter grads
 * (double scalars; fc_weight float32). st must be the statistics the forward returned. z is not read
 * (may be NULL): the fc output is recomputed in double from mp, mg, bit-identical to the forward.
 * Maths: g->bn_bias, g->fc_bias are 0 up to rounding (the batch-statistics logit_bn cancels them);
 * g->lbn_bias = sum(gout), which is 0 for shift-invariant losses. */
int qg_head_backward_f32(const float *mp, const float *mg, int64_t M, int64_t S,
                         const qg_head_params *p, const qg_head_stats *st, const float *z,
                         const float *gout, float *gmp, float *gmg, qg_head_grads *g,
                         const qg_ctx *ctx);

/* Scalar references (single thread, double accumulation, textbook formulas with explicit
 * y = bn(x)): same contracts; fallback and test oracle. The eval reference was added by the head
 * family (no prototype was in the skeleton). */
int qg_head_forward_eval_ref_f32(const float *mp, const float *mg, int64_t M, int64_t S,
                                 const qg_head_params *p, float *out, const qg_ctx *ctx);
int qg_head_forward_train_ref_f32(const float *mp, const float *mg, int64_t M, int64_t S,
                                  const qg_head_params *p, float *z, float *out,
                                  qg_head_stats *st, const qg_ctx *ctx);
int qg_head_backward_ref_f32(const float *mp, const float *mg, int64_t M, int64_t S,
                             const qg_head_params *p, const qg_head_stats *st, const float *z,
                             const float *gout, float *gmp, float *gmg, qg_head_grads *g,
                             const qg_ctx *ctx);

#ifdef __cplusplus
}
#endif
#endif
