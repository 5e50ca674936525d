"""Float64 reference of functional.class_neighbors (brute force), and a tie-tolerant comparison."""

from __future__ import annotations

import numpy as np


def cosine_similarity(E) -> np.ndarray:
    """[N, N] float64 cosine similarities of the flattened rows (x / max(||x||, 1e-12))."""
    X = np.asarray(E, dtype=np.float64).reshape(len(E), -1)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X @ X.T


def class_neighbors(E, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: for each row the k most similar other rows (self excluded by index), ordered by
    (similarity desc, index asc). Returns (idx [N, k] int64, sim [N, k] float64)."""
    S = cosine_similarity(E)
    n = S.shape[0]
    idx = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        others = np.delete(np.arange(n), i)  # by index, never "drop the first column"
        order = np.lexsort((others, -S[i, others]))  # last key is primary
        idx[i] = others[order[:k]]
    return idx, np.take_along_axis(S, idx, axis=1)


def assert_neighbors_close(idx, sim, E, k: int, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Tie-tolerant check of (idx, sim) against the float64 brute force.

    - shapes/dtypes, no self, no repeated neighbour in a row;
    - sim holds the cosine similarity of the returned pairs, and matches the reference top-k
      values position by position, within rtol/atol;
    - the order is (sim desc, index asc) on the returned float32 values;
    - index sets equal the reference sets except for candidates whose similarity ties the k-th
      reference value within tolerance (either choice is then correct).
    """
    idx = np.asarray(idx)
    n = len(E)
    assert idx.shape == (n, k) and idx.dtype == np.int64
    S = cosine_similarity(E)
    ref_idx, ref_sim = class_neighbors(E, k)
    rows = np.arange(n)[:, None]
    assert not (idx == rows).any(), "a class is its own neighbour"
    assert ((idx >= 0) & (idx < n)).all()
    for i in range(n):
        assert len(set(idx[i].tolist())) == k, f"row {i}: repeated neighbour {idx[i]}"
    tol = atol + rtol * np.abs(ref_sim)
    got = np.take_along_axis(S, idx, axis=1)
    np.testing.assert_allclose(got, ref_sim, rtol=rtol, atol=atol)
    if sim is not None:
        sim = np.asarray(sim)
        assert sim.shape == (n, k) and sim.dtype == np.float32
        np.testing.assert_allclose(sim, got, rtol=rtol, atol=atol)
        np.testing.assert_allclose(sim, ref_sim, rtol=rtol, atol=atol)
        d = np.diff(sim.astype(np.float64), axis=1)
        assert (d <= 0).all(), "similarities not sorted descending"
        tie = d == 0
        assert (np.diff(idx, axis=1)[tie] > 0).all(), "equal similarities not ordered by index"
    for i in range(n):
        kth = ref_sim[i, -1]
        sure = kth + tol[i, -1]  # strictly above the boundary, beyond tolerance
        mine = set(idx[i].tolist())
        ref = set(ref_idx[i].tolist())
        for j in ref ^ mine:
            assert S[i, j] <= sure, f"row {i}: neighbour {j} (sim {S[i, j]}) differs from the reference"
