"""Class-neighbour kNN: for each class embedding, its k most cosine-similar other classes."""

from __future__ import annotations

import numpy as np

from . import _native
from ._validate import as_float32, check_int, resolve_threads, shape_str

# Rows checked per chunk for NaN/Inf: bounds the temporary bool mask (the table can be GBs).
_FINITE_CHUNK_BYTES = 1 << 24


def _check_finite_rows(E: np.ndarray, original: object, name: str) -> None:
    """Raise ValueError if the float32 table holds NaN/Inf, checking row chunks (bounded memory)."""
    rows = max(1, _FINITE_CHUNK_BYTES // max(1, E[0].nbytes))
    bad = 0
    for r0 in range(0, E.shape[0], rows):
        chunk = E[r0 : r0 + rows]
        if not np.isfinite(chunk).all():
            bad += int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
    if not bad:
        return
    if original is not E and isinstance(original, np.ndarray) and np.isfinite(original).all():
        raise ValueError(f"{name}: values exceed the float32 range (|x| > {np.finfo(np.float32).max:.4g})")
    raise ValueError(f"{name}: contains {bad} NaN or Inf value(s); inputs must be finite")


def class_neighbors(E, k: int, return_similarity: bool = False, n_threads: int | None = None):
    """k nearest other classes of each class embedding, by cosine similarity.

    Each class embedding is flattened to D = C*H*W values and L2-normalised implicitly
    (x / max(||x||, 1e-12); a zero embedding has similarity 0 to every class). The N x N
    similarity matrix is never formed: memory beyond E is O(N*k) plus a few block buffers.
    Each pair of classes is computed once (half the arithmetic of a full Gram matrix), with the
    AVX2+FMA kernel where the CPU has it (``qaconv_gs.info()["simd"]``). Similarities are float32
    dot products summed over 256-column panels; their error is below ~2e-5 (typically ~1e-7).

    Args:
        E: [N, C, H, W] (or [N, D]) class embeddings, any real dtype; flattened per class.
            float32 C-contiguous input is used in place (never copied or modified).
        k: neighbours per class, 1 <= k <= N-1.
        return_similarity: also return the [N, k] float32 cosine similarities.
        n_threads: None for OpenMP's default, else >= 1 (small problems use fewer threads).
            Results are identical for any value.

    Returns:
        idx [N, k] int64 sorted by decreasing similarity, self excluded by index, ties to the
        lower class index; or (idx, sim) when return_similarity.
    """
    return _class_neighbors(E, k, return_similarity, n_threads, _native.neighbors_topk)


def _class_neighbors(E, k, return_similarity, n_threads, kernel):
    arr = as_float32(E, "E", (2, 4), check_finite=False)
    if arr.shape[0] < 2:
        raise ValueError(
            f"E: class_neighbors needs at least 2 classes (the neighbours of a class are other classes), "
            f"got shape {shape_str(arr.shape)}"
        )
    n = int(arr.shape[0])
    k = check_int(k, "k")
    if not 1 <= k <= n - 1:
        raise ValueError(f"k: expected an integer in [1, {n - 1}] (N-1 other classes), got {k}")
    if not isinstance(return_similarity, (bool, np.bool_)):
        raise TypeError(f"return_similarity: expected a bool, got {type(return_similarity).__name__}")
    nt = resolve_threads(n_threads)
    flat = arr.reshape(n, -1)  # a view: arr is C-contiguous
    original = E if isinstance(E, np.ndarray) else None
    try:
        # the kernel's norm pass rejects NaN/Inf itself (QG_ENONFINITE): no extra pass over E
        # (1 GB at the face shapes) on the normal path, the detailed message only on failure
        return kernel(flat, k, nt, bool(return_similarity))
    except ValueError as err:
        if "NaN or Inf" not in str(err):
            raise
        _check_finite_rows(flat, original, "E")
        raise


def _class_neighbors_ref(E, k, return_similarity=False, n_threads=None):
    """Scalar C reference (single thread, double accumulation); for tests only."""
    return _class_neighbors(E, k, return_similarity, n_threads, _native.neighbors_topk_ref)


def _cross_class_neighbors(
    A,
    B,
    k: int,
    a_start: int = 0,
    b_start: int | None = None,
    return_similarity: bool = False,
    n_threads: int | None = None,
    *,
    _kernel=None,
):
    """Top-k between two disjoint row sets of one class table (the off-diagonal block of class_neighbors).

    For each row of A its most similar rows of B and for each row of B its most similar rows of A,
    without computing A x A or B x B (the sharded neighbour ring's cross blocks). Every similarity
    has the same float32 bits class_neighbors gives that pair on the concatenated table, so the
    lists of a partition's diagonal and cross blocks merge (merge_topk) into class_neighbors exactly.

    Args:
        A: [na, C, H, W] or [na, D] rows with global class ids a_start .. a_start + na - 1.
        B: [nb, ...] rows (same D) with ids b_start .. b_start + nb - 1 (default: right after A's).
        k: neighbours wanted per row, >= 1; A's lists hold min(k, nb), B's min(k, na).
        a_start, b_start: global ids of the first rows; the two id ranges must not overlap.
        return_similarity: also return the float32 similarities.
        n_threads: None for OpenMP's default, else >= 1. Results are identical for any value.

    Returns:
        (idx_a [na, min(k, nb)], idx_b [nb, min(k, na)]) int64 global ids, sorted by decreasing
        similarity, ties to the lower id; or (idx_a, sim_a, idx_b, sim_b) when return_similarity.
    """
    a = as_float32(A, "A", (2, 4), check_finite=False)
    b = as_float32(B, "B", (2, 4), check_finite=False)
    fa, fb = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if fb.shape[1] != fa.shape[1]:
        raise ValueError(
            f"B: expected rows of D = {fa.shape[1]} values (as A, shape {shape_str(a.shape)}), "
            f"got shape {shape_str(b.shape)}"
        )
    k = check_int(k, "k")
    if k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k}")
    a_start = check_int(a_start, "a_start")
    b_start = a_start + fa.shape[0] if b_start is None else check_int(b_start, "b_start")
    na, nb = int(fa.shape[0]), int(fb.shape[0])
    if a_start < 0 or b_start < 0 or (a_start < b_start + nb and b_start < a_start + na):
        raise ValueError(
            f"a_start, b_start: expected disjoint non-negative id ranges, got [{a_start}, {a_start + na}) "
            f"and [{b_start}, {b_start + nb})"
        )
    if not isinstance(return_similarity, (bool, np.bool_)):
        raise TypeError(f"return_similarity: expected a bool, got {type(return_similarity).__name__}")
    nt = resolve_threads(n_threads)
    kernel = _native.neighbors_cross_topk if _kernel is None else _kernel
    try:
        return kernel(fa, fb, a_start, b_start, k, nt, bool(return_similarity))
    except ValueError as err:
        if "NaN or Inf" not in str(err):
            raise
        _check_finite_rows(fa, A if isinstance(A, np.ndarray) else None, "A")
        _check_finite_rows(fb, B if isinstance(B, np.ndarray) else None, "B")
        raise


__all__ = ["class_neighbors"]
