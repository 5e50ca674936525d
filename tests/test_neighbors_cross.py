"""Cross-block neighbours (qg_neighbors_cross_topk_f32): A x B only, with exactly the similarity bits of the
single-table kernel, so that diagonal + cross blocks of any partition merge into class_neighbors."""

from __future__ import annotations

import numpy as np
import pytest
import qaconv_gs as qg
from hypothesis import given
from hypothesis import strategies as st
from qaconv_gs import _native
from qaconv_gs.distributed import merge_topk
from qaconv_gs.neighbors import _class_neighbors_ref, _cross_class_neighbors


def _full_matrix(E: np.ndarray, ref: bool = False) -> np.ndarray:
    """[N, N] float32 similarities as the single-table kernel returns them (k = N - 1); diagonal NaN."""
    N = E.shape[0]
    fn = _class_neighbors_ref if ref else qg.class_neighbors
    idx, sim = fn(E, N - 1, return_similarity=True)
    full = np.full((N, N), np.nan, np.float32)
    full[np.arange(N)[:, None], idx] = sim
    return full


def _expected(full: np.ndarray, rows: np.ndarray, cols: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of full[rows][:, cols] under (similarity desc, id asc) -> (ids [len(rows), k], sims)."""
    sub = full[np.ix_(rows, cols)]
    order = np.stack([np.lexsort((cols, -sub[i]))[:k] for i in range(len(rows))])
    return cols[order], np.take_along_axis(sub, order, axis=1)


def _check_split(
    E: np.ndarray, split: int, k: int, n_threads: int = 2, full: np.ndarray | None = None
) -> None:
    """Cross block of rows [0, split) vs [split, N), with the global ids of the concatenated table."""
    N = E.shape[0]
    full = _full_matrix(E) if full is None else full
    a, b = np.arange(split), np.arange(split, N)
    ia, sa, ib, sb = _cross_class_neighbors(E[:split], E[split:], k, 0, split, True, n_threads)
    assert (
        ia.shape == sa.shape == (split, min(k, N - split)) and ia.dtype == np.int64 and sa.dtype == np.float32
    )
    assert ib.shape == sb.shape == (N - split, min(k, split))
    want_ia, want_sa = _expected(full, a, b, ia.shape[1])
    want_ib, want_sb = _expected(full, b, a, ib.shape[1])
    np.testing.assert_array_equal(ia, want_ia)
    np.testing.assert_array_equal(ib, want_ib)
    np.testing.assert_array_equal(sa.view(np.uint32), want_sa.view(np.uint32))  # the same float32 bits
    np.testing.assert_array_equal(sb.view(np.uint32), want_sb.view(np.uint32))


# ---------------------------------------------------------------- bits equal the single-table kernel


@pytest.mark.parametrize(
    "N, D, split",
    [
        (2, 1, 1),  # 1 x 1
        (3, 5, 1),  # a single row against two
        (3, 5, 2),
        (97, 7, 40),  # D < 8: the vector packs' scalar tails only
        (97, 300, 1),  # one row against a ragged 2-panel table
        (97, 300, 96),
        (401, 513, 193),  # 192-row AVX2 blocks + ragged ones on both sides, three panels (256 + 256 + 1)
        (300, 37, 150),
    ],
)
def test_bits_equal_single_table(isa, rng, N, D, split):
    E = rng.standard_normal((N, D)).astype(np.float32)
    for k in sorted({1, max(1, N // 3), N}):
        _check_split(E, split, k)


def test_ties_duplicates_and_zero_rows(isa, rng):
    N, D = 120, 45
    E = rng.integers(-2, 3, size=(N, D)).astype(np.float32)  # many equal similarities
    E[1::4] = E[0::4][: E[1::4].shape[0]]  # duplicates inside and across the two sides
    E[70] = E[3]
    E[10] = 0.0  # zero rows: similarity 0 to everything, ties broken by id
    E[100] = 0.0
    full = _full_matrix(E)
    for split in (1, 50, 119):
        for k in (1, 7, 60):
            _check_split(E, split, k, full=full)


def test_huge_and_tiny_magnitudes(isa, rng):
    # per-row power-of-two prescales: rows near the float32 range limits give the same bits as in the
    # single-table kernel (no overflow of squares, no flush of tiny products)
    E = rng.standard_normal((64, 300)).astype(np.float32)
    E[::5] *= np.float32(1e30)
    E[1::5] *= np.float32(1e-30)
    E[2] = np.float32(3e38) * np.sign(E[2])
    E[3] = np.float32(1e-42)  # subnormal entries
    full = _full_matrix(E)
    for split in (1, 20, 33):
        _check_split(E, split, 10, full=full)


def test_sides_swapped_give_the_same_lists(isa, rng):
    E = rng.standard_normal((250, 90)).astype(np.float32)
    ia, sa, ib, sb = _cross_class_neighbors(E[:100], E[100:], 9, 0, 100, True)
    jb, tb, ja, ta = _cross_class_neighbors(E[100:], E[:100], 9, 100, 0, True)
    for x, y in (
        (ia, ja),
        (ib, jb),
        (sa.view(np.uint32), ta.view(np.uint32)),
        (sb.view(np.uint32), tb.view(np.uint32)),
    ):
        np.testing.assert_array_equal(x, y)


def test_global_ids_offsets_and_gaps(rng):
    # A's ids after B's, with a gap: the lists record the given ids and ties still go to the lower id
    E = rng.integers(-1, 2, size=(30, 6)).astype(np.float32)
    E[20:] = E[:10]
    ia, sa, ib, sb = _cross_class_neighbors(E[:20], E[20:], 10, 1000, 7, True)
    assert set(np.unique(ia)) <= set(range(7, 17)) and set(np.unique(ib)) <= set(range(1000, 1020))
    ja, ta, jb, tb = _cross_class_neighbors(E[:20], E[20:], 10, 0, 20, True)
    np.testing.assert_array_equal(ia - 7, ja - 20)
    np.testing.assert_array_equal(sa, ta)
    np.testing.assert_array_equal(sb, tb)
    # B's row j duplicates A's row j: that pair has the top similarity of B's row j, and a tie goes to a
    # lower id
    own = sb[np.arange(10), np.argmax(ib == 1000 + np.arange(10)[:, None], axis=1)]
    assert (ib == 1000 + np.arange(10)[:, None]).any(axis=1).all()
    np.testing.assert_array_equal(own, sb[:, 0])
    assert (ib[:, 0] <= 1000 + np.arange(10)).all()


@pytest.mark.parametrize("want_sim", [True, False])
def test_without_similarity_same_indices(rng, want_sim):
    E = rng.standard_normal((80, 33)).astype(np.float32)
    out = _cross_class_neighbors(E[:30], E[30:], 5, return_similarity=want_sim)
    ia, ib = (out[0], out[2]) if want_sim else out
    ja, _, jb, _ = _cross_class_neighbors(E[:30], E[30:], 5, return_similarity=True)
    np.testing.assert_array_equal(ia, ja)
    np.testing.assert_array_equal(ib, jb)


def test_nchw_input_and_default_b_start(rng):
    E = rng.standard_normal((40, 3, 2, 2)).astype(np.float32)
    got = _cross_class_neighbors(E[:15], E[15:], 4, return_similarity=True)
    want = _cross_class_neighbors(E[:15].reshape(15, -1), E[15:].reshape(25, -1), 4, 0, 15, True)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- threads, reference


def test_threads_bit_identical(isa, rng):
    # 800 x 1000 rows: 5 x 6 AVX2 blocks (7 x 8 portable), so the scheduler hands the block pairs out in
    # varying orders; ties across blocks
    E = rng.standard_normal((1800, 45)).astype(np.float32)
    E[900:920] = E[3]
    runs = [_cross_class_neighbors(E[:800], E[800:], 20, 0, 800, True, t) for t in (1, 2, 3)]
    for run in runs[1:]:
        for x, y in zip(run, runs[0]):
            np.testing.assert_array_equal(
                x.view(np.uint32) if x.dtype == np.float32 else x,
                y.view(np.uint32) if y.dtype == np.float32 else y,
            )


def test_reference_bits_equal_single_table_reference(rng):
    # the scalar references: the cross one reproduces the symmetric one pair by pair
    E = rng.standard_normal((61, 70)).astype(np.float32)
    E[40] = E[2]
    full = _full_matrix(E, ref=True)
    ia, sa, ib, sb = _cross_class_neighbors(
        E[:25], E[25:], 61, 0, 25, True, 1, _kernel=_native.neighbors_cross_topk_ref
    )
    want_ia, want_sa = _expected(full, np.arange(25), np.arange(25, 61), 36)
    want_ib, want_sb = _expected(full, np.arange(25, 61), np.arange(25), 25)
    np.testing.assert_array_equal(ia, want_ia)
    np.testing.assert_array_equal(ib, want_ib)
    np.testing.assert_array_equal(sa.view(np.uint32), want_sa.view(np.uint32))
    np.testing.assert_array_equal(sb.view(np.uint32), want_sb.view(np.uint32))


def test_fast_vs_reference(isa, rng):
    # integer grid: every product and partial sum is exact, so each path equals the reference bit for bit
    E = rng.integers(-2, 3, size=(450, 40)).astype(np.float32)
    E[17] = E[300]
    E[5] = 0.0
    fast = _cross_class_neighbors(E[:200], E[200:], 30, 0, 200, True, 2)
    ref = _cross_class_neighbors(
        E[:200], E[200:], 30, 0, 200, True, 1, _kernel=_native.neighbors_cross_topk_ref
    )
    for x, y in zip(fast, ref):
        np.testing.assert_array_equal(x, y)
    # random data: the same error budget as class_neighbors
    E = rng.standard_normal((230, 600)).astype(np.float32)
    fast = _cross_class_neighbors(E[:100], E[100:], 10, return_similarity=True)
    ref = _cross_class_neighbors(
        E[:100], E[100:], 10, return_similarity=True, _kernel=_native.neighbors_cross_topk_ref
    )
    np.testing.assert_allclose(fast[1], ref[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast[3], ref[3], rtol=1e-5, atol=1e-6)


@given(
    N=st.integers(2, 60),
    D=st.integers(1, 40),
    cuts=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=4),
    kf=st.floats(0.0, 1.0),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_partition_merges_into_class_neighbors(N, D, cuts, kf, ties, seed):
    """Any partition into contiguous parts: diagonal blocks (symmetric kernel) + every cross block once,
    merged with merge_topk, give class_neighbors' indices and similarity bits."""
    rng = np.random.default_rng(seed)
    E = rng.standard_normal((N, D)).astype(np.float32)
    if ties:
        E[1::3] = E[0::3][: E[1::3].shape[0]]
        E[N // 2] = 0.0
    k = 1 + int(kf * (N - 2))
    b = sorted({0, N, *(int(c * N) for c in cuts)})
    parts = [(lo, hi) for lo, hi in zip(b[:-1], b[1:]) if hi > lo]
    lists: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {p: [] for p in range(len(parts))}
    for p, (lo, hi) in enumerate(parts):
        if hi - lo >= 2:
            i, s = qg.class_neighbors(E[lo:hi], min(k, hi - lo - 1), return_similarity=True)
            lists[p].append((i + lo, s))
        for q in range(p + 1, len(parts)):
            lq, hq = parts[q]
            ia, sa, ib, sb = _cross_class_neighbors(E[lo:hi], E[lq:hq], k, lo, lq, True)
            lists[p].append((ia, sa))
            lists[q].append((ib, sb))
    got_i = np.concatenate(
        [merge_topk([x[0] for x in lists[p]], [x[1] for x in lists[p]], k)[0] for p in lists]
    )
    got_s = np.concatenate(
        [merge_topk([x[0] for x in lists[p]], [x[1] for x in lists[p]], k)[1] for p in lists]
    )
    idx, sim = qg.class_neighbors(E, k, return_similarity=True)
    np.testing.assert_array_equal(got_i, idx)
    np.testing.assert_array_equal(got_s.view(np.uint32), sim.view(np.uint32))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "A, B, k, kw, exc, match",
    [
        (np.ones((3, 4)), np.ones((2, 5)), 1, {}, ValueError, r"B: expected rows of D = 4"),
        (np.ones((3, 4)), np.ones((2, 2, 2, 2)), 1, {}, ValueError, r"B: expected rows of D = 4"),
        (np.ones(3), np.ones((2, 3)), 1, {}, ValueError, "A: .*2-d or 4-d"),
        (np.ones((0, 3)), np.ones((2, 3)), 1, {}, ValueError, "A: expected a non-empty"),
        (np.ones((2, 3)), np.ones((0, 3)), 1, {}, ValueError, "B: expected a non-empty"),
        (np.ones((3, 4)), np.ones((2, 4)), 0, {}, ValueError, r"k: expected an integer >= 1"),
        (np.ones((3, 4)), np.ones((2, 4)), -3, {}, ValueError, "k"),
        (np.ones((3, 4)), np.ones((2, 4)), True, {}, TypeError, "k"),
        (np.ones((3, 4)), np.ones((2, 4)), 1.5, {}, TypeError, "k"),
        (np.array([[1.0, np.nan]]), np.ones((2, 2)), 1, {}, ValueError, "A: .*NaN or Inf"),
        (np.ones((2, 2)), np.array([[1.0, np.inf]]), 1, {}, ValueError, "B: .*NaN or Inf"),
        (np.ones((3, 4)), np.ones((2, 4)), 1, {"a_start": 0, "b_start": 2}, ValueError, "disjoint"),
        (np.ones((3, 4)), np.ones((2, 4)), 1, {"a_start": 5, "b_start": 4}, ValueError, "disjoint"),
        (np.ones((3, 4)), np.ones((2, 4)), 1, {"a_start": -1}, ValueError, "disjoint"),
        (np.ones((3, 4)), np.ones((2, 4)), 1, {"n_threads": 0}, ValueError, "n_threads"),
        (np.ones((3, 4)), np.ones((2, 4)), 1, {"return_similarity": "yes"}, TypeError, "return_similarity"),
        (np.ones((3, 4), dtype=complex), np.ones((2, 4)), 1, {}, TypeError, "A"),
        (None, np.ones((2, 4)), 1, {}, TypeError, "A"),
    ],
)
def test_errors_name_the_argument(A, B, k, kw, exc, match):
    with pytest.raises(exc, match=match):
        _cross_class_neighbors(A, B, k, **kw)


@pytest.mark.parametrize("kernel", ["neighbors_cross_topk", "neighbors_cross_topk_ref"])
def test_private_binding_rechecks(kernel):
    fn = getattr(_native, kernel)
    A, B = np.ones((3, 4), np.float32), np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="k: expected an integer >= 1"):
        fn(A, B, 0, 3, 0, 1, False)
    with pytest.raises(ValueError, match="B: expected shape"):
        fn(A, np.ones((2, 5), np.float32), 0, 3, 1, 1, False)
    with pytest.raises(ValueError, match="A: expected a 2-d array"):
        fn(np.ones(3, np.float32), B, 0, 3, 1, 1, False)
    with pytest.raises(ValueError, match="at least 1 row"):
        fn(A[:0], B, 0, 3, 1, 1, False)
    with pytest.raises(ValueError, match="disjoint"):
        fn(A, B, 0, 1, 1, 1, False)
    with pytest.raises(ValueError, match="disjoint"):
        fn(A, B, 2**63 - 2, 0, 1, 1, False)  # ids would reach the sentinel INT64_MAX
    with pytest.raises(ValueError, match="n_threads"):
        fn(A, B, 0, 3, 1, 0, False)
    bad = B.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):  # QG_ENONFINITE from the kernel itself
        fn(A, bad, 0, 3, 1, 1, False)
    # k beyond a side is clipped per side: A's lists hold nb = 2, B's na = 3
    ia, sa, ib, sb = fn(A, B, 0, 3, 10, 1, True)
    assert ia.shape == (3, 2) and ib.shape == (2, 3)
    np.testing.assert_array_equal(ia, [[3, 4]] * 3)  # all similarities 1: ties to the lower id
    np.testing.assert_array_equal(ib, [[0, 1, 2]] * 2)
    assert (sa == 1).all() and (sb == 1).all()


def test_ctrl_c_stops_within_a_block():
    import os
    import signal
    import threading
    import time

    E = np.random.default_rng(3).standard_normal((4000, 4096), dtype=np.float32)  # ~1.5 s of cross work
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            _cross_class_neighbors(E[:2000], E[2000:], 8, n_threads=1)
    finally:
        timer.cancel()
    assert time.perf_counter() - t0 < 1.0  # without polling it would raise only after the whole run
