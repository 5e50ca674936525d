/*
 * qg_head.h - the QAConv head: scalar BatchNorm -> fc -> scalar BatchNorm, forward and backward.
 *
 * Input x = concat(mp, mg) per pair: mp, mg are [M, S] (M pairs), 2S values per pair.
 *   bn:       y = bn_weight * (x - mean1) / sqrt(var1 + eps) + bn_bias, one mean/var over all M*2S values
 *   fc:       separate (shared == 0): z[m] = sum_j fc_weight[j] * y[m, j] + fc_bias, fc_weight [2S]
 *             shared   (shared == 1): z[m] = sum_s fc_weight[s] * (y[m, s] + y[m, S+s]) + 2 * fc_bias
 *   logit_bn: out = lbn_weight * (z - mean2) / sqrt(var2 + eps) + lbn_bias, one mean/var over M values
 * Training mode uses batch statistics (biased variance for normalisation) and reports them in
 * qg_head_stats; the caller updates running statistics (PyTorch BatchNorm1d semantics).
 * Eval mode uses the running statistics in qg_head_params.
 * Statistics are accumulated in double over fixed chunks: bit-identical for any thread count.
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

/* Backward of the training forward. gout: [M] dL/dout. gmp, gmg: [M, S] out. g: parameter grads. */
int qg_head_backward_f32(const float *mp, const float *mg, int64_t M, int64_t S,
                         const qg_head_params *p, const qg_head_stats *st, const float *z,
                         const float *gout, float *gmp, float *gmg, qg_head_grads *g,
                         const qg_ctx *ctx);

/* Scalar references (single thread, double accumulation): same contracts. */
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
