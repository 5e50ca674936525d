/*
 * qg_head_ref.c - scalar reference of the QAConv head: textbook BatchNorm / Linear / BatchNorm,
 * single thread, double accumulation, explicit y = bn(x). Fallback and test oracle for qg_head.c.
 */
#include <math.h>

#include "qg_head.h"

static int ref_check(const float *mp, const float *mg, int64_t M, int64_t S, const qg_head_params *p)
{
    if (!mp || !mg || !p || !p->fc_weight) return QG_EINVAL;
    if (M < 1 || S < 1) return QG_EINVAL;
    int64_t n;
    if (qg_mul_overflow(M, 2 * S, &n) || qg_mul_overflow(n, (int64_t)sizeof(double), &n)) return QG_EOVERFLOW;
    if ((p->shared != 0 && p->shared != 1) || !(p->eps > 0.0f) || !isfinite(p->eps)) return QG_EINVAL;
    return QG_OK;
}

/* pair m's statistics weight (1 without weights) */
static inline double ref_pw(const qg_head_params *p, int64_t m)
{
    return p->pair_weight ? (double)p->pair_weight[m] : 1.0;
}

/* the weights' total, or -1 when a weight is < 0 or non-finite or the total is not > 0 */
static double ref_weight_total(const qg_head_params *p, int64_t M)
{
    double t = 0.0;
    for (int64_t m = 0; m < M; ++m) {
        double w = ref_pw(p, m);
        if (!(w >= 0.0) || !isfinite(w)) return -1.0;
        t += w;
    }
    return t > 0.0 && isfinite(t) ? t : -1.0;
}

/* x[m, j] for j in [0, 2S): the first S from mp, the rest from mg */
static inline double ref_x(const float *mp, const float *mg, int64_t S, int64_t m, int64_t j)
{
    return j < S ? (double)mp[m * S + j] : (double)mg[m * S + (j - S)];
}

static inline double ref_w(const qg_head_params *p, int64_t S, int64_t j)
{
    return (double)p->fc_weight[p->shared && j >= S ? j - S : j];
}

/* z[m] = fc(bn(x[m])) in double with the given bn mean/var */
static double ref_fc(const float *mp, const float *mg, int64_t S, int64_t m, const qg_head_params *p, double mean,
                     double var)
{
    double inv = 1.0 / sqrt(var + (double)p->eps), z = 0.0;
    for (int64_t j = 0; j < 2 * S; ++j) {
        double y = (double)p->bn_weight * (ref_x(mp, mg, S, m, j) - mean) * inv + (double)p->bn_bias;
        z += ref_w(p, S, j) * y;
    }
    return z + (p->shared ? 2.0 : 1.0) * (double)p->fc_bias;
}

/* weighted mean and biased variance of all M * 2S values (pair m's values weigh w[m]; wtot = sum w) */
static void ref_bn1_stats(const float *mp, const float *mg, int64_t M, int64_t S, const qg_head_params *p,
                          double wtot, double *mean, double *var)
{
    double s = 0.0, n = wtot * (double)(2 * S);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < 2 * S; ++j) s += ref_pw(p, m) * ref_x(mp, mg, S, m, j);
    double mu = s / n, v = 0.0;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < 2 * S; ++j) {
            double d = ref_x(mp, mg, S, m, j) - mu;
            v += ref_pw(p, m) * d * d;
        }
    *mean = mu;
    *var = v / n;
}

int qg_head_forward_train_ref_f32(const float *mp, const float *mg, int64_t M, int64_t S, const qg_head_params *p,
                                  float *z, float *out, qg_head_stats *st, const qg_ctx *ctx)
{
    int rc = ref_check(mp, mg, M, S, p);
    if (rc != QG_OK) return rc;
    if (M < 2 || !out || !st) return QG_EINVAL;
    const double wtot = ref_weight_total(p, M);
    if (wtot < 0.0) return QG_EINVAL;
    if (qg_poll(ctx)) return QG_EINTR;
    double mean1, var1;
    ref_bn1_stats(mp, mg, M, S, p, wtot, &mean1, &var1);
    if (!isfinite(mean1) || !isfinite(var1)) return QG_ENONFINITE;
    /* two passes over z (recomputed) so no scratch is needed */
    double zs = 0.0;
    for (int64_t m = 0; m < M; ++m) zs += ref_pw(p, m) * ref_fc(mp, mg, S, m, p, mean1, var1);
    double mean2 = zs / wtot, v2 = 0.0;
    for (int64_t m = 0; m < M; ++m) {
        double d = ref_fc(mp, mg, S, m, p, mean1, var1) - mean2;
        v2 += ref_pw(p, m) * d * d;
    }
    double var2 = v2 / wtot, inv2 = 1.0 / sqrt(var2 + (double)p->eps);
    if (!isfinite(mean2) || !isfinite(var2)) return QG_ENONFINITE;
    for (int64_t m = 0; m < M; ++m) {
        double zz = ref_fc(mp, mg, S, m, p, mean1, var1);
        if (z) z[m] = (float)zz;
        out[m] = (float)((double)p->lbn_weight * (zz - mean2) * inv2 + (double)p->lbn_bias);
    }
    st->mean1 = mean1;
    st->var1 = var1;
    st->mean2 = mean2;
    st->var2 = var2;
    return QG_OK;
}

int qg_head_forward_eval_ref_f32(const float *mp, const float *mg, int64_t M, int64_t S, const qg_head_params *p,
                                 float *out, const qg_ctx *ctx)
{
    int rc = ref_check(mp, mg, M, S, p);
    if (rc != QG_OK) return rc;
    if (!out) return QG_EINVAL;
    double v1 = (double)p->bn_running_var, v2 = (double)p->lbn_running_var;
    if (!(v1 + (double)p->eps > 0.0) || !(v2 + (double)p->eps > 0.0)) return QG_EINVAL;
    if (qg_poll(ctx)) return QG_EINTR;
    double inv2 = 1.0 / sqrt(v2 + (double)p->eps);
    for (int64_t m = 0; m < M; ++m) {
        double zz = ref_fc(mp, mg, S, m, p, (double)p->bn_running_mean, v1);
        double o = (double)p->lbn_weight * (zz - (double)p->lbn_running_mean) * inv2 + (double)p->lbn_bias;
        if (!isfinite(o)) return QG_ENONFINITE;
        out[m] = (float)o;
    }
    return QG_OK;
}

int qg_head_backward_ref_f32(const float *mp, const float *mg, int64_t M, int64_t S, const qg_head_params *p,
                             const qg_head_stats *st, const float *z, const float *gout, float *gmp, float *gmg,
                             qg_head_grads *g, const qg_ctx *ctx)
{
    (void)z;
    int rc = ref_check(mp, mg, M, S, p);
    if (rc != QG_OK) return rc;
    if (M < 2 || !st || !gout || !gmp || !gmg || !g || !g->fc_weight) return QG_EINVAL;
    const double wtot = ref_weight_total(p, M);
    if (wtot < 0.0) return QG_EINVAL;
    if (qg_poll(ctx)) return QG_EINTR;
    const int64_t W = 2 * S, nw = p->shared ? S : W;
    const double eps = (double)p->eps, g1 = (double)p->bn_weight, b1 = (double)p->bn_bias;
    const double g2 = (double)p->lbn_weight;
    const double inv1 = 1.0 / sqrt(st->var1 + eps), inv2 = 1.0 / sqrt(st->var2 + eps);
    const double n1 = wtot * (double)W;

    /* logit_bn: dout -> dz (textbook batch-norm backward) */
    double s_g = 0.0, s_gz = 0.0;
    for (int64_t m = 0; m < M; ++m) {
        double zhat = (ref_fc(mp, mg, S, m, p, st->mean1, st->var1) - st->mean2) * inv2;
        s_g += (double)gout[m];
        s_gz += (double)gout[m] * zhat;
    }
    g->lbn_weight = s_gz;
    g->lbn_bias = s_g;

    /* dz[m] (textbook logit_bn backward, pair m's share of the statistics' corrections w[m] / wtot) */
    double *dz = (double *)qg_malloc(M * (int64_t)sizeof(double));
    if (!dz) return QG_ENOMEM;
    for (int64_t m = 0; m < M; ++m) {
        double zhat = (ref_fc(mp, mg, S, m, p, st->mean1, st->var1) - st->mean2) * inv2;
        const double wm = ref_pw(p, m);
        dz[m] = inv2 * ((double)gout[m] * g2 - wm * g2 * s_g / wtot - zhat * wm * g2 * s_gz / wtot);
    }

    /* fc (weights via y explicitly) and the sums of dxhat, dxhat * xhat over all M * 2S values */
    double gfb = 0.0, s_dxh = 0.0, s_dxhx = 0.0, gbw = 0.0, gbb = 0.0;
    for (int64_t j = 0; j < nw; ++j) {
        double acc = 0.0;
        for (int64_t m = 0; m < M; ++m) {
            acc += dz[m] * (g1 * (ref_x(mp, mg, S, m, j) - st->mean1) * inv1 + b1);
            if (p->shared) acc += dz[m] * (g1 * (ref_x(mp, mg, S, m, j + S) - st->mean1) * inv1 + b1);
        }
        g->fc_weight[j] = (float)acc;
    }
    for (int64_t m = 0; m < M; ++m) {
        gfb += (p->shared ? 2.0 : 1.0) * dz[m];
        for (int64_t j = 0; j < W; ++j) {
            double xhat = (ref_x(mp, mg, S, m, j) - st->mean1) * inv1;
            double dy = dz[m] * ref_w(p, S, j);
            gbw += dy * xhat;
            gbb += dy;
            s_dxh += dy * g1;
            s_dxhx += dy * g1 * xhat;
        }
    }
    g->fc_bias = gfb;
    g->bn_weight = gbw;
    g->bn_bias = gbb;
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t j = 0; j < W; ++j) {
            double xhat = (ref_x(mp, mg, S, m, j) - st->mean1) * inv1;
            double dxhat = dz[m] * ref_w(p, S, j) * g1;
            double dx = inv1 * (dxhat - ref_pw(p, m) * s_dxh / n1 - xhat * ref_pw(p, m) * s_dxhx / n1);
            if (j < S)
                gmp[m * S + j] = (float)dx;
            else
                gmg[m * S + (j - S)] = (float)dx;
        }
    }
    qg_free(dz);
    return QG_OK;
}
