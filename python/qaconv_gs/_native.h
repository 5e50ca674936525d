/*
 * _native.h - private to the binding files python/qaconv_gs/_native*.c: the steps every binding shares
 * (defined once, in _native.c) and the macros that turn a family's list of bindings into its functions and
 * its method table.
 *
 * Files: _native.c (this machinery, the ISA controls, the module), and one file a kernel family,
 * _native_<family>.c, each with a list
 *     #define QG_<FAMILY>_BINDINGS(X) X(CONV, pyname, body, kernel, label, doc) ...
 * expanded twice: QG_<FAMILY>_BINDINGS(QG_TRAMPOLINE) defines qg_py_<pyname> for every row (its
 * trampoline, which calls body(frame, args, kw, kernel, label)), and QG_<FAMILY>_BINDINGS(QG_METHOD_ROW)
 * writes the PyMethodDef rows of qg_<family>_methods[]. CONV is VA (positional arguments: METH_VARARGS;
 * the body gets kw == NULL) or KW (METH_VARARGS | METH_KEYWORDS). A fast kernel and its scalar reference
 * are two rows with one body. The kernel is the C function the row binds (or a const record naming it);
 * label names the call in the errors a kernel status raises.
 *
 * The trampoline owns the call's frame (qg_frame: the arrays the call owns and its kernel call) and is the
 * one exit: it returns qg_done(&frame, body(&frame, args, kw, kernel, label)), which releases all the frame
 * owns, so a body never releases anything. A body:
 *     ...parse and check; coerce inputs with qg_in(f, ...), allocate outputs with qg_out(f, ...): any
 *        failed step has set the exception and the body returns NULL...
 *     const qg_ctx *ctx = qg_begin(f, n_threads);              (the GIL is released)
 *     if (qg_end(f, kernel(..., ctx), label) < 0) return NULL; (the GIL is back; status -> exception)
 *     return Py_BuildValue("OO", ...);                         ("O": the result takes its own references)
 */
#ifndef QG_NATIVE_H
#define QG_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL qg_ARRAY_API
#ifndef QG_NATIVE_MODULE /* only _native.c imports the NumPy C API; the other files share its table */
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "qg_common.h"

/* ------------------------------------------------------------------ declaring bindings */

#define QG_FLAGS_VA METH_VARARGS
#define QG_FLAGS_KW (METH_VARARGS | METH_KEYWORDS)

#define QG_TRAMPOLINE_VA(pyname, body, kernel, label)                 \
    static PyObject *qg_py_##pyname(PyObject *self, PyObject *args) \
    {                                                               \
        (void)self;                                                 \
        qg_frame f = QG_FRAME_INIT;                                 \
        return qg_done(&f, body(&f, args, NULL, kernel, label));    \
    }
#define QG_TRAMPOLINE_KW(pyname, body, kernel, label)                             \
    static PyObject *qg_py_##pyname(PyObject *self, PyObject *args, PyObject *kw) \
    {                                                                             \
        (void)self;                                                               \
        qg_frame f = QG_FRAME_INIT;                                               \
        return qg_done(&f, body(&f, args, kw, kernel, label));                    \
    }
#define QG_TRAMPOLINE(conv, pyname, body, kernel, label, doc) QG_TRAMPOLINE_##conv(pyname, body, kernel, label)
#define QG_METHOD_ROW(conv, pyname, body, kernel, label, doc) \
    {#pyname, (PyCFunction)(void (*)(void))qg_py_##pyname, QG_FLAGS_##conv, doc},

/* The families' method tables (each ends with a NULL row); _native.c adds them to the module. */
extern PyMethodDef qg_neighbors_methods[], qg_match_methods[], qg_head_methods[], qg_loss_methods[];

/* ------------------------------------------------------------------ the frame of one binding call */

#define QG_FRAME_MAX 12
typedef struct qg_frame {
    PyObject *own[QG_FRAME_MAX]; /* new references, released by qg_done */
    int n;
    PyThreadState *ts; /* the kernel call: the thread state while the GIL is released, */
    double last_poll;  /* when the poll last let Python run signal handlers, */
    qg_ctx ctx;        /* and the kernel context */
} qg_frame;
#define QG_FRAME_INIT {.n = 0}

/* Coerce obj to a C-contiguous aligned array of `typenum` with `ndim` dims (ndim < 0: any), owned by
 * the frame; NULL with an exception set (ValueError "<name>: expected a <ndim>-d array, got <n>-d"). */
PyArrayObject *qg_in(qg_frame *f, PyObject *obj, int typenum, int ndim, const char *name);
/* New uninitialised C-contiguous array owned by the frame; NULL with an exception set. */
PyArrayObject *qg_out(qg_frame *f, int ndim, const npy_intp *dims, int typenum);
/* Release everything the frame owns and return res (NULL: the exception set stays). */
PyObject *qg_done(qg_frame *f, PyObject *res);

/* ------------------------------------------------------------------ the kernel call */

/* Release the GIL and return the kernel context (the current ISA level, `n_threads` threads, a poll that
 * lets Python's signal handlers run every ~50 ms). Pair every call with qg_end. */
const qg_ctx *qg_begin(qg_frame *f, int n_threads);
/* Re-take the GIL and map the kernel's status to a Python exception (the one place that does): 0, or -1
 * with the exception set; `label` names the call in the message. */
int qg_end(qg_frame *f, int status, const char *label);

/* ------------------------------------------------------------------ argument checks */

/* ValueError unless n_threads >= 1. */
int qg_check_threads(int n_threads);
/* ValueError "<name>: expected shape (d0, d1), got (.., ..)" unless a (2-d) has that shape. */
int qg_check_shape2(PyArrayObject *a, const char *name, int64_t d0, int64_t d1);
/* ValueError unless a (3-d) has shape (d0, d1, d2); d < 0 means any. */
int qg_check_shape3(PyArrayObject *a, const char *name, int64_t d0, int64_t d1, int64_t d2);

#define QG_F32(a) ((float *)PyArray_DATA(a))
#define QG_I64(a) ((int64_t *)PyArray_DATA(a))
#define QG_U16(a) ((uint16_t *)PyArray_DATA(a))
#define QG_DIM(a, i) ((int64_t)PyArray_DIM((a), (i)))

#endif
