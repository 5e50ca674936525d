/*
 * _native_loss.c - bindings of csrc/qg_loss.* (the training losses), private, called from
 * qaconv_gs.losses only; `_ref` rows bind the scalar reference kernels:
 *   loss_class(scores [B,K], margin, triplet_weight, want_grad, n_threads)
 *       -> (loss, loss_cls, loss_triplet, acc_cls, acc_triplet, grad [B,K] or None)
 *   loss_batch_triplet(scores [B,B], labels [B], margin, want_grad, n_threads) -> (loss, acc, n_valid, grad|None)
 *   loss_pairwise_bce(scores [P,G], labels [P], gallery_labels [G], want_grad, n_threads) -> (loss, acc, grad|None)
 *   loss_focal(scores [B,N], targets [B], gamma, want_grad, n_threads) -> (loss, acc, grad|None)
 */
#include "_native.h"

#include "qg_loss.h"

typedef int (*qg_loss_class_fn)(const float *, int64_t, int64_t, float, float, qg_class_loss_out *, float *,
                                const qg_ctx *);
typedef int (*qg_loss_triplet_fn)(const float *, const int64_t *, int64_t, float, double *, double *, int64_t *,
                                  float *, const qg_ctx *);
typedef int (*qg_loss_bce_fn)(const float *, int64_t, int64_t, const int64_t *, const int64_t *, double *,
                              double *, float *, const qg_ctx *);
typedef int (*qg_loss_focal_fn)(const float *, int64_t, int64_t, const int64_t *, float, double *, double *,
                                float *, const qg_ctx *);

static int qg_loss_nonempty(PyArrayObject *s, const char *name)
{
    if (QG_DIM(s, 0) < 1 || QG_DIM(s, 1) < 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected a non-empty 2-d array, got (%lld, %lld)", name,
                     (long long)QG_DIM(s, 0), (long long)QG_DIM(s, 1));
        return -1;
    }
    return 0;
}

static int qg_loss_len(PyArrayObject *a, int64_t n, const char *name)
{
    if (QG_DIM(a, 0) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected length %lld, got %lld", name, (long long)n,
                     (long long)QG_DIM(a, 0));
        return -1;
    }
    return 0;
}

/* The gradient output shaped like s when wanted (*g = NULL otherwise); -1 when its allocation fails. */
static int qg_loss_grad(qg_frame *f, PyArrayObject *s, int want, PyArrayObject **g)
{
    *g = NULL;
    return want && !(*g = qg_out(f, 2, PyArray_DIMS(s), NPY_FLOAT32)) ? -1 : 0;
}

#define QG_GRAD_PTR(g) ((g) ? QG_F32(g) : NULL)
#define QG_GRAD_OBJ(g) ((g) ? (PyObject *)(g) : Py_None)

static PyObject *qg_loss_class_body(qg_frame *f, PyObject *args, PyObject *kw, qg_loss_class_fn fn, const char *label)
{
    static char *kwlist[] = {"scores", "margin", "triplet_weight", "want_grad", "n_threads", NULL};
    PyObject *os;
    float margin = 1.0f, tw = 0.5f;
    int want = 1, n_threads = 1;
    PyArrayObject *s, *g;
    qg_class_loss_out o = {0, 0, 0, 0, 0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|ffpi", kwlist, &os, &margin, &tw, &want, &n_threads) ||
        qg_check_threads(n_threads) < 0 || !(s = qg_in(f, os, NPY_FLOAT32, 2, "scores")) ||
        qg_loss_nonempty(s, "scores") < 0)
        return NULL;
    if (QG_DIM(s, 1) < 2) {
        PyErr_Format(PyExc_ValueError, "scores: expected K >= 2 columns, got %lld", (long long)QG_DIM(s, 1));
        return NULL;
    }
    if (qg_loss_grad(f, s, want, &g) < 0) return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    if (qg_end(f, fn(QG_F32(s), QG_DIM(s, 0), QG_DIM(s, 1), margin, tw, &o, QG_GRAD_PTR(g), ctx), label) < 0)
        return NULL;
    return Py_BuildValue("dddddO", o.loss, o.loss_cls, o.loss_triplet, o.acc_cls, o.acc_triplet, QG_GRAD_OBJ(g));
}

static PyObject *qg_loss_triplet_body(qg_frame *f, PyObject *args, PyObject *kw, qg_loss_triplet_fn fn,
                                      const char *label)
{
    static char *kwlist[] = {"scores", "labels", "margin", "want_grad", "n_threads", NULL};
    PyObject *os, *ol;
    float margin = 16.0f;
    int want = 1, n_threads = 1;
    PyArrayObject *s, *l, *g;
    double loss = 0.0, acc = 0.0;
    int64_t nv = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|fpi", kwlist, &os, &ol, &margin, &want, &n_threads) ||
        qg_check_threads(n_threads) < 0 || !(s = qg_in(f, os, NPY_FLOAT32, 2, "scores")) ||
        !(l = qg_in(f, ol, NPY_INT64, 1, "labels")) || qg_loss_nonempty(s, "scores") < 0)
        return NULL;
    if (QG_DIM(s, 0) != QG_DIM(s, 1)) {
        PyErr_Format(PyExc_ValueError, "scores: expected a square (B, B) array, got (%lld, %lld)",
                     (long long)QG_DIM(s, 0), (long long)QG_DIM(s, 1));
        return NULL;
    }
    if (qg_loss_len(l, QG_DIM(s, 0), "labels") < 0 || qg_loss_grad(f, s, want, &g) < 0) return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    if (qg_end(f, fn(QG_F32(s), QG_I64(l), QG_DIM(s, 0), margin, &loss, &acc, &nv, QG_GRAD_PTR(g), ctx),
               label) < 0)
        return NULL;
    return Py_BuildValue("ddLO", loss, acc, (long long)nv, QG_GRAD_OBJ(g));
}

static PyObject *qg_loss_bce_body(qg_frame *f, PyObject *args, PyObject *kw, qg_loss_bce_fn fn, const char *label)
{
    static char *kwlist[] = {"scores", "labels", "gallery_labels", "want_grad", "n_threads", NULL};
    PyObject *os, *olp, *olg;
    int want = 1, n_threads = 1;
    PyArrayObject *s, *lp, *lg, *g;
    double loss = 0.0, acc = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|pi", kwlist, &os, &olp, &olg, &want, &n_threads) ||
        qg_check_threads(n_threads) < 0 || !(s = qg_in(f, os, NPY_FLOAT32, 2, "scores")) ||
        !(lp = qg_in(f, olp, NPY_INT64, 1, "labels")) || !(lg = qg_in(f, olg, NPY_INT64, 1, "gallery_labels")) ||
        qg_loss_nonempty(s, "scores") < 0 || qg_loss_len(lp, QG_DIM(s, 0), "labels") < 0 ||
        qg_loss_len(lg, QG_DIM(s, 1), "gallery_labels") < 0 || qg_loss_grad(f, s, want, &g) < 0)
        return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    const int rc = fn(QG_F32(s), QG_DIM(s, 0), QG_DIM(s, 1), QG_I64(lp), QG_I64(lg), &loss, &acc, QG_GRAD_PTR(g), ctx);
    if (qg_end(f, rc, label) < 0) return NULL;
    return Py_BuildValue("ddO", loss, acc, QG_GRAD_OBJ(g));
}

static PyObject *qg_loss_focal_body(qg_frame *f, PyObject *args, PyObject *kw, qg_loss_focal_fn fn, const char *label)
{
    static char *kwlist[] = {"scores", "targets", "gamma", "want_grad", "n_threads", NULL};
    PyObject *os, *ot;
    float gamma = 2.0f;
    int want = 1, n_threads = 1;
    PyArrayObject *s, *t, *g;
    double loss = 0.0, acc = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|fpi", kwlist, &os, &ot, &gamma, &want, &n_threads) ||
        qg_check_threads(n_threads) < 0 || !(s = qg_in(f, os, NPY_FLOAT32, 2, "scores")) ||
        !(t = qg_in(f, ot, NPY_INT64, 1, "targets")) || qg_loss_nonempty(s, "scores") < 0 ||
        qg_loss_len(t, QG_DIM(s, 0), "targets") < 0 || qg_loss_grad(f, s, want, &g) < 0)
        return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    const int rc = fn(QG_F32(s), QG_DIM(s, 0), QG_DIM(s, 1), QG_I64(t), gamma, &loss, &acc, QG_GRAD_PTR(g), ctx);
    if (qg_end(f, rc, label) < 0) return NULL;
    return Py_BuildValue("ddO", loss, acc, QG_GRAD_OBJ(g));
}

#define QG_LOSS_BINDINGS(X)                                                                                      \
    X(KW, loss_class, qg_loss_class_body, qg_loss_class_f32, "loss_class", "Restricted class loss (private).")    \
    X(KW, loss_class_ref, qg_loss_class_body, qg_loss_class_ref_f32, "loss_class_ref",                            \
      "Restricted class loss, scalar reference (private).")                                                       \
    X(KW, loss_batch_triplet, qg_loss_triplet_body, qg_loss_batch_triplet_f32, "loss_batch_triplet",              \
      "Batch-hard triplet (private).")                                                                            \
    X(KW, loss_batch_triplet_ref, qg_loss_triplet_body, qg_loss_batch_triplet_ref_f32, "loss_batch_triplet_ref",  \
      "Batch-hard triplet, reference (private).")                                                                 \
    X(KW, loss_pairwise_bce, qg_loss_bce_body, qg_loss_pairwise_bce_f32, "loss_pairwise_bce",                     \
      "Pairwise BCE (private).")                                                                                  \
    X(KW, loss_pairwise_bce_ref, qg_loss_bce_body, qg_loss_pairwise_bce_ref_f32, "loss_pairwise_bce_ref",         \
      "Pairwise BCE, reference (private).")                                                                       \
    X(KW, loss_focal, qg_loss_focal_body, qg_loss_focal_f32, "loss_focal", "Focal class-memory BCE (private).")   \
    X(KW, loss_focal_ref, qg_loss_focal_body, qg_loss_focal_ref_f32, "loss_focal_ref",                            \
      "Focal class-memory BCE, reference (private).")

QG_LOSS_BINDINGS(QG_TRAMPOLINE)

PyMethodDef qg_loss_methods[] = {QG_LOSS_BINDINGS(QG_METHOD_ROW){NULL, NULL, 0, NULL}};
