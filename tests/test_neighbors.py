"""class_neighbors: blocked symmetric cosine kNN vs NumPy float64, the C reference and torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import oracle
import pytest
import qaconv_gs as qg
from hypothesis import given
from hypothesis import strategies as st
from isa_levels import ISAS, at_isa
from oracle import assert_neighbors_close
from qaconv_gs.neighbors import _class_neighbors_ref


def _clustered(rng, n, d, centres=7, noise=0.6):
    c = rng.standard_normal((centres, d))
    return (c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, d))).astype(np.float32)


# ---------------------------------------------------------------- correctness vs float64


@pytest.mark.parametrize("n", [2, 3, 97, 101])
@pytest.mark.parametrize("kind", ["first", "mid", "last"])
def test_matches_float64_reference(rng, n, kind):
    k = {"first": 1, "mid": max(1, n // 3), "last": n - 1}[kind]
    E = _clustered(rng, n, 37)
    idx, sim = qg.class_neighbors(E, k, return_similarity=True)
    assert_neighbors_close(idx, sim, E, k)


def test_sizes_crossing_blocks(rng):
    # 300 rows = 3 row blocks (two full, one partial), odd block count -> a bye in each round
    E = _clustered(rng, 300, 70)
    for k in (1, 5, 299):
        idx, sim = qg.class_neighbors(E, k, return_similarity=True, n_threads=2)
        assert_neighbors_close(idx, sim, E, k)


def test_long_rows_many_panels(rng):
    # D = 1000 spans several D-panels with a ragged last one
    E = rng.standard_normal((130, 1000)).astype(np.float32)
    idx, sim = qg.class_neighbors(E, 8, return_similarity=True)
    assert_neighbors_close(idx, sim, E, 8)


def test_return_similarity_false_gives_same_indices(rng):
    E = _clustered(rng, 150, 20)
    idx = qg.class_neighbors(E, 6)
    assert isinstance(idx, np.ndarray) and idx.dtype == np.int64 and idx.shape == (150, 6)
    idx2, _ = qg.class_neighbors(E, 6, return_similarity=True)
    np.testing.assert_array_equal(idx, idx2)


def test_scale_invariance_and_extreme_magnitudes(rng):
    # cosine ignores row scale (for norms above the 1e-12 floor); pow2 prescaling keeps 1e26 rows
    # (squares overflow float32) and 1e-10 rows (squares near the float32 floor) exact enough
    E = _clustered(rng, 60, 33)
    scales = np.exp(rng.uniform(-23, 60, size=(60, 1))).astype(np.float32)  # ~1e-10 .. 1e26
    E2 = E * scales
    assert np.isfinite(E2).all()
    idx, sim = qg.class_neighbors(E, 5, return_similarity=True)
    idx2, sim2 = qg.class_neighbors(E2, 5, return_similarity=True)
    assert_neighbors_close(idx2, sim2, E2, 5)
    np.testing.assert_allclose(sim2, sim, rtol=1e-5, atol=1e-6)
    big = np.full((3, 4), 3e38, dtype=np.float32)
    big[1] *= -1
    i3, s3 = qg.class_neighbors(big, 2, return_similarity=True)
    np.testing.assert_array_equal(i3, [[2, 1], [0, 2], [0, 1]])
    np.testing.assert_allclose(s3, [[1, -1], [-1, -1], [1, -1]], rtol=1e-6)


# ---------------------------------------------------------------- ties, duplicates, zero rows


def test_identical_embeddings_tie_rule_exact():
    E = np.tile(np.arange(1, 7, dtype=np.float32), (9, 1))
    idx, sim = qg.class_neighbors(E, 8, return_similarity=True)
    for i in range(9):
        np.testing.assert_array_equal(idx[i], [j for j in range(9) if j != i])
    assert len(np.unique(sim)) == 1  # the same bits for every pair


def test_duplicates_rank_first_in_index_order(rng):
    base = rng.standard_normal((40, 19)).astype(np.float32)
    which = rng.integers(0, 40, size=230)
    E = base[which]
    k = 12
    idx, sim = qg.class_neighbors(E, k, return_similarity=True, n_threads=2)
    assert_neighbors_close(idx, sim, E, k)
    for i in range(len(E)):
        dups = [j for j in np.flatnonzero(which == which[i]) if j != i]
        m = min(len(dups), k)
        np.testing.assert_array_equal(idx[i, :m], dups[:m])  # never self, lower index first
        # two copies of the same class anywhere in the list carry the same bits, lower index first
        groups = which[idx[i]]
        for g in np.unique(groups):
            pos = np.flatnonzero(groups == g)
            assert len(np.unique(sim[i, pos])) == 1
            assert (np.diff(idx[i, pos]) > 0).all()
            assert (np.diff(pos) == 1).all()  # copies are adjacent in the order


def test_zero_rows_have_similarity_zero():
    E = np.zeros((6, 5), dtype=np.float32)
    E[2] = [1, 2, 3, 4, 5]
    E[4] = [-1, -2, -3, -4, -5]
    idx, sim = qg.class_neighbors(E, 5, return_similarity=True)
    # a zero row ties (0.0) with everything: plain index order without itself
    np.testing.assert_array_equal(idx[0], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(sim[0], np.zeros(5, np.float32))
    np.testing.assert_array_equal(idx[2], [0, 1, 3, 5, 4])
    np.testing.assert_allclose(sim[2], [0, 0, 0, 0, -1], atol=1e-7)


def test_never_self_even_when_self_would_win(rng):
    # row 0 is far from everything, so "drop the first column" would keep a wrong answer
    E = rng.standard_normal((50, 8)).astype(np.float32)
    idx = qg.class_neighbors(E, 49)
    for i in range(50):
        assert sorted(idx[i].tolist()) == [j for j in range(50) if j != i]


# ---------------------------------------------------------------- C reference, threads, layout


def test_c_reference_agrees_on_separated_data(rng):
    n, k = 101, 10
    E = rng.standard_normal((n, 64)).astype(np.float32)
    ref_idx, ref_sim = oracle.class_neighbors(E, k + 1)
    gaps = -np.diff(ref_sim, axis=1)
    # precondition (fixed seed): no near-ties anywhere in the top k+1; both kernels are within
    # ~3e-8 of float64 here, so a 1e-6 gap cannot be reordered by rounding
    assert gaps.min() > 1e-6
    i_fast, s_fast = qg.class_neighbors(E, k, return_similarity=True, n_threads=2)
    i_ref, s_ref = _class_neighbors_ref(E, k, return_similarity=True)
    np.testing.assert_array_equal(i_fast, i_ref)
    np.testing.assert_array_equal(i_fast, ref_idx[:, :k])
    np.testing.assert_allclose(s_fast, s_ref, rtol=1e-5, atol=1e-6)


def test_c_reference_matches_float64(rng):
    E = _clustered(rng, 97, 29)
    idx, sim = _class_neighbors_ref(E, 96, return_similarity=True)
    assert_neighbors_close(idx, sim, E, 96)


@given(
    n=st.integers(2, 40),
    d=st.integers(1, 12),
    data=st.data(),
)
def test_property_integer_grid_exact_vs_c_reference(n, d, data):
    # small integers: many exact ties and zero rows; all dot products are exact in float32, so the
    # fast kernel must equal the C reference bit for bit, tie order included
    k = data.draw(st.integers(1, n - 1))
    vals = data.draw(st.lists(st.integers(-2, 2), min_size=n * d, max_size=n * d))
    E = np.asarray(vals, dtype=np.float32).reshape(n, d)
    i_fast, s_fast = qg.class_neighbors(E, k, return_similarity=True, n_threads=2)
    i_ref, s_ref = _class_neighbors_ref(E, k, return_similarity=True)
    np.testing.assert_array_equal(i_fast, i_ref)
    np.testing.assert_array_equal(s_fast.view(np.uint32), s_ref.view(np.uint32))
    assert_neighbors_close(i_fast, s_fast, E, k)


@given(n=st.integers(2, 300), d=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_property_random_vs_float64(n, d, seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, n))
    E = rng.standard_normal((n, d)).astype(np.float32)
    idx, sim = qg.class_neighbors(E, k, return_similarity=True, n_threads=2)
    assert_neighbors_close(idx, sim, E, k)


def test_threads_bit_identical(rng):
    # 700 rows = 6 blocks; duplicates make the tie rule part of the check
    E = _clustered(rng, 700, 90)
    E[100:110] = E[5]
    results = [qg.class_neighbors(E, 17, return_similarity=True, n_threads=t) for t in (1, 2, 3)]
    for idx, sim in results[1:]:
        np.testing.assert_array_equal(idx, results[0][0])
        np.testing.assert_array_equal(sim.view(np.uint32), results[0][1].view(np.uint32))


def test_nchw_equals_flattened(rng):
    E4 = rng.standard_normal((45, 4, 3, 5)).astype(np.float32)
    a = qg.class_neighbors(E4, 7, return_similarity=True)
    b = qg.class_neighbors(E4.reshape(45, -1), 7, return_similarity=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_torch_oracle_sets(rng):
    torch = pytest.importorskip("torch")
    E = _clustered(rng, 120, 48)
    k = 9
    T = torch.nn.functional.normalize(torch.from_numpy(E).double(), dim=1, eps=1e-12)
    S = T @ T.T
    S.fill_diagonal_(-float("inf"))
    tv, ti = torch.topk(S, k, dim=1)
    idx, sim = qg.class_neighbors(torch.from_numpy(E), k, return_similarity=True)
    np.testing.assert_allclose(sim, tv.numpy(), rtol=1e-5, atol=1e-6)
    S64 = S.numpy()
    for i in range(len(E)):
        kth = tv[i, -1].item()
        for j in set(idx[i].tolist()) ^ set(ti[i].tolist()):
            assert abs(S64[i, j] - kth) <= 1e-6 + 1e-5 * abs(kth)  # only boundary ties may differ


# ---------------------------------------------------------------- every SIMD path


@pytest.mark.parametrize(
    "n, d, k",
    [
        (2, 1, 1),
        (50, 7, 49),  # D < 8: the vector packs' scalar tails only
        (193, 37, 5),  # one full AVX2 block (192) + a 1-row block
        (400, 300, 12),  # 3 blocks (odd: a bye every round), a ragged second D-panel
        (257, 513, 256),  # k = N - 1, three panels (256 + 256 + 1)
    ],
)
def test_every_isa_vs_float64(isa, rng, n, d, k):
    E = _clustered(rng, n, d)
    idx, sim = qg.class_neighbors(E, k, return_similarity=True, n_threads=2)
    assert_neighbors_close(idx, sim, E, k)


def test_every_isa_exact_on_integer_grid(isa, rng):
    # small integers, D < 2^24 / 4: every product and partial sum is exact in float32 with or
    # without FMA, so each path must equal the C reference bit for bit, ties included
    E = rng.integers(-2, 3, size=(450, 40)).astype(np.float32)
    E[17] = E[300]  # exact duplicates across blocks
    E[5] = 0.0
    i_fast, s_fast = qg.class_neighbors(E, 30, return_similarity=True, n_threads=2)
    i_ref, s_ref = _class_neighbors_ref(E, 30, return_similarity=True)
    np.testing.assert_array_equal(i_fast, i_ref)
    np.testing.assert_array_equal(s_fast.view(np.uint32), s_ref.view(np.uint32))


def test_every_isa_threads_bit_identical(isa, rng):
    # 1349 rows: on AVX2, 4 blocks of 288 + 197 rows at one thread and 7 blocks of 192 + 5 rows at
    # more (too few big blocks per thread), 11 blocks of 128 on the portable path; many matches, so
    # the list scheduler hands them out in varying orders; 300 columns = two panels. The results must
    # not move by a bit, whatever the block size or the order.
    E = _clustered(rng, 1349, 300, centres=40, noise=0.3)
    E[700:720] = E[3]  # exact ties spread over blocks
    runs = [qg.class_neighbors(E, 20, return_similarity=True, n_threads=t) for t in (1, 2, 3, 5)]
    for idx, sim in runs[1:]:
        np.testing.assert_array_equal(idx, runs[0][0])
        np.testing.assert_array_equal(sim.view(np.uint32), runs[0][1].view(np.uint32))
    assert_neighbors_close(runs[0][0], runs[0][1], E, 20)


def test_every_isa_agrees_with_c_reference(isa, rng):
    # on rows without near-ties in the top k+1 the same lists as the scalar C reference;
    # similarities everywhere within the documented float32 panel-summation error
    n, k = 230, 10
    E = rng.standard_normal((n, 600)).astype(np.float32)
    _, ref_sim = oracle.class_neighbors(E, k + 1)
    clear = (-np.diff(ref_sim, axis=1)).min(axis=1) > 1e-6  # rows without near-ties
    assert clear.mean() > 0.8
    i_fast, s_fast = qg.class_neighbors(E, k, return_similarity=True, n_threads=2)
    i_ref, s_ref = _class_neighbors_ref(E, k, return_similarity=True)
    np.testing.assert_array_equal(i_fast[clear], i_ref[clear])
    np.testing.assert_allclose(s_fast, s_ref, rtol=1e-5, atol=1e-6)
    assert_neighbors_close(i_fast, s_fast, E, k)


def test_simd_paths_agree_to_rounding(rng):
    # the paths differ only in fused vs separate multiply-add: same lists, sims within rounding

    E = _clustered(rng, 300, 250)
    out = {}
    for level in ISAS:
        with at_isa(level):
            out[level] = qg.class_neighbors(E, 8, return_similarity=True)
    base_i, base_s = out["portable"]
    for idx, sim in out.values():
        np.testing.assert_allclose(sim, base_s, rtol=0, atol=2e-6)
        assert_neighbors_close(idx, sim, E, 8)


@pytest.mark.skipif("avx512" not in ISAS, reason="this CPU has no AVX-512: only one FMA kernel runs")
@pytest.mark.parametrize("n, d", [(1349, 300), (97, 7), (301, 513), (12, 16)])
def test_fma_kernels_same_bits(rng, n, d):
    # the AVX2 (6 x 16) and AVX-512 (12 x 16) block kernels sum each pair as the same float32 FMA
    # chain: identical lists and similarity bits, whatever the tile, the block size or the threads

    E = _clustered(rng, n, d, centres=max(2, n // 30), noise=0.3)
    E[n // 2 : n // 2 + 3] = E[1]  # exact ties
    k = min(20, n - 1)
    out = {}
    for level in ("avx2", "avx512"):
        with at_isa(level):
            out[level] = [qg.class_neighbors(E, k, return_similarity=True, n_threads=t) for t in (1, 3)]
    for (ia, sa), (ib, sb) in zip(out["avx2"], out["avx512"]):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(sa.view(np.uint32), sb.view(np.uint32))


def test_fma_probe_binding():
    from qaconv_gs import _native

    lanes = {"portable": 8, "avx2": 8, "avx512": 16}[_native.isa()]  # 12 chains of this many floats
    assert _native.neighbors_fma_probe(1000) == 1000 * 12 * lanes * 2
    assert _native.neighbors_fma_probe(0) == 0
    with pytest.raises(ValueError, match="iters"):
        _native.neighbors_fma_probe(-1)


# ---------------------------------------------------------------- input zoo


def test_input_zoo_accepted_and_unmodified(rng):
    E = _clustered(rng, 40, 12)
    want = qg.class_neighbors(E, 4, return_similarity=True)
    f64 = E.astype(np.float64)
    big = E.astype(">f4")
    wide = np.zeros((40, 24), np.float32)
    wide[:, ::2] = E
    noncontig = wide[:, ::2]
    fortran = np.asfortranarray(E)
    ro = E.copy()
    ro.setflags(write=False)
    for x in (f64, big, noncontig, fortran, ro, E.tolist()):
        before = np.array(x, copy=True)
        idx, sim = qg.class_neighbors(x, 4, return_similarity=True)
        np.testing.assert_array_equal(idx, want[0])
        np.testing.assert_allclose(sim, want[1], rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(x), before)
    ints = rng.integers(-5, 5, size=(30, 6))
    assert_neighbors_close(qg.class_neighbors(ints, 3), None, ints, 3)


@pytest.mark.parametrize(
    "E, k, kw, exc, match",
    [
        (np.ones((5, 3)), 0, {}, ValueError, r"k: .*\[1, 4\]"),
        (np.ones((5, 3)), 5, {}, ValueError, r"k: .*\[1, 4\]"),
        (np.ones((5, 3)), -1, {}, ValueError, "k"),
        (np.ones((5, 3)), True, {}, TypeError, "k"),
        (np.ones((5, 3)), 2.0, {}, TypeError, "k"),
        (np.ones((5, 3)), "2", {}, TypeError, "k"),
        (np.ones(5), 1, {}, ValueError, "E: .*2-d or 4-d"),
        (np.ones((5, 2, 3)), 1, {}, ValueError, "E"),
        (np.ones((1, 3)), 1, {}, ValueError, "E: .*at least 2 classes"),
        (np.ones((0, 3)), 1, {}, ValueError, "E"),
        (np.ones((4, 0)), 1, {}, ValueError, "E"),
        (np.array([[1.0, np.nan], [1.0, 2.0]]), 1, {}, ValueError, "E: .*NaN or Inf"),
        (np.array([[1.0, np.inf], [1.0, 2.0]]), 1, {}, ValueError, "E: .*NaN or Inf"),
        (np.array([[1e39, 1.0], [1.0, 2.0]]), 1, {}, ValueError, "E: .*float32 range"),
        (np.array([[1, 2], [3, 4]], dtype=object), 1, {}, TypeError, "E"),
        (np.ones((3, 2), dtype=bool), 1, {}, TypeError, "E"),
        (np.ones((3, 2), dtype=complex), 1, {}, TypeError, "E"),
        (None, 1, {}, TypeError, "E"),
        (np.ones((5, 3)), 2, {"n_threads": 0}, ValueError, "n_threads"),
        (np.ones((5, 3)), 2, {"n_threads": 1.5}, TypeError, "n_threads"),
        (np.ones((5, 3)), 2, {"return_similarity": "yes"}, TypeError, "return_similarity"),
    ],
)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e39 -> float32
def test_errors_name_the_argument(E, k, kw, exc, match):
    with pytest.raises(exc, match=match):
        qg.class_neighbors(E, k, **kw)


def test_private_binding_rechecks():
    # the C binding validates too (Python is not the only caller)
    from qaconv_gs import _native

    E = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="k"):
        _native.neighbors_topk(E, 4, 1, False)
    with pytest.raises(ValueError, match="E"):
        _native.neighbors_topk(np.ones((1, 3), np.float32), 1, 1, False)
    with pytest.raises(ValueError, match="n_threads"):
        _native.neighbors_topk(E, 1, 0, False)
    bad = E.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):  # QG_ENONFINITE from the kernel itself
        _native.neighbors_topk(bad, 1, 1, False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        _native.neighbors_topk_ref(bad, 1, 1, False)


def test_ctrl_c_stops_within_a_block():
    import signal
    import threading
    import time

    E = np.random.default_rng(3).standard_normal((3000, 4096), dtype=np.float32)  # ~1.5 s of work
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            qg.class_neighbors(E, 8, n_threads=1)
    finally:
        timer.cancel()
    assert time.perf_counter() - t0 < 1.0  # without polling it would raise only after the whole run


# ---------------------------------------------------------------- memory


_MEM_SCRIPT = textwrap.dedent(
    """
    import numpy as np, qaconv_gs as qg, sys
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    n, d, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    E = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    qg.class_neighbors(E[:300], 5, n_threads=2)  # warm up: OpenMP pool, lazy imports
    before = hwm()
    idx, sim = qg.class_neighbors(E, k, return_similarity=True, n_threads=2)
    print(hwm() - before, E.nbytes)
    """
)


def test_extra_memory_is_o_nk_plus_blocks():
    # Peak RSS (VmHWM, sees C allocations too) grows by the outputs, the N-vector of weights,
    # the finiteness check's row chunks and per-thread block scratch -- not by anything N x N
    # (which here would be 256 MB in float32) nor by a copy of E (33 MB).
    n, d, k = 8000, 1024, 16
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, str(n), str(d), str(k)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    grew, ebytes = map(int, out.stdout.split())
    outputs = n * k * (8 + 4)
    chunk_mask = (1 << 24) // 4  # bool mask of one finiteness chunk (16 MB of rows)
    portable = 2 * 128 * 256 * 4 + 128 * 128 * 8  # packs + double accumulator of a 128-row block pair
    avx2 = 192 * 256 * 4 + 256 * 16 * 4 + 192 * 192 * 4  # A rows, a B micro-panel, float accumulator
    scratch = 2 * max(portable, avx2) + (n // 128) ** 2  # two threads + the schedule's flags
    bound = outputs + n * 12 + chunk_mask + scratch + (4 << 20)  # + allocator slack
    assert grew < bound, (grew, bound)
    assert bound < min(ebytes, n * n * 4) // 2  # the bound itself rules out a copy of E or N x N


# ---------------------------------------------------------------- big case


@pytest.mark.slow
def test_big_case_sampled_rows():
    rng = np.random.default_rng(7)
    n, d, k = 20_000, 2_048, 32
    E = _clustered(rng, n, d, centres=200, noise=1.0)
    idx, sim = qg.class_neighbors(E, k, return_similarity=True)
    rows = rng.choice(n, 200, replace=False)
    X = E.astype(np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    S = X[rows] @ X.T
    S[np.arange(len(rows)), rows] = -np.inf
    ref = np.sort(S, axis=1)[:, ::-1][:, :k]
    np.testing.assert_allclose(sim[rows], ref, rtol=1e-5, atol=1e-6)
    got = np.take_along_axis(S, idx[rows], axis=1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert not (idx == np.arange(n)[:, None]).any()


def test_reference_helpers_self_check(rng):
    # the oracle itself: class_neighbors agrees with a plain argsort on tie-free data, and excludes self
    E = rng.standard_normal((30, 5))
    S = oracle.cosine_similarity(E)
    np.fill_diagonal(S, -np.inf)
    idx, sim = oracle.class_neighbors(E, 4)
    np.testing.assert_array_equal(idx, np.argsort(-S, axis=1, kind="stable")[:, :4])
