/*
 * qg_match_ref.c - scalar reference versions of the qg_match kernels (single thread, plain loops,
 * double accumulation). Fallback and test oracle; same contracts as the fast kernels in qg_match.h.
 * They differ from the fast kernels only in rounding: Z is summed in double here, in float32 there.
 */
#include "qg_match.h"

#include <math.h>
#include <string.h>

int qg_norm_forward_ref_f32(const float *x, int64_t M, int64_t C, int64_t S,
                            float *y, float *norm, const qg_ctx *ctx)
{
    int64_t cs, total;
    if (M < 0 || C < 1 || S < 1) return QG_EINVAL;
    if (qg_mul_overflow(C, S, &cs) || qg_mul_overflow(cs, M, &total)) return QG_EOVERFLOW;
    if (M == 0) return QG_OK;
    if (!x || !y || !norm) return QG_EINVAL;
    for (int64_t m = 0; m < M; ++m) {
        if (qg_poll(ctx)) return QG_EINTR;
        for (int64_t s = 0; s < S; ++s) {
            double acc = 0.0;
            for (int64_t c = 0; c < C; ++c) {
                const double v = x[m * cs + c * S + s];
                acc += v * v;
            }
            const float nr = (float)sqrt(acc);
            const float den = nr > QG_NORM_EPS ? nr : QG_NORM_EPS;
            norm[m * S + s] = nr;
            /* a norm beyond float32's range: divide in double by the double norm (den would be Inf) */
            const int wide = isinf(nr);
            for (int64_t c = 0; c < C; ++c) {
                const float v = x[m * cs + c * S + s];
                y[m * cs + c * S + s] = wide ? (float)((double)v / sqrt(acc)) : v / den;
            }
        }
    }
    return QG_OK;
}

int qg_norm_backward_ref_f32(const float *gy, const float *y, const float *norm,
                             int64_t M, int64_t C, int64_t S, float *gx, const qg_ctx *ctx)
{
    int64_t cs, total;
    if (M < 0 || C < 1 || S < 1) return QG_EINVAL;
    if (qg_mul_overflow(C, S, &cs) || qg_mul_overflow(cs, M, &total)) return QG_EOVERFLOW;
    if (M == 0) return QG_OK;
    if (!gy || !y || !norm || !gx) return QG_EINVAL;
    for (int64_t m = 0; m < M; ++m) {
        if (qg_poll(ctx)) return QG_EINTR;
        for (int64_t s = 0; s < S; ++s) {
            const float nr = norm[m * S + s];
            double dot = 0.0, inv = 1.0 / (double)QG_NORM_EPS;
            if (nr >= QG_NORM_EPS) {
                inv = 1.0 / (double)nr;
                for (int64_t c = 0; c < C; ++c)
                    dot += (double)y[m * cs + c * S + s] * (double)gy[m * cs + c * S + s];
            }
            for (int64_t c = 0; c < C; ++c) {
                const int64_t i = m * cs + c * S + s;
                gx[i] = (float)(((double)gy[i] - (double)y[i] * dot) * inv);
            }
        }
    }
    return QG_OK;
}

static int ref_check(int64_t B, int64_t N, const int64_t *cand, int64_t K, int64_t C, int64_t S,
                     int64_t *npairs)
{
    int64_t cs, tmp;
    if (B < 0 || N < 0 || K < 0 || C < 1 || S < 1 || S > QG_MAX_LOCATIONS) return QG_EINVAL;
    if (qg_mul_overflow(C, S, &cs) || qg_mul_overflow(B, K, npairs) || qg_mul_overflow(*npairs, S, &tmp) ||
        qg_mul_overflow(cs, B, &tmp) || qg_mul_overflow(cs, N, &tmp))
        return QG_EOVERFLOW;
    if (*npairs > 0 && !cand) return QG_EINVAL;
    for (int64_t q = 0; q < *npairs; ++q)
        if (cand[q] < 0 || cand[q] >= N) return QG_ERANGE;
    return QG_OK;
}

int qg_match_maxima_restricted_ref_f32(const float *X, int64_t B, const float *E, int64_t N,
                                       const int64_t *cand, int64_t K, int64_t C, int64_t S,
                                       float *mp, float *mg, uint16_t *ap, uint16_t *ag,
                                       const qg_ctx *ctx)
{
    int64_t npairs;
    int st = ref_check(B, N, cand, K, C, S, &npairs);
    if (st != QG_OK) return st;
    if (npairs == 0) return QG_OK;
    if (!X || !E || !mp || !mg || (ap == NULL) != (ag == NULL)) return QG_EINVAL;
    const int64_t cs = C * S;
    for (int64_t q = 0; q < npairs; ++q) {
        if (qg_poll(ctx)) return QG_EINTR;
        const float *P = X + (q / K) * cs;
        const float *G = E + cand[q] * cs;
        float *mpq = mp + q * S, *mgq = mg + q * S;
        for (int64_t s = 0; s < S; ++s) {
            mpq[s] = -INFINITY;
            mgq[s] = -INFINITY;
            if (ap) {
                ap[q * S + s] = 0;
                ag[q * S + s] = 0;
            }
        }
        for (int64_t s = 0; s < S; ++s) {
            for (int64_t r = 0; r < S; ++r) {
                double acc = 0.0;
                for (int64_t c = 0; c < C; ++c) acc += (double)P[c * S + s] * (double)G[c * S + r];
                const float z = (float)acc;
                if (z > mpq[s]) { /* r increases: strict '>' keeps the first argmax */
                    mpq[s] = z;
                    if (ap) ap[q * S + s] = (uint16_t)r;
                }
                if (z > mgq[r]) { /* s increases in the outer loop: first argmax too */
                    mgq[r] = z;
                    if (ag) ag[q * S + r] = (uint16_t)s;
                }
            }
        }
    }
    return QG_OK;
}

int qg_match_backward_restricted_ref_f32(const float *X, int64_t B, const float *E, int64_t N,
                                         const int64_t *cand, int64_t K, int64_t C, int64_t S,
                                         const float *gmp, const float *gmg,
                                         const uint16_t *ap, const uint16_t *ag,
                                         float *gX, float *gE, const qg_ctx *ctx)
{
    int64_t npairs;
    int st = ref_check(B, N, cand, K, C, S, &npairs);
    if (st != QG_OK) return st;
    const int64_t cs = C * S;
    if (B > 0 && !gX) return QG_EINVAL;
    if (N > 0 && !gE) return QG_EINVAL;
    if (npairs > 0 && (!X || !E || !gmp || !gmg || !ap || !ag)) return QG_EINVAL;
    for (int64_t i = 0; i < npairs * S; ++i)
        if (ap[i] >= S || ag[i] >= S) return QG_ERANGE;
    /* Accumulate in double, then round once. */
    int64_t nbytes;
    if (qg_mul_overflow(B + N, cs * (int64_t)sizeof(double), &nbytes)) return QG_EOVERFLOW;
    if (B + N == 0) return QG_OK;
    double *acc = (double *)qg_calloc(nbytes);
    if (!acc) return QG_ENOMEM;
    double *aX = acc, *aE = acc + B * cs;
    for (int64_t q = 0; q < npairs; ++q) {
        if (qg_poll(ctx)) {
            qg_free(acc);
            return QG_EINTR;
        }
        const int64_t b = q / K, n = cand[q];
        const float *P = X + b * cs, *G = E + n * cs;
        for (int64_t s = 0; s < S; ++s) {
            const int64_t r = ap[q * S + s];
            const double w = gmp[q * S + s];
            for (int64_t c = 0; c < C; ++c) {
                aX[b * cs + c * S + s] += w * (double)G[c * S + r];
                aE[n * cs + c * S + r] += w * (double)P[c * S + s];
            }
        }
        for (int64_t r = 0; r < S; ++r) {
            const int64_t s = ag[q * S + r];
            const double w = gmg[q * S + r];
            for (int64_t c = 0; c < C; ++c) {
                aX[b * cs + c * S + s] += w * (double)G[c * S + r];
                aE[n * cs + c * S + r] += w * (double)P[c * S + s];
            }
        }
    }
    for (int64_t i = 0; i < B * cs; ++i) gX[i] = (float)aX[i];
    for (int64_t i = 0; i < N * cs; ++i) gE[i] = (float)aE[i];
    qg_free(acc);
    return QG_OK;
}
