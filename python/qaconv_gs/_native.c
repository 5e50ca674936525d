/*
 * _native.c - the one binding file between Python/NumPy and the C kernels in csrc/.
 *
 * Each binding: parse arguments, coerce arrays (PyArray_FROM_OTF with NPY_ARRAY_IN_ARRAY),
 * re-check shapes cheaply (Python validated already), allocate outputs, release the GIL,
 * call the kernel, re-acquire the GIL, map the status to an exception. One `fail:` exit per
 * function releases everything. New arrays are returned with Py_BuildValue("N", ...).
 * Long kernels poll for signals (Ctrl-C) every ~50 ms from the calling thread.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL qg_ARRAY_API
#include <numpy/arrayobject.h>

#include <stdlib.h>
#include <time.h>

#include "qg_common.h"
#include "qg_cpu.h"
#include "qg_head.h"
#include "qg_loss.h"
#include "qg_match.h"
#include "qg_neighbors.h"

/* ------------------------------------------------------------------ common helpers */

/* Highest ISA level kernels may use: the CPU's best, lowered by QG_ISA=portable|avx2|avx512 at
 * import or by the private set_isa() (tests run every path). Read and written with the GIL held. */
static int qg_isa_level = QG_ISA_PORTABLE;

typedef struct qg_call {
    PyThreadState *ts;
    double last_poll;
    qg_ctx ctx;
} qg_call;

static inline double qg_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Poll callback: runs on the calling thread with the GIL released; briefly re-takes the GIL
 * to let Python run pending signal handlers (SIGINT -> KeyboardInterrupt). */
static inline int qg_poll_signals(void *arg)
{
    qg_call *call = (qg_call *)arg;
    double now = qg_now();
    if (now - call->last_poll < 0.05) return 0;
    call->last_poll = now;
    PyEval_RestoreThread(call->ts);
    int r = PyErr_CheckSignals();
    call->ts = PyEval_SaveThread();
    return r != 0;
}

/* Release the GIL and prepare the kernel context. Pair every call with qg_call_end. */
static inline void qg_call_begin(qg_call *call, int n_threads)
{
    call->last_poll = qg_now();
    call->ctx.n_threads = n_threads > 0 ? n_threads : 1;
    call->ctx.isa = qg_isa_level;
    call->ctx.poll = qg_poll_signals;
    call->ctx.poll_arg = call;
    call->ts = PyEval_SaveThread();
}

static inline void qg_call_end(qg_call *call) { PyEval_RestoreThread(call->ts); }

/* Map a kernel status to a Python exception (GIL held). Returns -1 if an error is set. */
static inline int qg_check_status(int status, const char *func)
{
    switch (status) {
    case QG_OK:
        return 0;
    case QG_ENOMEM:
        PyErr_Format(PyExc_MemoryError, "%s: could not allocate scratch memory", func);
        return -1;
    case QG_EINTR:
        if (!PyErr_Occurred()) PyErr_SetNone(PyExc_KeyboardInterrupt);
        return -1;
    case QG_ERANGE:
        PyErr_Format(PyExc_ValueError, "%s: an index (label or candidate) is out of range", func);
        return -1;
    case QG_ENONFINITE:
        PyErr_Format(PyExc_ValueError, "%s: input contains NaN or Inf", func);
        return -1;
    case QG_EOVERFLOW:
        PyErr_Format(PyExc_ValueError, "%s: array size overflows 64-bit indexing", func);
        return -1;
    case QG_EINVAL:
        PyErr_Format(PyExc_ValueError, "%s: invalid argument (sizes or parameters)", func);
        return -1;
    default:
        PyErr_Format(PyExc_RuntimeError, "%s: kernel failed with status %d (%s)", func, status,
                     qg_status_str(status));
        return -1;
    }
}

/* Coerce to a C-contiguous aligned array of `typenum` with `ndim` dims (ndim < 0: any). */
static inline PyArrayObject *qg_array(PyObject *obj, int typenum, int ndim, const char *name)
{
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(obj, typenum, NPY_ARRAY_IN_ARRAY);
    if (a == NULL) return NULL;
    if (ndim >= 0 && PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected a %d-d array, got %d-d", name, ndim,
                     PyArray_NDIM(a));
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

/* New uninitialised C-contiguous array. */
static inline PyArrayObject *qg_empty(int ndim, const npy_intp *dims, int typenum)
{
    return (PyArrayObject *)PyArray_EMPTY(ndim, (npy_intp *)dims, typenum, 0);
}

static inline PyArrayObject *qg_zeros(int ndim, const npy_intp *dims, int typenum)
{
    return (PyArrayObject *)PyArray_ZEROS(ndim, (npy_intp *)dims, typenum, 0);
}

static inline int qg_check_threads(int n_threads)
{
    if (n_threads < 1) {
        PyErr_Format(PyExc_ValueError, "n_threads: expected an integer >= 1, got %d", n_threads);
        return -1;
    }
    return 0;
}

#define QG_F32(a) ((float *)PyArray_DATA(a))
#define QG_I64(a) ((int64_t *)PyArray_DATA(a))
#define QG_U16(a) ((uint16_t *)PyArray_DATA(a))
#define QG_DIM(a, i) ((int64_t)PyArray_DIM((a), (i)))

/* ------------------------------------------------------------------ kernel families */
/* Each fragment defines static binding functions and a QG_<FAMILY>_METHODS list. */
#include "_native_neighbors.inc"
#include "_native_match.inc"
#include "_native_head.inc"
#include "_native_loss.inc"

/* ------------------------------------------------------------------ module */

static PyObject *qg_py_openmp_enabled(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyBool_FromLong(qg_openmp_enabled());
}

static PyObject *qg_py_default_threads(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyLong_FromLong(qg_default_threads());
}

static PyObject *qg_py_isa(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyUnicode_FromString(qg_isa_name(qg_isa_level));
}

static PyObject *qg_py_best_isa(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyUnicode_FromString(qg_isa_name(qg_cpu_best_isa()));
}

/* Set the ISA level (a name no higher than the CPU supports); returns the previous name. */
static PyObject *qg_py_set_isa(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "s:set_isa", &name)) return NULL;
    int isa = qg_isa_parse(name);
    if (isa < 0) {
        PyErr_Format(PyExc_ValueError, "isa: expected 'portable', 'avx2' or 'avx512', got '%s'", name);
        return NULL;
    }
    if (isa > qg_cpu_best_isa()) {
        PyErr_Format(PyExc_ValueError, "isa: '%s' is not supported by this CPU (best: '%s')", name,
                     qg_isa_name(qg_cpu_best_isa()));
        return NULL;
    }
    const char *previous = qg_isa_name(qg_isa_level);
    qg_isa_level = isa;
    return PyUnicode_FromString(previous);
}

static PyMethodDef qg_methods[] = {
    {"isa", qg_py_isa, METH_NOARGS, "The SIMD level kernels use now."},
    {"best_isa", qg_py_best_isa, METH_NOARGS, "The best SIMD level this CPU supports."},
    {"set_isa", qg_py_set_isa, METH_VARARGS, "Set the SIMD level (private; for tests and benchmarks)."},
    {"openmp_enabled", qg_py_openmp_enabled, METH_NOARGS, "True if built with OpenMP."},
    {"default_threads", qg_py_default_threads, METH_NOARGS,
     "OpenMP's default thread count (omp_get_max_threads)."},
    QG_NEIGHBORS_METHODS
    QG_MATCH_METHODS
    QG_HEAD_METHODS
    QG_LOSS_METHODS
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef qg_module = {
    PyModuleDef_HEAD_INIT, "_native", "qaconv-gs C kernels (internal; use qaconv_gs).", -1,
    qg_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
    import_array();
    qg_isa_level = qg_cpu_best_isa();
    const char *forced = getenv("QG_ISA");
    if (forced != NULL && forced[0] != '\0') {
        int isa = qg_isa_parse(forced);
        if (isa < 0) {
            PyErr_Format(PyExc_ImportError,
                         "QG_ISA=%s: expected portable, avx2 or avx512 (or unset for the best)", forced);
            return NULL;
        }
        if (isa < qg_isa_level) qg_isa_level = isa; /* only ever lowers the level */
    }
    return PyModule_Create(&qg_module);
}
