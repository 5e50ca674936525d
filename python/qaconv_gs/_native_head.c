/*
 * _native_head.c - bindings of csrc/qg_head.* (the similarity head: BN + FC + BN over the pair maxima),
 * private, called from qaconv_gs.head only; `_ref` rows bind the scalar reference kernels:
 *   head_forward_train(mp [M,S], mg [M,S], fc_weight [2S]|[S], params, n_threads, weights=None)
 *       -> (z [M], out [M], (mean1, var1, mean2, var2))
 *   head_forward_eval(mp, mg, fc_weight, params, n_threads) -> out [M]
 *   head_backward(mp, mg, fc_weight, params, stats, gout [M], n_threads, weights=None)
 *       -> (gmp [M,S], gmg [M,S], gfc_weight, (g_bn_weight, g_bn_bias, g_fc_bias, g_lbn_weight, g_lbn_bias))
 * params = (shared, eps, bn_w, bn_b, bn_rm, bn_rv, fc_b, lbn_w, lbn_b, lbn_rm, lbn_rv).
 * weights: None or float32 [M] statistics weights per pair (the kernels check them: QG_EINVAL).
 */
#include "_native.h"

#include <string.h>

#include "qg_head.h"

typedef int (*qg_head_train_fn)(const float *, const float *, int64_t, int64_t, const qg_head_params *, float *,
                                float *, qg_head_stats *, const qg_ctx *);
typedef int (*qg_head_eval_fn)(const float *, const float *, int64_t, int64_t, const qg_head_params *, float *,
                               const qg_ctx *);
typedef int (*qg_head_bwd_fn)(const float *, const float *, int64_t, int64_t, const qg_head_params *,
                              const qg_head_stats *, const float *, const float *, float *, float *,
                              qg_head_grads *, const qg_ctx *);

/* The inputs every head binding takes. */
typedef struct qg_head_in {
    PyArrayObject *mp, *mg, *fw;
    qg_head_params p;
    int64_t M, S;
} qg_head_in;

static int qg_head_args(qg_frame *f, PyObject *omp, PyObject *omg, PyObject *ofw, PyObject *params, qg_head_in *h)
{
    qg_head_params *p = &h->p;
    memset(p, 0, sizeof(*p));
    if (!PyTuple_Check(params)) {
        PyErr_SetString(PyExc_TypeError, "params: expected a tuple");
        return -1;
    }
    if (!PyArg_ParseTuple(params, "iffffffffff;params: expected 11 numbers", &p->shared, &p->eps, &p->bn_weight,
                          &p->bn_bias, &p->bn_running_mean, &p->bn_running_var, &p->fc_bias, &p->lbn_weight,
                          &p->lbn_bias, &p->lbn_running_mean, &p->lbn_running_var))
        return -1;
    if (p->shared != 0 && p->shared != 1) {
        PyErr_Format(PyExc_ValueError, "params: shared must be 0 or 1, got %d", p->shared);
        return -1;
    }
    if (!(h->mp = qg_in(f, omp, NPY_FLOAT32, 2, "mp")) || !(h->mg = qg_in(f, omg, NPY_FLOAT32, 2, "mg")) ||
        !(h->fw = qg_in(f, ofw, NPY_FLOAT32, 1, "fc_weight")))
        return -1;
    const int64_t M = h->M = QG_DIM(h->mp, 0), S = h->S = QG_DIM(h->mp, 1);
    if (QG_DIM(h->mg, 0) != M || QG_DIM(h->mg, 1) != S) {
        PyErr_Format(PyExc_ValueError, "mg: expected shape (%lld, %lld) like mp, got (%lld, %lld)", (long long)M,
                     (long long)S, (long long)QG_DIM(h->mg, 0), (long long)QG_DIM(h->mg, 1));
        return -1;
    }
    if (M < 1 || S < 1) {
        PyErr_Format(PyExc_ValueError, "mp: expected a non-empty (M, S) array, got (%lld, %lld)", (long long)M,
                     (long long)S);
        return -1;
    }
    const int64_t nw = p->shared ? S : 2 * S;
    if (QG_DIM(h->fw, 0) != nw) {
        PyErr_Format(PyExc_ValueError, "fc_weight: expected %lld values, got %lld", (long long)nw,
                     (long long)QG_DIM(h->fw, 0));
        return -1;
    }
    p->fc_weight = QG_F32(h->fw);
    return 0;
}

/* Optional per-pair statistics weights: None leaves p->pair_weight NULL, else a float32 [M] vector. */
static int qg_head_weights(qg_frame *f, PyObject *ow, qg_head_in *h)
{
    if (!ow || ow == Py_None) return 0;
    PyArrayObject *w = qg_in(f, ow, NPY_FLOAT32, 1, "weights");
    if (!w) return -1;
    if (QG_DIM(w, 0) != h->M) {
        PyErr_Format(PyExc_ValueError, "weights: expected %lld values (one per pair), got %lld", (long long)h->M,
                     (long long)QG_DIM(w, 0));
        return -1;
    }
    h->p.pair_weight = QG_F32(w);
    return 0;
}

/* ValueError unless there are at least 2 pairs (batch statistics). */
static int qg_head_training(const qg_head_in *h)
{
    if (h->M < 2) {
        PyErr_Format(PyExc_ValueError, "mp: expected more than 1 pair when training, got M=%lld", (long long)h->M);
        return -1;
    }
    return 0;
}

static PyObject *qg_head_train_body(qg_frame *f, PyObject *args, PyObject *kw, qg_head_train_fn fn, const char *label)
{
    static char *kwlist[] = {"mp", "mg", "fc_weight", "params", "n_threads", "weights", NULL};
    PyObject *omp, *omg, *ofw, *params, *ow = NULL;
    int n_threads = 1;
    qg_head_in h;
    qg_head_stats st = {0, 0, 0, 0};
    PyArrayObject *z, *out;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|iO", kwlist, &omp, &omg, &ofw, &params, &n_threads, &ow) ||
        qg_check_threads(n_threads) < 0 || qg_head_args(f, omp, omg, ofw, params, &h) < 0 ||
        qg_head_training(&h) < 0 || qg_head_weights(f, ow, &h) < 0)
        return NULL;
    const npy_intp dims[1] = {(npy_intp)h.M};
    if (!(z = qg_out(f, 1, dims, NPY_FLOAT32)) || !(out = qg_out(f, 1, dims, NPY_FLOAT32))) return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    if (qg_end(f, fn(QG_F32(h.mp), QG_F32(h.mg), h.M, h.S, &h.p, QG_F32(z), QG_F32(out), &st, ctx), label) < 0)
        return NULL;
    return Py_BuildValue("OO(dddd)", z, out, st.mean1, st.var1, st.mean2, st.var2);
}

static PyObject *qg_head_eval_body(qg_frame *f, PyObject *args, PyObject *kw, qg_head_eval_fn fn, const char *label)
{
    static char *kwlist[] = {"mp", "mg", "fc_weight", "params", "n_threads", NULL};
    PyObject *omp, *omg, *ofw, *params;
    int n_threads = 1;
    qg_head_in h;
    PyArrayObject *out;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|i", kwlist, &omp, &omg, &ofw, &params, &n_threads) ||
        qg_check_threads(n_threads) < 0 || qg_head_args(f, omp, omg, ofw, params, &h) < 0)
        return NULL;
    const npy_intp dims[1] = {(npy_intp)h.M};
    if (!(out = qg_out(f, 1, dims, NPY_FLOAT32))) return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    if (qg_end(f, fn(QG_F32(h.mp), QG_F32(h.mg), h.M, h.S, &h.p, QG_F32(out), ctx), label) < 0) return NULL;
    return Py_BuildValue("O", out);
}

static PyObject *qg_head_bwd_body(qg_frame *f, PyObject *args, PyObject *kw, qg_head_bwd_fn fn, const char *label)
{
    static char *kwlist[] = {"mp", "mg", "fc_weight", "params", "stats", "gout", "n_threads", "weights", NULL};
    PyObject *omp, *omg, *ofw, *params, *ogo, *ow = NULL;
    int n_threads = 1;
    qg_head_in h;
    qg_head_stats st;
    PyArrayObject *go, *gmp, *gmg, *gfw;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO(dddd)O|iO", kwlist, &omp, &omg, &ofw, &params, &st.mean1,
                                     &st.var1, &st.mean2, &st.var2, &ogo, &n_threads, &ow) ||
        qg_check_threads(n_threads) < 0 || qg_head_args(f, omp, omg, ofw, params, &h) < 0 ||
        !(go = qg_in(f, ogo, NPY_FLOAT32, 1, "gout")))
        return NULL;
    if (QG_DIM(go, 0) != h.M) {
        PyErr_Format(PyExc_ValueError, "gout: expected %lld values, got %lld", (long long)h.M,
                     (long long)QG_DIM(go, 0));
        return NULL;
    }
    if (qg_head_training(&h) < 0 || qg_head_weights(f, ow, &h) < 0) return NULL;
    const npy_intp d2[2] = {(npy_intp)h.M, (npy_intp)h.S}, d1[1] = {(npy_intp)QG_DIM(h.fw, 0)};
    if (!(gmp = qg_out(f, 2, d2, NPY_FLOAT32)) || !(gmg = qg_out(f, 2, d2, NPY_FLOAT32)) ||
        !(gfw = qg_out(f, 1, d1, NPY_FLOAT32)))
        return NULL;
    qg_head_grads g = {.fc_weight = QG_F32(gfw)};
    const qg_ctx *ctx = qg_begin(f, n_threads);
    const int rc = fn(QG_F32(h.mp), QG_F32(h.mg), h.M, h.S, &h.p, &st, NULL, QG_F32(go), QG_F32(gmp), QG_F32(gmg),
                      &g, ctx);
    if (qg_end(f, rc, label) < 0) return NULL;
    return Py_BuildValue("OOO(ddddd)", gmp, gmg, gfw, g.bn_weight, g.bn_bias, g.fc_bias, g.lbn_weight, g.lbn_bias);
}

#define QG_HEAD_BINDINGS(X)                                                                                       \
    X(KW, head_forward_train, qg_head_train_body, qg_head_forward_train_f32, "head_forward_train",                 \
      "Head training forward (private).")                                                                          \
    X(KW, head_forward_train_ref, qg_head_train_body, qg_head_forward_train_ref_f32, "head_forward_train_ref",     \
      "Head training forward, scalar reference (private).")                                                        \
    X(KW, head_forward_eval, qg_head_eval_body, qg_head_forward_eval_f32, "head_forward_eval",                     \
      "Head eval forward (private).")                                                                              \
    X(KW, head_forward_eval_ref, qg_head_eval_body, qg_head_forward_eval_ref_f32, "head_forward_eval_ref",         \
      "Head eval forward, scalar reference (private).")                                                            \
    X(KW, head_backward, qg_head_bwd_body, qg_head_backward_f32, "head_backward", "Head backward (private).")      \
    X(KW, head_backward_ref, qg_head_bwd_body, qg_head_backward_ref_f32, "head_backward_ref",                      \
      "Head backward, scalar reference (private).")

QG_HEAD_BINDINGS(QG_TRAMPOLINE)

PyMethodDef qg_head_methods[] = {QG_HEAD_BINDINGS(QG_METHOD_ROW){NULL, NULL, 0, NULL}};
