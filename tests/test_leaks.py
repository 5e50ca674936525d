"""Leaks: 10,000 calls of every public function (success and error paths, and the private bindings with
inputs they must convert) keep resident memory, Python-heap memory and reference counts flat.

No debug build (sys.gettotalrefcount) is assumed: the checks are
  * RSS (/proc/self/statm) after vs before the 10,000 calls (sees C allocations: qg_malloc scratch, NumPy
    data buffers), bound LEAK_RSS_BYTES;
  * tracemalloc (NumPy reports its data buffers to it) over a tenth of the calls, bound LEAK_PY_BYTES;
  * sys.getrefcount of every input array and of the singletons a binding might over-reference.
A leak of even one small output array per call (>= ~100 bytes) exceeds the tracemalloc bound; every
scratch buffer the C kernels allocate is >= 64 bytes and comes with an allocator header, and most are
KBs, so a leaked one per call shows in RSS. Shapes are tiny and n_threads=1 (OpenMP start-up costs would
dominate, and on an oversubscribed CI machine a 2-thread barrier can take a whole time slice).
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc

import numpy as np
import pytest
import qaconv_gs as qg
from qaconv_gs import _native
from qaconv_gs import functional as F

CALLS = int(os.environ.get("QG_LEAK_CALLS", "10000"))  # RSS is compared over this many calls
WARMUP = 200
LEAK_RSS_BYTES = 4 << 20  # allocator noise (glibc arenas, OpenMP) stays well below this
LEAK_PY_BYTES = 64 << 10
PAGE = os.sysconf("SC_PAGE_SIZE")
# Under AddressSanitizer freed memory sits in a quarantine (RSS grows by design): only the tracemalloc and
# refcount checks apply there; ASan itself checks every access.
SANITIZED = "asan" in os.environ.get("LD_PRELOAD", "")

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


rng = np.random.default_rng(7)
N, C, H, W, B = 8, 4, 2, 2, 4
S = H * W
X = rng.standard_normal((B, C, H, W)).astype(np.float32)
G = rng.standard_normal((5, C, H, W)).astype(np.float32)
E = rng.standard_normal((N, C, H, W)).astype(np.float32)
E_F = np.asfortranarray(E.reshape(N, -1))  # not C-contiguous: the bindings must copy (and free) it
Y = np.arange(B) % N
SC = rng.standard_normal((B, 5)).astype(np.float32)
Y5 = np.arange(B) % 5
SQ = rng.standard_normal((B, B)).astype(np.float32)
CAND = (np.arange(B * 3).reshape(B, 3) % N).astype(np.int64)
HEAD = F.init_head(S, rng=np.random.default_rng(1))
MP, MG, AP, AG = F.pair_maxima(X, G, return_argmax=True)
RMP, RMG, RAP, RAG = F.pair_maxima_restricted(X, E, CAND, return_argmax=True, n_threads=1)
XN, XNORM = F.normalize(X)
E3_F = np.asfortranarray(E.reshape(N, C, S))
ROWS = np.unique(CAND)
LOC = np.searchsorted(ROWS, CAND)
E_ROWS, NORM_ROWS = _native.norm_forward_rows(np.ascontiguousarray(E3_F), ROWS, 1)
GY_ROWS = np.ones_like(E_ROWS)
ROWS_ARGS = (E3_F, ROWS, NORM_ROWS, LOC, RMP, RMG, RAP, RAG, 1)  # match_backward_restricted_rows after X
W2 = np.ones(2 * S, np.float32)
MODEL = qg.QAConvGS(N, C, H, W, k_nearest=3, seed=0, n_threads=1)
MODEL_B = qg.QAConvGS(N, C, H, W, k_nearest=3, seed=0, triplet="batch", n_threads=1)
BAD_E = E.reshape(N, -1).copy()
BAD_E[3, 3] = np.nan
X_F = np.asfortranarray(X.reshape(B, C, S))
G_F = np.asfortranarray(G.reshape(5, C, S))
OUT_OF_RANGE = CAND.copy()
OUT_OF_RANGE[-1, -1] = N + 5


def _head_train():
    h = {k: v.copy() for k, v in HEAD.items()}
    return F.head_forward(MP, MG, h, n_threads=1)


_, HCACHE = _head_train()
HGRAD = np.ones(HCACHE.lead, np.float32)


def raises(exc, fn, *args, **kwargs):
    def call():
        try:
            fn(*args, **kwargs)
        except exc:
            return
        raise AssertionError(f"{fn.__name__} did not raise {exc.__name__}")

    return call


# name -> zero-argument callable; every public function, error paths included
CALLS_TABLE = {
    "normalize": lambda: F.normalize(X, n_threads=1),
    "normalize_backward": lambda: F.normalize_backward(X, XN, XNORM, n_threads=1),
    "pair_maxima": lambda: F.pair_maxima(X, G, return_argmax=True, n_threads=1),
    "pair_maxima_backward": lambda: F.pair_maxima_backward(MP, MG, AP, AG, X, G, n_threads=1),
    "pair_maxima_restricted": lambda: F.pair_maxima_restricted(X, E, CAND, return_argmax=True, n_threads=1),
    "pair_maxima_restricted_backward": lambda: F.pair_maxima_restricted_backward(
        RMP, RMG, RAP, RAG, X, E, CAND, n_threads=1
    ),
    "match_scores": lambda: F.match_scores(X, G, W2, 0.5, n_threads=1),
    "class_neighbors": lambda: qg.class_neighbors(E, 3, return_similarity=True, n_threads=1),
    "init_head": lambda: F.init_head(S, rng=np.random.default_rng(0)),
    "head_forward_train": _head_train,
    "head_forward_eval": lambda: F.head_forward(MP, MG, HEAD, training=False, n_threads=1),
    "head_backward": lambda: F.head_backward(HGRAD, HCACHE, n_threads=1),
    "head_eval_affine": lambda: F.head_eval_affine(HEAD, S),
    "class_loss": lambda: F.class_loss(SC, n_threads=1),
    "batch_triplet": lambda: F.batch_triplet(SQ, Y, return_accuracy=True, n_threads=1),
    "pairwise_bce": lambda: F.pairwise_bce(SQ, Y, return_accuracy=True, n_threads=1),
    "focal_class_memory": lambda: F.focal_class_memory(SC, Y5, n_threads=1),
    "match": lambda: qg.match(X, G, HEAD, n_threads=1),
    "model.forward_backward": lambda: MODEL.forward_backward(X, Y),
    "model.forward_backward-batch-triplet": lambda: MODEL_B.forward_backward(X, Y),
    "model.identify": lambda: MODEL.identify(X, top=3),
    "model.match_pairs": lambda: MODEL.match_pairs(X, X),
    "model.dense_scores": lambda: MODEL.dense_scores(X, Y),
    # error paths in Python validation
    "err-normalize-nan": raises(ValueError, F.normalize, X * np.float32(np.nan)),
    "err-forward_backward-labels": raises(ValueError, MODEL.forward_backward, X, Y + N),
    "err-class_loss-type": raises(TypeError, F.class_loss, SC.astype(complex)),
    "err-n_threads": raises(ValueError, F.pair_maxima, X, G, n_threads=0),
    # the bindings, converting float64 inputs (a leaked conversion copy would show) and their C error paths
    "native-norm_forward-f64": lambda: _native.norm_forward(X_F, 1),
    "native-match_maxima-f64": lambda: _native.match_maxima(X_F, G_F, True, 1),
    "native-neighbors-f64": lambda: _native.neighbors_topk(E_F, 3, 1, True),
    "native-err-neighbors-nonfinite": raises(ValueError, _native.neighbors_topk, BAD_E, 3, 1, True),
    "native-neighbors-cross-f64": lambda: _native.neighbors_cross_topk(E_F[:5], E_F[5:], 0, 5, 3, 1, True),
    "native-err-neighbors-cross-nonfinite": raises(
        ValueError, _native.neighbors_cross_topk, E_F, BAD_E, 0, len(E_F), 3, 1, True
    ),
    "native-err-neighbors-cross-ids": raises(
        ValueError, _native.neighbors_cross_topk, E_F, E_F, 0, 1, 3, 1, True
    ),
    "native-err-restricted-range": raises(
        ValueError, _native.match_maxima_restricted, X_F, E.reshape(N, C, S), OUT_OF_RANGE, True, 1
    ),
    "native-err-backward-shape": raises(
        ValueError, _native.match_backward, X_F, G_F, MP[:, :2], MG, AP, AG, 1
    ),
    "native-err-focal-range": raises(ValueError, _native.loss_focal, SC, Y5 + 50, 2.0, True, 1),
    # table-row kernels of the training step (a Fortran-ordered table is copied and freed)
    "native-norm_forward_rows-f": lambda: _native.norm_forward_rows(E3_F, ROWS, 1),
    "native-norm_backward_rows": lambda: _native.norm_backward_rows(GY_ROWS.copy(), E3_F, ROWS, NORM_ROWS, 1),
    "native-restricted-features": lambda: _native.match_backward_restricted_features(
        X_F, E_ROWS, LOC, RMP, RMG, RAP, RAG, 1
    ),
    "native-restricted-embeds": lambda: _native.match_backward_restricted_embeds(
        X_F, len(ROWS), LOC, RMP, RMG, RAP, RAG, 1
    ),
    "native-restricted-rows": lambda: _native.match_backward_restricted_rows(X_F, *ROWS_ARGS),
    "native-restricted-rows-out": lambda: _native.match_backward_restricted_rows(
        X_F, *ROWS_ARGS, GY_ROWS.copy()
    ),
    "native-err-restricted-rows-out": raises(
        ValueError, _native.match_backward_restricted_rows, X_F, *ROWS_ARGS, GY_ROWS[:1].copy()
    ),
    "native-err-norm_rows-range": raises(ValueError, _native.norm_forward_rows, E3_F, ROWS + N, 1),
    "native-err-restricted-rows-range": raises(
        ValueError,
        _native.match_backward_restricted_rows,
        X_F,
        E3_F,
        ROWS,
        NORM_ROWS,
        LOC + N,
        RMP,
        RMG,
        RAP,
        RAG,
        1,
    ),
}


def _refcounts():
    """Reference counts of every input array (must not move at all) and of the singletons a binding
    might over-reference (None, True, False: +-1 from interpreter caches is fine, +calls is a leak)."""
    objs = [X, G, E, Y, SC, SQ, CAND, MP, MG, AP, AG, XN, XNORM, W2, E_F, X_F, G_F, BAD_E, OUT_OF_RANGE]
    objs += [E3_F, ROWS, LOC, E_ROWS, NORM_ROWS, GY_ROWS]
    objs += list(HEAD.values())
    return [sys.getrefcount(o) for o in objs], [sys.getrefcount(o) for o in (None, True, False)]


# Composites of the kernels above (each call runs several of them plus Python-side bookkeeping, ~1-5 ms):
# CALLS / 5 in the default run, the full CALLS in the slow run.
COMPOSITE = {
    "init_head",
    "head_forward_train",
    "head_forward_eval",
    "head_eval_affine",
    "match",
    "model.forward_backward",
    "model.forward_backward-batch-triplet",
    "model.identify",
    "model.match_pairs",
    "model.dense_scores",
}
PARAMS = [pytest.param(n, CALLS // 5 if n in COMPOSITE else CALLS, id=n) for n in CALLS_TABLE]
PARAMS += [pytest.param(n, CALLS, id=f"{n}-full", marks=pytest.mark.slow) for n in sorted(COMPOSITE)]


@pytest.mark.parametrize("name, calls", PARAMS)
def test_calls_do_not_leak(name, calls):
    fn = CALLS_TABLE[name]
    for _ in range(WARMUP):
        fn()
    gc.collect()
    refs0 = _refcounts()
    rss0 = rss()
    for _ in range(calls):
        fn()
    gc.collect()
    rss1 = rss()
    tracemalloc.start()
    try:
        for _ in range(20):  # let tracemalloc's own tables settle
            fn()
        gc.collect()
        py0 = tracemalloc.get_traced_memory()[0]
        for _ in range(max(1, calls // 10)):
            fn()
        gc.collect()
        py1 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    refs1 = _refcounts()
    assert refs1[0] == refs0[0], "reference counts of input arrays changed"
    assert all(abs(a - b) < 16 for a, b in zip(refs1[1], refs0[1])), (refs0[1], refs1[1])
    assert py1 - py0 < LEAK_PY_BYTES, f"Python heap grew by {py1 - py0} bytes over {calls // 10} calls"
    if not SANITIZED:
        assert rss1 - rss0 < LEAK_RSS_BYTES, f"RSS grew by {rss1 - rss0} bytes over {calls} calls"


def test_checkpoint_save_load_do_not_leak(tmp_path):
    """100 rounds (each writes and fsyncs a file); a leaked state copy would be ~1 KB per round."""
    p = tmp_path / "m.npz"
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")

    def round_trip():
        MODEL.save(p)
        qg.QAConvGS.load(p)
        try:
            MODEL.load_checkpoint(bad)
        except ValueError:
            pass

    for _ in range(10):
        round_trip()
    gc.collect()
    rss0 = rss()
    tracemalloc.start()
    try:
        py0 = tracemalloc.get_traced_memory()[0]
        for _ in range(100):
            round_trip()
        gc.collect()
        py1 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert py1 - py0 < LEAK_PY_BYTES
    if not SANITIZED:
        assert rss() - rss0 < LEAK_RSS_BYTES


def test_the_leak_check_can_fail():
    """The bounds are tight enough to see one small array kept per call (so the tests above can fail)."""
    kept = []
    tracemalloc.start()
    try:
        py0 = tracemalloc.get_traced_memory()[0]
        for _ in range(CALLS // 10):  # as many calls as the traced pass of a kernel test
            kept.append(F.class_loss(SC, n_threads=1).grad)  # [4, 5] float32: 80 bytes of data per call
        py1 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert py1 - py0 > LEAK_PY_BYTES


@pytest.mark.skipif(SANITIZED, reason="RSS is not a leak measure under ASan")
def test_the_rss_check_can_fail():
    """A C-side leak of one 4 KB scratch buffer per call (what a missed qg_free would do) exceeds the RSS
    bound over the calls of one kernel test."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    kept = []
    # hand the heap's free pages back first: otherwise blocks freed by earlier tests in this process (still
    # resident) can serve these mallocs without growing the RSS, and the check would depend on test order
    if hasattr(libc, "malloc_trim"):  # glibc
        libc.malloc_trim(0)
    rss0 = rss()
    for _ in range(CALLS):
        p = libc.malloc(4096)
        ctypes.memset(p, 1, 4096)  # touched, like a scratch buffer the kernel wrote
        kept.append(p)
    grown = rss() - rss0
    for p in kept:
        libc.free(ctypes.c_void_p(p))
    assert grown > LEAK_RSS_BYTES
