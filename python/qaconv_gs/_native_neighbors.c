/*
 * _native_neighbors.c - bindings of csrc/qg_neighbors.* (class kNN by cosine similarity), private:
 *   neighbors_topk(E [N, D] float32, k, n_threads, want_sim) -> idx [N, k] int64, or (idx, sim)
 *   neighbors_cross_topk(A [na, D], B [nb, D] float32, a_start, b_start, k, n_threads, want_sim)
 *       -> (idx_a [na, min(k, nb)], idx_b [nb, min(k, na)]) int64 global ids, or (idx_a, sim_a, idx_b, sim_b);
 *       rows of A have ids a_start.., rows of B b_start.. (disjoint)
 *   neighbors_fma_probe(iters) -> flops of the single-thread FMA peak probe at the current ISA level
 * `_ref` rows bind the scalar reference kernels.
 */
#include "_native.h"

#include "qg_neighbors.h"

typedef int (*qg_neighbors_fn)(const float *, int64_t, int64_t, int64_t, int64_t *, float *, const qg_ctx *);
typedef int (*qg_neighbors_cross_fn)(const float *, int64_t, int64_t, const float *, int64_t, int64_t, int64_t,
                                     int64_t, int64_t *, float *, int64_t, int64_t *, float *, const qg_ctx *);
typedef double (*qg_fma_probe_fn)(int64_t, const qg_ctx *, float *);

static PyObject *qg_neighbors_body(qg_frame *f, PyObject *args, PyObject *kw, qg_neighbors_fn fn, const char *label)
{
    static char *kwlist[] = {"E", "k", "n_threads", "want_sim", NULL};
    PyObject *e_obj = NULL;
    long long k = 0;
    int n_threads = 1, want_sim = 0;
    PyArrayObject *E, *idx, *sim = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OLip", kwlist, &e_obj, &k, &n_threads, &want_sim) ||
        qg_check_threads(n_threads) < 0 || !(E = qg_in(f, e_obj, NPY_FLOAT32, 2, "E")))
        return NULL;
    int64_t N = QG_DIM(E, 0), D = QG_DIM(E, 1);
    if (N < 2) {
        PyErr_Format(PyExc_ValueError, "E: need at least 2 classes (rows), got %lld", (long long)N);
        return NULL;
    }
    if (D < 1) {
        PyErr_Format(PyExc_ValueError, "E: expected a non-empty embedding dimension, got %lld", (long long)D);
        return NULL;
    }
    if (k < 1 || k > N - 1) {
        PyErr_Format(PyExc_ValueError, "k: expected an integer in [1, %lld], got %lld", (long long)(N - 1), k);
        return NULL;
    }
    npy_intp dims[2] = {(npy_intp)N, (npy_intp)k};
    if (!(idx = qg_out(f, 2, dims, NPY_INT64)) || (want_sim && !(sim = qg_out(f, 2, dims, NPY_FLOAT32))))
        return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    if (qg_end(f, fn(QG_F32(E), N, D, (int64_t)k, QG_I64(idx), sim ? QG_F32(sim) : NULL, ctx), label) < 0)
        return NULL;
    return want_sim ? Py_BuildValue("OO", idx, sim) : Py_BuildValue("O", idx);
}

static PyObject *qg_neighbors_cross_body(qg_frame *f, PyObject *args, PyObject *kw, qg_neighbors_cross_fn fn,
                                         const char *label)
{
    static char *kwlist[] = {"A", "B", "a_start", "b_start", "k", "n_threads", "want_sim", NULL};
    PyObject *a_obj = NULL, *b_obj = NULL;
    long long a_start = 0, b_start = 0, k = 0;
    int n_threads = 1, want_sim = 0;
    PyArrayObject *A, *B, *idx_a, *idx_b, *sim_a = NULL, *sim_b = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOLLLip", kwlist, &a_obj, &b_obj, &a_start, &b_start, &k,
                                     &n_threads, &want_sim) ||
        qg_check_threads(n_threads) < 0 || !(A = qg_in(f, a_obj, NPY_FLOAT32, 2, "A")) ||
        !(B = qg_in(f, b_obj, NPY_FLOAT32, 2, "B")))
        return NULL;
    int64_t na = QG_DIM(A, 0), nb = QG_DIM(B, 0), D = QG_DIM(A, 1);
    if (na < 1 || nb < 1) {
        PyErr_Format(PyExc_ValueError, "A, B: expected at least 1 row each, got %lld and %lld", (long long)na,
                     (long long)nb);
        return NULL;
    }
    if (D < 1 || QG_DIM(B, 1) != D) {
        PyErr_Format(PyExc_ValueError, "B: expected shape [%lld, %lld] (the row size of A, >= 1), got [%lld, %lld]",
                     (long long)nb, (long long)D, (long long)nb, (long long)QG_DIM(B, 1));
        return NULL;
    }
    if (k < 1) {
        PyErr_Format(PyExc_ValueError, "k: expected an integer >= 1, got %lld", k);
        return NULL;
    }
    if (a_start < 0 || b_start < 0 || a_start > INT64_MAX - 1 - na || b_start > INT64_MAX - 1 - nb ||
        (a_start < b_start + nb && b_start < a_start + na)) {
        PyErr_Format(PyExc_ValueError,
                     "a_start, b_start: expected disjoint non-negative id ranges, got a_start %lld (%lld rows) "
                     "and b_start %lld (%lld rows)",
                     a_start, (long long)na, b_start, (long long)nb);
        return NULL;
    }
    const int64_t ka = k < nb ? k : nb, kb = k < na ? k : na;
    npy_intp dims_a[2] = {(npy_intp)na, (npy_intp)ka}, dims_b[2] = {(npy_intp)nb, (npy_intp)kb};
    if (!(idx_a = qg_out(f, 2, dims_a, NPY_INT64)) || !(idx_b = qg_out(f, 2, dims_b, NPY_INT64)))
        return NULL;
    if (want_sim && (!(sim_a = qg_out(f, 2, dims_a, NPY_FLOAT32)) || !(sim_b = qg_out(f, 2, dims_b, NPY_FLOAT32))))
        return NULL;
    const qg_ctx *ctx = qg_begin(f, n_threads);
    const int st = fn(QG_F32(A), na, (int64_t)a_start, QG_F32(B), nb, (int64_t)b_start, D, ka, QG_I64(idx_a),
                      sim_a ? QG_F32(sim_a) : NULL, kb, QG_I64(idx_b), sim_b ? QG_F32(sim_b) : NULL, ctx);
    if (qg_end(f, st, label) < 0) return NULL;
    return want_sim ? Py_BuildValue("OOOO", idx_a, sim_a, idx_b, sim_b) : Py_BuildValue("OO", idx_a, idx_b);
}

/* The caller times it (benchmarks only); runs without the GIL. */
static PyObject *qg_fma_probe_body(qg_frame *f, PyObject *args, PyObject *kw, qg_fma_probe_fn fn, const char *label)
{
    (void)kw;
    long long iters = 0;
    if (!PyArg_ParseTuple(args, "L:neighbors_fma_probe", &iters)) return NULL;
    if (iters < 0) {
        PyErr_Format(PyExc_ValueError, "iters: expected a non-negative integer, got %lld", iters);
        return NULL;
    }
    float sink = 0.0f;
    const double flops = fn((int64_t)iters, qg_begin(f, 1), &sink);
    qg_end(f, QG_OK, label);
    return PyFloat_FromDouble(flops + 0.0 * (double)sink);
}

#define QG_NEIGHBORS_BINDINGS(X)                                                                                \
    X(KW, neighbors_topk, qg_neighbors_body, qg_neighbors_topk_f32, "class_neighbors",                           \
      "neighbors_topk(E, k, n_threads, want_sim): blocked cosine kNN (private).")                                \
    X(KW, neighbors_topk_ref, qg_neighbors_body, qg_neighbors_topk_ref_f32, "class_neighbors (reference)",       \
      "neighbors_topk_ref(E, k, n_threads, want_sim): scalar reference (private).")                              \
    X(KW, neighbors_cross_topk, qg_neighbors_cross_body, qg_neighbors_cross_topk_f32, "cross_class_neighbors",   \
      "neighbors_cross_topk(A, B, a_start, b_start, k, n_threads, want_sim): cross-block cosine kNN (private).") \
    X(KW, neighbors_cross_topk_ref, qg_neighbors_cross_body, qg_neighbors_cross_topk_ref_f32,                    \
      "cross_class_neighbors (reference)",                                                                       \
      "neighbors_cross_topk_ref(A, B, a_start, b_start, k, n_threads, want_sim): scalar reference (private).")   \
    X(VA, neighbors_fma_probe, qg_fma_probe_body, qg_neighbors_fma_probe, "neighbors_fma_probe",                 \
      "neighbors_fma_probe(iters): flops of the FMA peak probe (private; benchmarks).")

QG_NEIGHBORS_BINDINGS(QG_TRAMPOLINE)

PyMethodDef qg_neighbors_methods[] = {QG_NEIGHBORS_BINDINGS(QG_METHOD_ROW){NULL, NULL, 0, NULL}};
