/*
 * qg_loss_ref.c - scalar references of the fused losses: plain loops, one thread, double
 * accumulation, textbook formulas. Fallback and test oracle for qg_loss.c (same contracts).
 */
#include <math.h>

#include "qg_loss.h"

static int ref_finite(const float *s, int64_t n)
{
    for (int64_t i = 0; i < n; ++i)
        if (!isfinite(s[i])) return 0;
    return 1;
}

static double ref_sigmoid(double x) { return x >= 0.0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x)); }

/* bce_with_logits(x, t) = max(x, 0) - x t + log(1 + exp(-|x|)) */
static double ref_bce(double x, double t) { return fmax(x, 0.0) - x * t + log1p(exp(-fabs(x))); }

int qg_loss_class_ref_f32(const float *s, int64_t B, int64_t K, float margin, float triplet_weight,
                          qg_class_loss_out *o, float *grad, const qg_ctx *ctx)
{
    if (!s || !o || B < 1 || K < 2 || !isfinite(margin) || !isfinite(triplet_weight)) return QG_EINVAL;
    int64_t n;
    if (qg_mul_overflow(B, K, &n) || qg_mul_overflow(n, (int64_t)sizeof(float), &n)) return QG_EOVERFLOW;
    if (qg_poll(ctx)) return QG_EINTR;
    if (!ref_finite(s, B * K)) return QG_ENONFINITE;
    double lc = 0.0, lt = 0.0, ac = 0.0, at = 0.0;
    for (int64_t b = 0; b < B; ++b) {
        const float *r = s + b * K;
        int64_t am = 0, jn = 1;
        for (int64_t j = 1; j < K; ++j) {
            if (r[j] > r[am]) am = j;
            if (r[j] > r[jn]) jn = j;
        }
        double mx = r[am], se = 0.0;
        for (int64_t j = 0; j < K; ++j) se += exp((double)r[j] - mx);
        double lse = mx + log(se);
        lc += lse - (double)r[0];
        double h = (double)margin - (double)r[0] + (double)r[jn];
        lt += fmax(h, 0.0);
        ac += am == 0;
        at += r[0] > r[jn];
        if (grad) {
            for (int64_t j = 0; j < K; ++j) {
                double d = exp((double)r[j] - lse) - (j == 0 ? 1.0 : 0.0);
                if (h > 0.0 && j == 0) d -= (double)triplet_weight;
                if (h > 0.0 && j == jn) d += (double)triplet_weight;
                grad[b * K + j] = (float)(d / (double)B);
            }
        }
    }
    o->loss_cls = lc / (double)B;
    o->loss_triplet = lt / (double)B;
    o->loss = o->loss_cls + (double)triplet_weight * o->loss_triplet;
    o->acc_cls = ac / (double)B;
    o->acc_triplet = at / (double)B;
    return QG_OK;
}

int qg_loss_batch_triplet_ref_f32(const float *s, const int64_t *labels, int64_t B, float margin, double *loss,
                                  double *acc, int64_t *n_valid, float *grad, const qg_ctx *ctx)
{
    if (!s || !labels || !loss || B < 1 || !isfinite(margin)) return QG_EINVAL;
    int64_t n;
    if (qg_mul_overflow(B, B, &n) || qg_mul_overflow(n, (int64_t)sizeof(float), &n)) return QG_EOVERFLOW;
    if (qg_poll(ctx)) return QG_EINTR;
    if (!ref_finite(s, B * B)) return QG_ENONFINITE;
    /* first sweep: count valid rows */
    int64_t nv = 0;
    for (int64_t b = 0; b < B; ++b) {
        int hp = 0, hn = 0;
        for (int64_t j = 0; j < B; ++j) {
            if (labels[j] == labels[b] && j != b) hp = 1;
            if (labels[j] != labels[b]) hn = 1;
        }
        nv += hp && hn;
    }
    double ls = 0.0, as = 0.0;
    for (int64_t b = 0; b < B; ++b) {
        const float *r = s + b * B;
        int64_t jp = -1, jn = -1;
        for (int64_t j = 0; j < B; ++j) {
            if (labels[j] == labels[b] && j != b && (jp < 0 || r[j] < r[jp])) jp = j;
            if (labels[j] != labels[b] && (jn < 0 || r[j] > r[jn])) jn = j;
        }
        if (grad)
            for (int64_t j = 0; j < B; ++j) grad[b * B + j] = 0.0f;
        if (jp < 0 || jn < 0) continue;
        double h = (double)margin - (double)r[jp] + (double)r[jn];
        ls += fmax(h, 0.0);
        as += r[jp] > r[jn];
        if (grad && h > 0.0) {
            grad[b * B + jp] = (float)(-1.0 / (double)nv);
            grad[b * B + jn] = (float)(1.0 / (double)nv);
        }
    }
    *loss = nv ? ls / (double)nv : 0.0;
    if (acc) *acc = nv ? as / (double)nv : 0.0;
    if (n_valid) *n_valid = nv;
    return QG_OK;
}

int qg_loss_pairwise_bce_ref_f32(const float *s, int64_t P, int64_t G, const int64_t *lp, const int64_t *lg,
                                 double *loss, double *acc, float *grad, const qg_ctx *ctx)
{
    if (!s || !lp || !lg || !loss || P < 1 || G < 1) return QG_EINVAL;
    int64_t n;
    if (qg_mul_overflow(P, G, &n) || qg_mul_overflow(n, (int64_t)sizeof(float), &n)) return QG_EOVERFLOW;
    if (qg_poll(ctx)) return QG_EINTR;
    if (!ref_finite(s, P * G)) return QG_ENONFINITE;
    double ls = 0.0, as = 0.0;
    for (int64_t p = 0; p < P; ++p) {
        int64_t jp = -1, jn = -1;
        for (int64_t g = 0; g < G; ++g) {
            double x = (double)s[p * G + g], t = lp[p] == lg[g] ? 1.0 : 0.0;
            ls += ref_bce(x, t);
            if (grad) grad[p * G + g] = (float)((ref_sigmoid(x) - t) / (double)P);
            if (t == 1.0 && (jp < 0 || s[p * G + g] < s[p * G + jp])) jp = g;
            if (t == 0.0 && (jn < 0 || s[p * G + g] > s[p * G + jn])) jn = g;
        }
        as += jp >= 0 && jn >= 0 && s[p * G + jp] > s[p * G + jn];
    }
    *loss = ls / (double)P;
    if (acc) *acc = as / (double)P;
    return QG_OK;
}

int qg_loss_focal_ref_f32(const float *s, int64_t B, int64_t N, const int64_t *targets, float gamma,
                          double *loss, double *acc, float *grad, const qg_ctx *ctx)
{
    if (!s || !targets || !loss || B < 1 || N < 1 || !(gamma >= 0.0f) || !isfinite(gamma)) return QG_EINVAL;
    int64_t n;
    if (qg_mul_overflow(B, N, &n) || qg_mul_overflow(n, (int64_t)sizeof(float), &n)) return QG_EOVERFLOW;
    for (int64_t b = 0; b < B; ++b)
        if (targets[b] < 0 || targets[b] >= N) return QG_ERANGE;
    if (qg_poll(ctx)) return QG_EINTR;
    if (!ref_finite(s, B * N)) return QG_ENONFINITE;
    const double gm = (double)gamma;
    double ls = 0.0, as = 0.0;
    for (int64_t b = 0; b < B; ++b) {
        int64_t am = 0;
        for (int64_t j = 0; j < N; ++j) {
            double x = (double)s[b * N + j], t = j == targets[b] ? 1.0 : 0.0;
            double p = ref_sigmoid(x);
            double q = t == 1.0 ? ref_sigmoid(-x) : p; /* 1 - p, computed without cancellation */
            double bce = ref_bce(x, t);
            double w = pow(q, gm);
            ls += bce * w;
            if (grad) {
                /* dq/dx = -+ p (1 - p) = sgn * q (1 - q); dw/dx = gamma q^gamma (1 - q) sgn */
                double one_minus_q = t == 1.0 ? p : ref_sigmoid(-x);
                double sgn = t == 1.0 ? -1.0 : 1.0;
                double d = (p - t) * w + bce * gm * w * one_minus_q * sgn;
                grad[b * N + j] = (float)(d / (double)B);
            }
            if (s[b * N + j] > s[b * N + am]) am = j;
        }
        as += am == targets[b];
    }
    *loss = ls / (double)B;
    if (acc) *acc = as / (double)B;
    return QG_OK;
}
