"""two_stage_search: exact QAConv scores of a pooled-cosine shortlist, checked against qaconv_gs.match
(exhaustive) and a float64 NumPy reference of the shortlist."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import qaconv_gs as qg
from qaconv_gs import search as search_mod
from qaconv_gs.head import init_head
from qaconv_gs.search import SearchResult, two_stage_search


def _data(rng, P=9, G=157, C=6, H=3, W=4, dup=True):
    """Maps, plus exact duplicates in the gallery (tied scores) and a head with uneven weights."""
    p = rng.standard_normal((P, C, H, W)).astype(np.float32)
    g = rng.standard_normal((G, C, H, W)).astype(np.float32)
    if dup:
        g[40] = g[3]  # tied with a lower index
        g[90] = g[11]
        g[120] = p[0]  # probe 0's likely best, tied with nothing else
    head = init_head(H * W, rng=rng)
    head["fc.weight"] = rng.uniform(0.2, 1.5, head["fc.weight"].shape).astype(np.float32)
    head["bn.running_var"] = np.array([0.7], np.float32)
    return p, g, head


def _exhaustive(full: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Top of each row of the [P, G] score matrix, score descending, ties to the lower index."""
    G = full.shape[1]
    ids = np.stack([np.lexsort((np.arange(G), -row))[:top] for row in full])
    return ids, np.take_along_axis(full, ids, 1)


def _pooled_ref(x: np.ndarray, grid: int = 1) -> np.ndarray:
    """[n, C, H, W] -> [n, C*grid*grid] float64 unit descriptors: location-normalised maps averaged over
    each cell (rows h*grid // H, columns w*grid // W), by explicit loops over the cells."""
    n, C, H, W = x.shape
    f = x.astype(np.float64)
    f = f / np.maximum(np.sqrt((f * f).sum(axis=1, keepdims=True)), 1e-12)
    rows, cols = np.arange(H) * grid // H, np.arange(W) * grid // W
    cells = [
        f[:, :, rows == a][:, :, :, cols == b].mean(axis=(2, 3)) for a in range(grid) for b in range(grid)
    ]
    d = np.stack(cells, axis=2).reshape(n, -1)  # channel-major, cells in row-major order
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)


def _check_shortlist(
    cand: np.ndarray, p: np.ndarray, g: np.ndarray, grid: int = 1, tol: float = 1e-6
) -> None:
    """cand [P, R] against the float64 pooled-cosine top-R: the same sets up to swaps within tol of the
    R-th cosine, in non-increasing cosine order (within tol)."""
    cos = _pooled_ref(p, grid) @ _pooled_ref(g, grid).T
    R = cand.shape[1]
    for i in range(p.shape[0]):
        ref = np.lexsort((np.arange(g.shape[0]), -cos[i]))[:R]
        kth = cos[i, ref[-1]]
        for j in set(ref.tolist()) ^ set(cand[i].tolist()):
            assert abs(cos[i, j] - kth) <= tol, (i, j, cos[i, j], kth)
        assert len(set(cand[i].tolist())) == R
        assert np.all(np.diff(cos[i, cand[i]]) <= tol)


# ---------------------------------------------------------------- exactness against qaconv_gs.match


@pytest.mark.parametrize("top", [1, 5, 157])
def test_all_candidates_equals_exhaustive(rng, isa, top):
    p, g, head = _data(rng)
    full = qg.match(p, g, head)
    res = two_stage_search(p, g, head, top=top, candidates=g.shape[0])
    assert isinstance(res, SearchResult) and res.candidates == g.shape[0]
    want_ids, want_sc = _exhaustive(full, top)
    assert res.ids.dtype == np.int64 and res.scores.dtype == np.float32
    assert res.ids.shape == res.scores.shape == (p.shape[0], top)
    np.testing.assert_array_equal(res.ids, want_ids)  # the same tie rule: the lower gallery index
    # summed as the match kernel sums: the same float32 bits, not just round-off
    np.testing.assert_array_equal(res.scores, want_sc)


def test_ties_go_to_the_lower_gallery_index(rng):
    p, g, head = _data(rng, dup=False)
    g[:] = g[7]  # every gallery map the same: every score tied
    res = two_stage_search(p, g, head, top=4, candidates=20)
    np.testing.assert_array_equal(res.ids, np.tile(np.arange(4), (p.shape[0], 1)))
    assert np.all(res.scores == res.scores[:, :1])


@pytest.mark.parametrize("R", [1, 3, 12])
def test_stage2_scores_are_exact(rng, R):
    p, g, head = _data(rng)
    full = qg.match(p, g, head)
    top = min(R, 3)
    res = two_stage_search(p, g, head, top=top, candidates=R)
    assert res.candidates == R and res.ids.shape == (p.shape[0], top)
    np.testing.assert_array_equal(res.scores, np.take_along_axis(full, res.ids, 1))
    # best first, ties to the lower index, no repeats
    for ids, sc in zip(res.ids, res.scores):
        assert len(set(ids.tolist())) == top
        assert all(s0 > s1 or (s0 == s1 and i0 < i1) for s0, s1, i0, i1 in zip(sc, sc[1:], ids, ids[1:]))
    # with top = R every shortlisted item comes back: the ranking within the shortlist is exhaustive
    res_all = two_stage_search(p, g, head, top=R, candidates=R)
    for i in range(p.shape[0]):
        sub = res_all.ids[i]
        want = sub[np.lexsort((sub, -full[i, sub]))]
        np.testing.assert_array_equal(res_all.ids[i], want)


def test_exact_when_shortlist_holds_the_top(rng):
    """Probes that are gallery maps: the pooled cosine ranks the copy first, so a short list finds it."""
    _, g, head = _data(rng, dup=False)
    p = g[[5, 50, 100]] + np.float32(0.01) * rng.standard_normal((3,) + g.shape[1:]).astype(np.float32)
    res = two_stage_search(p, g, head, top=1, candidates=8)
    np.testing.assert_array_equal(res.ids[:, 0], [5, 50, 100])
    np.testing.assert_array_equal(res.ids, _exhaustive(qg.match(p, g, head), 1)[0])


# ---------------------------------------------------------------- stage 1 against a float64 reference


@pytest.mark.parametrize("grid", [1, 2, 3])
def test_descriptors_match_float64_reference(rng, grid):
    p, _, _ = _data(rng, P=30, C=7, dup=False)
    p[4] = 0.0
    p[5, :, 1, 2] = 0.0  # one zero location: its normalised vector is 0, still counted in its cell's mean
    got = search_mod._pooled_descriptors(p, 2, grid)
    assert got.dtype == np.float32 and got.shape == (30, 7 * grid * grid)
    np.testing.assert_allclose(got, _pooled_ref(p, grid), rtol=0, atol=2e-7)


@pytest.mark.parametrize("R, grid", [(1, 1), (10, 1), (40, 1), (10, 2), (40, 3)])
def test_shortlist_matches_float64_reference(rng, R, grid):
    p, g, head = _data(rng, P=19, G=300, C=16, dup=False)
    res = two_stage_search(p, g, head, top=R, candidates=R, grid=grid)
    # the returned set is the shortlist (top = R), ordered by QAConv score: compare as sets
    cos = _pooled_ref(p, grid) @ _pooled_ref(g, grid).T
    for i in range(p.shape[0]):
        ref = np.lexsort((np.arange(g.shape[0]), -cos[i]))[:R]
        kth = cos[i, ref[-1]]
        for j in set(ref.tolist()) ^ set(res.ids[i].tolist()):
            assert abs(cos[i, j] - kth) <= 1e-6


@pytest.mark.parametrize("P, grid", [(1, 1), (8, 2), (21, 1)])
def test_first_stage_groups_and_chunks(rng, monkeypatch, P, grid):
    """Probe groups and gallery chunks (forced small) give the unchunked lists, in cosine order."""
    p, g, _ = _data(rng, P=P, G=250, C=5, dup=False)
    g[33] = g[201]  # an exactly tied pair across chunks
    dp = search_mod._pooled_descriptors(p, 2, grid)
    dg = search_mod._pooled_descriptors(g, 2, grid)
    one = search_mod._first_stage_pooled(dp, dg, 30, 2)
    assert search_mod._probe_group(P, 30, dp.shape[1]) == P  # one call: no grouping, no chunking
    monkeypatch.setattr(search_mod, "_STAGE1_LIST_BYTES", 12 * 3 * 37)  # chunks of 37 gallery rows
    monkeypatch.setattr(search_mod, "_STAGE1_ALL_PROBES_MAX_R", 10)
    monkeypatch.setattr(search_mod, "_STAGE1_SMALL_GROUP", 3)
    assert search_mod._probe_group(P, 30, dp.shape[1]) == min(P, 3)
    many = search_mod._first_stage_pooled(dp, dg, 30, 1)
    np.testing.assert_array_equal(one, many)
    _check_shortlist(one, p, g, grid)
    for row in one:  # the duplicate pair: if both listed, the lower index first
        if 33 in row and 201 in row:
            assert list(row).index(33) < list(row).index(201)


def test_zero_maps(rng):
    p, g, head = _data(rng, dup=False)
    g[10] = 0.0
    p[2] = 0.0
    full = qg.match(p, g, head)
    res = two_stage_search(p, g, head, top=3, candidates=g.shape[0])
    np.testing.assert_array_equal(res.ids, _exhaustive(full, 3)[0])
    np.testing.assert_array_equal(res.scores, _exhaustive(full, 3)[1])


# ---------------------------------------------------------------- blocking, threads, layouts


def test_block_and_threads_do_not_change_results(rng):
    p, g, head = _data(rng, P=13)
    ref = two_stage_search(p, g, head, top=6, candidates=25, block=1000, n_threads=2)
    for block, nt in [(1, 1), (4, 2), (13, 1), (None, None)]:
        res = two_stage_search(p, g, head, top=6, candidates=25, block=block, n_threads=nt)
        np.testing.assert_array_equal(res.ids, ref.ids)
        np.testing.assert_array_equal(res.scores, ref.scores)


def test_any_layout_and_dtype(rng):
    p, g, head = _data(rng)
    ref = two_stage_search(p, g, head, top=4, candidates=30)
    g64 = np.asfortranarray(g.astype(np.float64))
    res = two_stage_search(
        p.astype(">f4"), g64, {k: v.tolist() for k, v in head.items()}, top=4, candidates=30
    )
    np.testing.assert_array_equal(res.ids, ref.ids)
    np.testing.assert_array_equal(res.scores, ref.scores)
    assert g64.dtype == np.float64  # inputs untouched


def test_shared_fc_head(rng):
    p, g, _ = _data(rng)
    head = init_head(12, fc="shared", rng=rng)
    full = qg.match(p, g, head)
    res = two_stage_search(p, g, head, top=5, candidates=g.shape[0])
    np.testing.assert_array_equal(res.ids, _exhaustive(full, 5)[0])
    np.testing.assert_array_equal(res.scores, _exhaustive(full, 5)[1])


# ---------------------------------------------------------------- top, candidates: clamps and defaults


def test_top_and_candidates_clamped_to_gallery(rng):
    p, g, head = _data(rng, G=12, dup=False)
    full = qg.match(p, g, head)
    res = two_stage_search(p, g, head, top=50, candidates=80)
    assert res.candidates == 12 and res.ids.shape == (p.shape[0], 12)  # top > G: G columns
    np.testing.assert_array_equal(res.ids, _exhaustive(full, 12)[0])
    res = two_stage_search(p, g, head, top=50)  # default R: clamped to G as well
    assert res.candidates == 12 and res.ids.shape == (p.shape[0], 12)


def test_default_grid(rng):
    p, g, head = _data(rng, G=60, dup=False)  # H = 3 < DEFAULT_GRID: the default becomes min(H, W)
    a = two_stage_search(p, g, head, top=2, candidates=5)
    b = two_stage_search(p, g, head, top=2, candidates=5, grid=min(3, search_mod.DEFAULT_GRID))
    np.testing.assert_array_equal(a.ids, b.ids)
    p2 = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    g2 = rng.standard_normal((60, 3, 8, 8)).astype(np.float32)
    h2 = init_head(64, rng=rng)
    a = two_stage_search(p2, g2, h2, top=2, candidates=5)
    b = two_stage_search(p2, g2, h2, top=2, candidates=5, grid=search_mod.DEFAULT_GRID)
    np.testing.assert_array_equal(a.ids, b.ids)


def test_default_candidates(rng):
    p, g, head = _data(rng, G=400, dup=False)
    assert two_stage_search(p, g, head).candidates == search_mod.DEFAULT_CANDIDATES
    assert two_stage_search(p, g, head, top=150).candidates == 150  # raised to top
    assert two_stage_search(p, g, head, top=3).ids.shape == (p.shape[0], 3)


def test_top_above_candidates_is_an_error(rng):
    p, g, head = _data(rng)
    with pytest.raises(ValueError, match=r"candidates: expected at least top = 10 .* got 5"):
        two_stage_search(p, g, head, top=10, candidates=5)


# ---------------------------------------------------------------- faiss first stage


def test_faiss_first_stage(rng):
    pytest.importorskip("faiss")
    p, g, head = _data(rng, P=11, G=200, C=16, dup=False)
    a = two_stage_search(p, g, head, top=5, candidates=20)
    b = two_stage_search(p, g, head, top=5, candidates=20, first_stage="faiss")
    assert b.candidates == 20
    np.testing.assert_array_equal(b.scores, np.take_along_axis(qg.match(p, g, head), b.ids, 1))
    # no near-ties in these random descriptors: the same shortlist, hence the same result
    np.testing.assert_array_equal(a.ids, b.ids)


def test_faiss_missing_is_a_clear_import_error(rng, monkeypatch):
    p, g, head = _data(rng)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="first_stage='faiss' needs the faiss package"):
        two_stage_search(p, g, head, first_stage="faiss")


def test_progress(rng, capsys):
    p, g, head = _data(rng)
    two_stage_search(p, g, head, top=2, candidates=10, block=2, progress=True)
    assert f"scored {p.shape[0]}/{p.shape[0]} probes" in capsys.readouterr().err
    two_stage_search(p, g, head, top=2, candidates=10)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "change, exc, msg",
    [
        (dict(probe=np.zeros((2, 6, 3))), ValueError, r"probe: expected a 4-d array, got shape \(2, 6, 3\)"),
        (dict(gallery=np.zeros((0, 6, 3, 4))), ValueError, r"gallery: expected a non-empty array"),
        (
            dict(gallery=np.zeros((5, 7, 3, 4))),
            ValueError,
            r"gallery: expected maps of shape \(C, H, W\) = \(6, 3, 4\) like probe, got \(7, 3, 4\)",
        ),
        (dict(gallery=np.full((5, 6, 3, 4), np.nan)), ValueError, r"gallery: contains 360 NaN or Inf"),
        (dict(probe=np.full((1, 6, 3, 4), 1e39)), ValueError, r"probe: values exceed the float32 range"),
        (dict(probe=np.zeros((1, 6, 3, 4), bool)), TypeError, r"probe: expected a real floating-point"),
        (dict(head_state=[1, 2]), TypeError, r"head_state: expected a mapping"),
        (dict(head_state={"fc.weight": np.ones(5)}), ValueError, r"head_state: 'fc.weight' has 5 values"),
        (dict(top=0), ValueError, r"top: expected an integer >= 1, got 0"),
        (dict(top=True), TypeError, r"top: expected an integer, got bool"),
        (dict(top=2.5), TypeError, r"top: expected an integer, got float"),
        (dict(candidates=0, top=1), ValueError, r"candidates: expected an integer >= 1, got 0"),
        (dict(candidates="10"), TypeError, r"candidates: expected an integer, got str"),
        (dict(block=0), ValueError, r"block: expected an integer >= 1, got 0"),
        (dict(grid=0), ValueError, r"grid: expected an integer >= 1, got 0"),
        (dict(grid=4), ValueError, r"grid: expected at most min\(H, W\) = 3 cells per side, got 4"),
        (dict(grid=True), TypeError, r"grid: expected an integer, got bool"),
        (dict(n_threads=0), ValueError, r"n_threads: expected an integer >= 1"),
        (
            dict(first_stage="hnsw"),
            ValueError,
            r"first_stage: expected one of \('pooled', 'faiss'\), got 'hnsw'",
        ),
        (dict(progress=1), TypeError, r"progress: expected a bool, got int"),
    ],
)
def test_validation(rng, change, exc, msg):
    p, g, head = _data(rng, dup=False)
    kwargs = dict(probe=p, gallery=g, head_state=head)
    kwargs.update(change)
    args = [kwargs.pop("probe"), kwargs.pop("gallery"), kwargs.pop("head_state")]
    with pytest.raises(exc, match=msg):
        two_stage_search(*args, **kwargs)


def test_inputs_not_modified(rng):
    p, g, head = _data(rng)
    p0, g0 = p.copy(), g.copy()
    h0 = {k: v.copy() for k, v in head.items()}
    two_stage_search(p, g, head, top=3, candidates=20)
    np.testing.assert_array_equal(p, p0)
    np.testing.assert_array_equal(g, g0)
    for k in head:
        np.testing.assert_array_equal(head[k], h0[k])


def test_result_is_frozen(rng):
    p, g, head = _data(rng)
    res = two_stage_search(p, g, head, top=2, candidates=5)
    with pytest.raises(AttributeError):
        res.candidates = 3


# ---------------------------------------------------------------- the benchmark script (smoke test, tiny)


def test_bench_search_smoke(capsys):
    import argparse
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # benchmarks/ is a package at the repository root
        sys.path.insert(0, root)
    from benchmarks import bench_search

    args = argparse.Namespace(
        sizes=[120, 400], candidates=[10, 120, 500], grids=[1, 2], probes=12, max_exhaustive_pairs=2000,
        repeats=1, threads=1, data="synthetic", seed=0,
    )  # fmt: skip
    res = bench_search.run(args)
    assert res["data"] == "synthetic" and res["P"] == 12
    got = [(r["G"], r["grid"], r["R"]) for r in res["rows"]]
    assert got == [(G, grid, R) for G in (120, 400) for grid in (1, 2) for R in (10, 120)]
    for full in (res["rows"][1], res["rows"][3]):  # R = G: the exhaustive result, whatever the descriptor
        assert full["recall_at_10"] == 1.0 and full["rank1_agreement"] == 1.0
        assert full["rank1_acc"] == full["exhaustive_rank1_acc"]
        assert full["rank1_hits_kept"] in (1.0,) or np.isnan(full["rank1_hits_kept"])
    assert res["sizes"][1]["exhaustive_scaled"] and res["sizes"][1]["exhaustive_probes"] == 5
    report = {"machine": {"cpu": "cpu", "date": "today"}, "threads": 1, **res}
    report["chosen_default"] = bench_search.choose_default(res["rows"], args.sizes)
    bench_search.print_table(report)
    out = capsys.readouterr().out
    assert "| 400 | 2 | 120 |" in out and " *" in out and "rank-1 hits kept >= 99%" in out
    assert set(report["chosen_default"]) == {"accuracy", "hits"}
