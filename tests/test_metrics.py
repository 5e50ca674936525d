"""qaconv_gs.metrics against the loop references in oracle/metrics.py and hand-computed cases."""

import math
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from oracle.metrics import cmc_map_ref, rerank_ref, verification_ref
from qaconv_gs import metrics
from qaconv_gs.metrics import cmc_map, rerank, scores_to_distances, verification


def assert_ranking_equal(res, ref):
    cmc, mAP, ap, n_valid, n_skipped = ref
    np.testing.assert_allclose(res.cmc, cmc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.ap, ap, rtol=0, atol=1e-12)  # NaN positions must agree too
    if math.isnan(mAP):
        assert math.isnan(res.mAP)
    else:
        assert res.mAP == pytest.approx(mAP, abs=1e-12)
    assert (res.num_valid_queries, res.num_skipped_queries) == (n_valid, n_skipped)


# ------------------------------------------------------------------------------------------------ cmc_map

# 2 queries x 5 gallery. gallery ids [1, 2, 1, -1, 3], cameras [0, 0, 1, 0, 0].
HAND_GIDS = np.array([1, 2, 1, -1, 3])
HAND_GCAMS = np.array([0, 0, 1, 0, 0])
HAND_QIDS = np.array([1, 1])
HAND_QCAMS = np.array([0, 2])
HAND_SCORES = np.array(
    [
        [0.9, 0.8, 0.7, 0.95, 0.1],
        [0.3, 0.6, 0.5, 0.1, 0.6],
    ]
)


def test_hand_example_with_cameras():
    # q0 (id 1, cam 0): order g3 g0 g1 g2 g4. g3 is junk; g0 has id 1 AND cam 0: ignored.
    #   kept: g1 (id 2), g2 (id 1: hit at rank 2), g4  ->  AP = 1/2, first hit rank 2.
    # q1 (id 1, cam 2): order g1 g4 (tie at 0.6: lower index first) g2 g0 g3; only g3 (junk) goes.
    #   kept: g1, g4, g2 (hit, rank 3), g0 (hit, rank 4)  ->  AP = (1/3 + 2/4) / 2 = 5/12.
    # CMC over 2 valid queries: rank 1: 0, rank 2: 1/2, rank >= 3: 1. mAP = (1/2 + 5/12) / 2 = 11/24.
    res = cmc_map(HAND_SCORES, HAND_QIDS, HAND_GIDS, HAND_QCAMS, HAND_GCAMS, max_rank=6)
    np.testing.assert_allclose(res.cmc, [0, 0.5, 1, 1, 1, 1])
    np.testing.assert_allclose(res.ap, [0.5, 5 / 12])
    assert res.mAP == pytest.approx(11 / 24)
    assert (res.num_valid_queries, res.num_skipped_queries) == (2, 0)
    assert res.rank(1) == 0 and res.rank(2) == 0.5 and res.rank(6) == 1
    assert_ranking_equal(
        res, cmc_map_ref(HAND_SCORES, HAND_QIDS, HAND_GIDS, HAND_QCAMS, HAND_GCAMS, max_rank=6)
    )


def test_hand_example_without_cameras_ignores_only_junk():
    # q0: kept g0 (hit, rank 1), g1, g2 (hit, rank 3), g4  ->  AP = (1 + 2/3) / 2 = 5/6. q1 unchanged: 5/12.
    res = cmc_map(HAND_SCORES, HAND_QIDS, HAND_GIDS, max_rank=3)
    np.testing.assert_allclose(res.cmc, [0.5, 0.5, 1])
    np.testing.assert_allclose(res.ap, [5 / 6, 5 / 12])
    assert res.mAP == pytest.approx(5 / 8)


def test_ties_follow_gallery_index_for_similarities_and_distances():
    # all scores equal: the order is g0 g1 g2, the match (id 7) is at rank 2
    for hib in (True, False):
        res = cmc_map([[1.0, 1.0, 1.0]], [7], [5, 7, 5], higher_is_better=hib, max_rank=3)
        np.testing.assert_allclose(res.cmc, [0, 1, 1])
        assert res.ap[0] == 0.5
    # -0.0 and 0.0 tie as well
    res = cmc_map([[0.0, -0.0]], [2], [1, 2], max_rank=2)
    assert res.rank(1) == 0.0


def test_same_camera_matches_ignored_other_camera_kept():
    # the only same-id image shares the camera: skipped; with another camera it is a rank-1 hit
    assert cmc_map([[1.0, 0.0]], [3], [3, 4], [0], [0, 1]).num_skipped_queries == 1
    res = cmc_map([[1.0, 0.0]], [3], [3, 4], [0], [1, 1])
    assert res.rank(1) == 1.0 and res.mAP == 1.0
    # a different id on the query's camera is a normal non-match, not ignored
    res = cmc_map([[1.0, 0.5]], [3], [4, 3], [0], [0, 1], max_rank=2)
    np.testing.assert_allclose(res.cmc, [0, 1])


def test_junk_is_removed_before_ranking():
    # the junk image scores highest; without removal the match would be at rank 2
    res = cmc_map([[0.9, 0.5, 0.1]], [4], [-1, 4, 2], max_rank=2)
    np.testing.assert_allclose(res.cmc, [1, 1])
    assert res.ap[0] == 1.0


def test_distractor_id_zero_is_an_ordinary_id():
    # id 0 stays in the gallery as a non-match for other ids ...
    res = cmc_map([[0.9, 0.5]], [4], [0, 4], max_rank=2)
    np.testing.assert_allclose(res.cmc, [0, 1])
    # ... and matches a query whose id is 0
    assert cmc_map([[0.9, 0.5]], [0], [0, 4]).rank(1) == 1.0


def test_queries_without_valid_match_are_skipped_and_counted():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    # q0: id 1 found at rank 1; q1: id 9 absent; q2: id -1 (junk query) can never match
    res = cmc_map(scores, [1, 9, -1], [1, 2], max_rank=2)
    assert (res.num_valid_queries, res.num_skipped_queries) == (1, 2)
    assert res.ap[0] == 1.0 and np.isnan(res.ap[1:]).all()
    np.testing.assert_allclose(res.cmc, [1, 1])
    assert res.mAP == 1.0


def test_all_junk_gallery_gives_nan_and_counts_every_query():
    res = cmc_map(np.ones((3, 4)), [1, 2, 3], [-1, -1, -1, -1], max_rank=5)
    assert (res.num_valid_queries, res.num_skipped_queries) == (0, 3)
    assert np.isnan(res.cmc).all() and res.cmc.shape == (5,)
    assert math.isnan(res.mAP) and np.isnan(res.ap).all()


def test_cmc_length_is_max_rank_even_beyond_the_gallery():
    res = cmc_map([[0.1, 0.9]], [1], [1, 2], max_rank=10)
    np.testing.assert_allclose(res.cmc, [0] + [1] * 9)


@pytest.mark.parametrize("seed", range(12))
def test_cmc_map_matches_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    Q, G = int(rng.integers(1, 25)), int(rng.integers(1, 40))
    scores = rng.integers(-3, 4, (Q, G)).astype(np.float64)  # many ties, and -0.0 after negation
    if seed % 4 == 1:
        scores[rng.random((Q, G)) < 0.1] = np.inf
    qids = rng.integers(-1, 5, Q)
    gids = rng.integers(-1, 5, G)
    qcams, gcams = rng.integers(0, 3, Q), rng.integers(0, 3, G)
    for cams in ((None, None), (qcams, gcams)):
        for hib in (True, False):
            kw = dict(higher_is_better=hib, max_rank=int(rng.integers(1, 12)))
            ref = cmc_map_ref(scores, qids, gids, *cams, **kw)
            for block in (1, 3, None):
                assert_ranking_equal(cmc_map(scores, qids, gids, *cams, block_size=block, **kw), ref)


@pytest.mark.parametrize("seed", range(8))
def test_single_gallery_shot_matches_reference(seed):
    rng = np.random.default_rng(100 + seed)
    Q, G = int(rng.integers(1, 20)), int(rng.integers(1, 40))
    scores = rng.integers(0, 5, (Q, G)).astype(np.float64)
    qids, gids = rng.integers(-1, 4, Q), rng.integers(-1, 4, G)
    qcams, gcams = rng.integers(0, 2, Q), rng.integers(0, 2, G)
    kw = dict(single_gallery_shot=True, repeat=int(rng.integers(1, 6)), seed=seed, max_rank=8)
    ref = cmc_map_ref(scores, qids, gids, qcams, gcams, **kw)
    for block in (1, 4, None):
        assert_ranking_equal(cmc_map(scores, qids, gids, qcams, gcams, block_size=block, **kw), ref)


def test_single_gallery_shot_determinism_and_ap():
    rng = np.random.default_rng(7)
    scores = rng.standard_normal((30, 60))
    qids, gids = rng.integers(0, 6, 30), rng.integers(0, 6, 60)
    a = cmc_map(scores, qids, gids, single_gallery_shot=True, seed=3, repeat=5)
    b = cmc_map(scores, qids, gids, single_gallery_shot=True, seed=3, repeat=5)
    c = cmc_map(scores, qids, gids, single_gallery_shot=True, seed=4, repeat=5)
    np.testing.assert_array_equal(a.cmc, b.cmc)
    assert not np.array_equal(a.cmc, c.cmc)
    # AP is computed on the full kept gallery, as in torchreid's cuhk03 mode
    full = cmc_map(scores, qids, gids)
    np.testing.assert_array_equal(a.ap, full.ap)
    # one image per id: with 6 ids (0..5) the chosen match is always within rank 6; not so in the full list
    assert a.rank(6) == 1.0 and full.rank(6) < 1.0


def test_single_gallery_shot_with_one_image_per_id_is_the_plain_cmc():
    rng = np.random.default_rng(8)
    scores = rng.standard_normal((9, 12))
    gids = np.arange(12)
    qids = rng.integers(0, 12, 9)
    a = cmc_map(scores, qids, gids, single_gallery_shot=True, repeat=3, max_rank=12)
    np.testing.assert_allclose(a.cmc, cmc_map(scores, qids, gids, max_rank=12).cmc)


def test_distances_and_similarities_give_the_same_result():
    rng = np.random.default_rng(9)
    sim = rng.integers(0, 6, (20, 30)).astype(np.float64)
    qids, gids = rng.integers(0, 4, 20), rng.integers(-1, 4, 30)
    qc, gc = rng.integers(0, 2, 20), rng.integers(0, 2, 30)
    for kw in ({}, dict(single_gallery_shot=True, repeat=4, seed=1)):
        a = cmc_map(sim, qids, gids, qc, gc, **kw)
        b = cmc_map(10.0 - sim, qids, gids, qc, gc, higher_is_better=False, **kw)
        np.testing.assert_array_equal(a.cmc, b.cmc)
        np.testing.assert_array_equal(a.ap, b.ap)


def test_float32_and_integer_scores_are_ranked_like_float64(monkeypatch):
    rng = np.random.default_rng(10)
    s32 = rng.standard_normal((17, 23)).astype(np.float32)
    qids, gids = rng.integers(0, 4, 17), rng.integers(-1, 4, 23)
    ref = cmc_map(s32.astype(np.float64), qids, gids)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 50)  # several NaN-check chunks and query blocks
    for s in (s32, np.asfortranarray(s32)):
        res = cmc_map(s, qids, gids)
        np.testing.assert_array_equal(res.cmc, ref.cmc)
        np.testing.assert_array_equal(res.ap, ref.ap)
    si = rng.integers(-5, 5, (17, 23)).astype(np.int16)
    assert_ranking_equal(cmc_map(si, qids, gids, max_rank=9), cmc_map_ref(si, qids, gids, max_rank=9))
    s32[-1, -1] = np.nan  # in the last chunk
    with pytest.raises(ValueError, match="scores: contains 1 NaN"):
        cmc_map(s32, qids, gids)


def test_result_is_frozen_and_read_only():
    res = cmc_map(HAND_SCORES, HAND_QIDS, HAND_GIDS)
    with pytest.raises(AttributeError):
        res.mAP = 1.0
    with pytest.raises(ValueError):
        res.cmc[0] = 1.0
    with pytest.raises(ValueError, match="r: expected an integer <= 50"):
        res.rank(51)
    with pytest.raises(ValueError, match="r: expected an integer >= 1"):
        res.rank(0)


def test_cmc_map_inputs_not_modified():
    scores = HAND_SCORES.copy()
    gids = HAND_GIDS.copy()
    cmc_map(scores, HAND_QIDS, gids, HAND_QCAMS, HAND_GCAMS, single_gallery_shot=True)
    np.testing.assert_array_equal(scores, HAND_SCORES)
    np.testing.assert_array_equal(gids, HAND_GIDS)


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (
            dict(query_ids=[1, 1, 1]),
            ValueError,
            r"query_ids: expected length 2 .*shape \(2, 5\).*got length 3",
        ),
        (dict(gallery_ids=[1, 2]), ValueError, r"gallery_ids: expected length 5 .*got length 2"),
        (dict(scores=[[0.1, np.nan, 0, 0, 0], [0] * 5]), ValueError, "scores: contains 1 NaN"),
        (dict(scores=np.zeros(5)), ValueError, r"scores: expected a 2-d array, got shape \(5,\)"),
        (dict(scores=np.zeros((2, 5), dtype=bool)), TypeError, "scores: expected a real"),
        (dict(scores=np.zeros((0, 5))), ValueError, "scores: expected a non-empty array"),
        (dict(query_ids=[1.5, 1]), TypeError, "query_ids: expected integer values"),
        (dict(query_cams=[0, 0]), ValueError, "query_cams, gallery_cams: pass both or neither"),
        (dict(query_cams=[0, 0, 0], gallery_cams=[0] * 5), ValueError, "query_cams: expected length 2"),
        (dict(max_rank=0), ValueError, "max_rank: expected an integer >= 1"),
        (dict(single_gallery_shot=True, repeat=0), ValueError, "repeat: expected an integer >= 1"),
        (dict(block_size=2.5), TypeError, "block_size: expected an integer"),
    ],
)
def test_cmc_map_bad_input(kwargs, exc, msg):
    args = dict(scores=HAND_SCORES, query_ids=HAND_QIDS, gallery_ids=HAND_GIDS)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        cmc_map(**args)


# ------------------------------------------------------------------------------------------- verification


def assert_verification_equal(res, ref):
    for k in ("accuracy", "accuracy_std", "eer", "auc"):
        assert getattr(res, k) == pytest.approx(ref[k], abs=1e-12), k
    for k in ("fold_accuracies", "fold_thresholds", "fpr", "tpr", "roc_thresholds"):
        np.testing.assert_allclose(getattr(res, k), ref[k], rtol=0, atol=1e-15, err_msg=k)
    assert res.tar_at_far.keys() == ref["tar_at_far"].keys()
    for f, t in ref["tar_at_far"].items():
        assert res.tar_at_far[f] == pytest.approx(t, abs=1e-15)


@given(
    data=st.lists(st.tuples(st.integers(-4, 4), st.booleans()), min_size=2, max_size=60),
    folds=st.integers(2, 10),
)
def test_verification_matches_reference(data, folds):
    scores = np.array([s for s, _ in data], dtype=np.float64) / 2  # halves: ties and exact midpoints
    same = np.array([y for _, y in data])
    if same.all() or not same.any() or folds > len(data):
        with pytest.raises(ValueError):
            verification(scores, same, folds=folds)
        return
    fars = (0.0, 0.05, 0.25, 1.0)
    res = verification(scores, same, folds=folds, far_targets=fars)
    assert_verification_equal(res, verification_ref(scores, same, folds=folds, far_targets=fars))


@pytest.mark.parametrize("seed", range(4))
def test_verification_matches_reference_continuous(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 120))
    same = rng.random(n) < 0.5
    same[:2] = [True, False]
    scores = rng.standard_normal(n) + 1.5 * same
    assert_verification_equal(verification(scores, same), verification_ref(scores, same))


def test_verification_perfectly_separable():
    same = np.array([True, False] * 50)
    scores = np.where(same, 1.0, -1.0) + np.linspace(0, 0.1, 100)
    res = verification(scores, same, folds=10)
    # SPEC's rule picks a threshold among the training scores: the smallest same-pair score of the other
    # folds. Fold 0 (pairs 0-9) holds the five lowest same pairs, all below its threshold (pair 10's
    # score), so they are rejected there; every other fold is perfect.
    np.testing.assert_array_equal(res.fold_accuracies, [0.5] + [1.0] * 9)
    assert res.accuracy == pytest.approx(0.95)
    np.testing.assert_array_equal(res.fold_thresholds, [scores[10]] + [1.0] * 9)
    assert res.thresholds is res.fold_thresholds and res.std == res.accuracy_std
    assert res.eer == 0.0 and res.auc == 1.0
    assert res.tar_at_far == {1e-3: 1.0, 1e-2: 1.0, 1e-1: 1.0}


def test_verification_hand_example():
    # pos 0.9 0.8 0.3, neg 0.5 0.2. ROC (fpr, tpr): (0,0) (0,1/3) (0,2/3) (1/2,2/3) (1/2,1) (1,1).
    # FPR - FNR is -1/3 at (0, 2/3) and +1/6 at (1/2, 2/3): crossing 2/3 of the way, EER = 1/3.
    # AUC = pairs won / 6 = (2 + 2 + 1) / 6.
    scores = np.array([0.9, 0.5, 0.8, 0.2, 0.3])
    same = np.array([1, 0, 1, 0, 1])
    res = verification(scores, same, folds=5, far_targets=(0.0, 0.5, 0.75))
    np.testing.assert_allclose(res.fpr, [0, 0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(res.tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    np.testing.assert_array_equal(res.roc_thresholds, [np.inf, 0.9, 0.8, 0.5, 0.3, 0.2])
    assert res.roc[0] is res.fpr
    assert res.eer == pytest.approx(1 / 3)
    assert res.auc == pytest.approx(5 / 6)
    assert res.tar_at_far == {0.0: pytest.approx(2 / 3), 0.5: 1.0, 0.75: 1.0}


def test_verification_folds_are_contiguous_and_threshold_ties_go_low():
    # 3 folds of sizes 2, 2, 1 (np.array_split). Fold 0 = pairs 0-1, trained on pairs 2-4.
    scores = np.array([0.0, 1.0, 0.0, 1.0, 2.0])
    same = np.array([0, 1, 1, 0, 1])
    res = verification(scores, same, folds=3)
    # train on (0.0 same) (1.0 diff) (2.0 same): thresholds 0.0 and 2.0 both get 2 of 3 right -> 0.0
    assert res.fold_thresholds[0] == 0.0
    assert res.fold_accuracies[0] == 0.5
    assert_verification_equal(res, verification_ref(scores, same, folds=3))


def test_verification_roc_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    same = rng.random(300) < 0.4
    scores = np.round(rng.standard_normal(300) + same, 1)
    res = verification(scores, same)
    fpr, tpr, thr = sklearn_metrics.roc_curve(same, scores, drop_intermediate=False)
    np.testing.assert_allclose(res.fpr, fpr)
    np.testing.assert_allclose(res.tpr, tpr)
    np.testing.assert_allclose(res.roc_thresholds[1:], thr[1:])
    assert res.auc == pytest.approx(sklearn_metrics.roc_auc_score(same, scores))


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(same=[1, 0, 1]), ValueError, r"same: expected length 4 \(one per score\), got length 3"),
        (dict(scores=[0.1, np.nan, 0.3, 0.4]), ValueError, "scores: contains 1 NaN"),
        (dict(scores=[0.1, np.inf, 0.3, 0.4]), ValueError, "scores: contains 1 infinite"),
        (dict(scores=np.zeros((2, 2))), ValueError, r"scores: expected a 1-d array, got shape \(2, 2\)"),
        (dict(same=[1, 1, 1, 1]), ValueError, "same: both same .* are needed"),
        (dict(same=[2, 0, 1, 0]), ValueError, "same: expected only 0/1"),
        (dict(same=["a", "b", "c", "d"]), TypeError, "same: expected a bool"),
        (dict(folds=5), ValueError, "folds: expected at most the number of pairs N = 4"),
        (dict(folds=1), ValueError, "folds: expected an integer >= 2"),
        (dict(far_targets=(1.5,)), ValueError, "far_targets: expected a number <= 1"),
        (dict(far_targets=0.1), TypeError, "far_targets: expected a sequence"),
    ],
)
def test_verification_bad_input(kwargs, exc, msg):
    args = dict(scores=[0.1, 0.2, 0.3, 0.4], same=[1, 0, 1, 0], folds=2)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        verification(**args)


# ------------------------------------------------------------------------------------------------- rerank


def random_distances(rng, Q, G, *, integer=False, zero_diagonal=True):
    X = rng.standard_normal((Q + G, 3))
    D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    if integer:
        D = np.round(2 * D)  # ties everywhere
    if not zero_diagonal:
        D = D + rng.random(D.shape)  # not symmetric either; self need not be the nearest
    return D[:Q, Q:], D[:Q, :Q], D[Q:, Q:]


@pytest.mark.parametrize("seed", range(10))
def test_rerank_matches_dense_reference(seed):
    rng = np.random.default_rng(seed)
    Q, G = int(rng.integers(1, 41)), int(rng.integers(1, 41))
    q_g, q_q, g_g = random_distances(rng, Q, G, integer=seed % 3 == 1, zero_diagonal=seed % 5 != 4)
    k1 = int(rng.integers(1, 12)) if seed % 2 else int(rng.integers(Q + G, Q + G + 10))  # k1 > N: clamped
    k2 = int(rng.integers(1, 8))
    lam = float(rng.choice([0.0, 0.3, 1.0]))
    out = rerank(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
    ref = rerank_ref(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
    assert out.shape == (Q, G) and out.dtype == np.float64
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_rerank_defaults_match_reference_and_do_not_depend_on_chunking(monkeypatch):
    rng = np.random.default_rng(21)
    q_g, q_q, g_g = random_distances(rng, 30, 40)
    out = rerank(q_g, q_q, g_g)
    np.testing.assert_allclose(out, rerank_ref(q_g, q_q, g_g), rtol=0, atol=1e-6)
    monkeypatch.setattr(metrics, "_PAIR_BUDGET", 50)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 100)
    np.testing.assert_allclose(rerank(q_g, q_q, g_g), out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_smallest_is_the_stable_argsort_prefix(monkeypatch, k):
    rng = np.random.default_rng(k)
    D = rng.integers(0, 4, (15, 12)).astype(np.float64)  # heavy ties at the k-th value
    want = np.argsort(D, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(metrics._smallest(D, k), want)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 30)
    np.testing.assert_array_equal(metrics._smallest(D, k), want)


def test_rerank_lambda_one_is_the_normalised_distance():
    rng = np.random.default_rng(5)
    q_g, q_q, g_g = random_distances(rng, 6, 9)
    out = rerank(q_g, q_q, g_g, lambda_value=1.0)
    col_max = np.maximum(q_g.max(axis=1), q_q.max(axis=1))  # symmetric input: row i's maximum
    np.testing.assert_allclose(out, q_g / col_max[:, None], atol=1e-15)


def test_rerank_identical_samples_have_zero_jaccard():
    # a query equal to a gallery item and far from the rest: same k-reciprocal sets, distance 0
    X = np.array([[0.0], [10.0], [0.0], [10.0], [20.0]])
    D = np.abs(X - X.T)
    Q = 2
    out = rerank(D[:Q, Q:], D[:Q, :Q], D[Q:, Q:], k1=1, k2=1, lambda_value=0.0)
    assert out[0, 0] == pytest.approx(0.0, abs=1e-12)
    assert out[0, 1] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(q_q=np.zeros((3, 3))), ValueError, r"q_q: expected shape \(2, 2\) for q_g of shape \(2, 3\)"),
        (dict(g_g=np.zeros((2, 2))), ValueError, r"g_g: expected shape \(3, 3\)"),
        (dict(q_g=-np.ones((2, 3))), ValueError, "q_g: distances must be >= 0"),
        (dict(q_g=np.full((2, 3), np.nan)), ValueError, "q_g: contains 6 NaN"),
        (dict(q_g=np.ones(3)), ValueError, "q_g: expected a 2-d array"),
        (dict(k1=0), ValueError, "k1: expected an integer >= 1"),
        (dict(k2=0), ValueError, "k2: expected an integer >= 1"),
        (dict(lambda_value=1.5), ValueError, "lambda_value: expected a number <= 1"),
    ],
)
def test_rerank_bad_input(kwargs, exc, msg):
    args = dict(q_g=np.ones((2, 3)), q_q=np.zeros((2, 2)), g_g=np.zeros((3, 3)))
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        rerank(**args)


def test_scores_to_distances():
    s = np.array([[-50.0, 0.0], [3.0, 800.0]])
    d = scores_to_distances(s)
    np.testing.assert_allclose(d, [[50.0, math.log(2)], [math.log1p(math.exp(-3)), 0.0]], rtol=1e-12, atol=0)
    assert (d >= 0).all() and np.isfinite(d).all()
    assert (np.diff(scores_to_distances(np.linspace(-30, 30, 101))) < 0).all()  # strictly decreasing
    z = scores_to_distances(s, zero_diagonal=True)
    assert z[0, 0] == 0 and z[1, 1] == 0 and z[0, 1] == d[0, 1]
    with pytest.raises(ValueError, match="zero_diagonal needs a square"):
        scores_to_distances(np.zeros((2, 3)), zero_diagonal=True)
    with pytest.raises(ValueError, match="scores: contains 1 infinite"):
        scores_to_distances([np.inf, 0.0])


def test_rerank_of_qaconv_like_scores_runs_end_to_end():
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 5, 25)
    emb = rng.standard_normal((5, 8))[ids] + 0.3 * rng.standard_normal((25, 8))
    S = 4 * emb @ emb.T / 8
    Q = 10
    d = rerank(
        scores_to_distances(S[:Q, Q:]),
        scores_to_distances(S[:Q, :Q], zero_diagonal=True),
        scores_to_distances(S[Q:, Q:], zero_diagonal=True),
        k1=6,
        k2=3,
    )
    before = cmc_map(S[:Q, Q:], ids[:Q], ids[Q:]).mAP
    after = cmc_map(d, ids[:Q], ids[Q:], higher_is_better=False).mAP
    assert 0 < before <= 1 and 0 < after <= 1


# -------------------------------------------------------------------------------------------------- plots


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    rank_res = cmc_map(HAND_SCORES, HAND_QIDS, HAND_GIDS, max_rank=5)
    ver = verification([0.9, 0.5, 0.8, 0.2, 0.3, 0.1], [1, 0, 1, 0, 1, 0], folds=2)
    paths = [
        metrics.plot_cmc(rank_res, tmp_path / "cmc.png"),
        metrics.plot_cmc({"a": rank_res, "b": rank_res}, tmp_path / "cmc2.png", max_rank=3, title="t"),
        metrics.plot_roc(ver, tmp_path / "roc.png"),
        metrics.plot_roc({"x": ver}, tmp_path / "roc2.png", log_far=False),
    ]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TypeError, match="result_or_dict: expected a RankingResult"):
        metrics.plot_cmc(ver, tmp_path / "bad.png")
    with pytest.raises(TypeError, match="value for 'a' is a RankingResult, expected VerificationResult"):
        metrics.plot_roc({"a": rank_res}, tmp_path / "bad.png")


def test_plots_without_matplotlib_say_how_to_install(monkeypatch, tmp_path):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    res = cmc_map(HAND_SCORES, HAND_QIDS, HAND_GIDS)
    with pytest.raises(ImportError, match=r"plot_cmc needs matplotlib.*qaconv-gs\[plot\]"):
        metrics.plot_cmc(res, tmp_path / "x.png")


def test_package_exports_metrics():
    import qaconv_gs

    assert qaconv_gs.metrics is metrics and "metrics" in qaconv_gs.__all__
    for name in metrics.__all__:
        assert getattr(metrics, name) is not None, name


# ------------------------------------------------------------------------------- ranked shortlists, names


def _ranked_ref(ranked, qids, gids, qcams=None, gcams=None, max_rank=10):
    """Loop reference of cmc_map_ranked: a valid match outside the list is never found."""
    Q = len(qids)
    ap = np.full(Q, np.nan)
    firsts = []
    for q in range(Q):

        def valid(j, q=q):
            if gids[j] != qids[q] or gids[j] == -1:
                return False
            return qcams is None or gcams[j] != qcams[q]

        total = sum(valid(j) for j in range(len(gids)))
        if total == 0:
            continue
        rank = hits = 0
        precs, first = [], None
        for j in ranked[q]:
            same_cam_match = qcams is not None and gids[j] == qids[q] and gcams[j] == qcams[q]
            if gids[j] == -1 or same_cam_match:
                continue
            rank += 1
            if gids[j] == qids[q]:
                hits += 1
                precs.append(hits / rank)
                first = rank if first is None else first
        ap[q] = sum(precs) / total
        firsts.append(first)
    n = len(firsts)
    cmc = np.array([sum(f is not None and f <= r for f in firsts) / n for r in range(1, max_rank + 1)])
    return cmc, float(np.nanmean(ap)) if n else math.nan, ap, n, Q - n


@pytest.mark.parametrize("seed", range(10))
def test_cmc_map_ranked_full_lists_are_cmc_map_bit_for_bit(seed):
    rng = np.random.default_rng(300 + seed)
    Q, G = int(rng.integers(1, 25)), int(rng.integers(1, 40))
    scores = rng.integers(-3, 4, (Q, G)).astype(np.float32)  # ties: cmc_map breaks them by gallery index
    qids, gids = rng.integers(-1, 5, Q), rng.integers(-1, 5, G)
    qcams, gcams = rng.integers(0, 3, Q), rng.integers(0, 3, G)
    order = np.argsort(-scores.astype(np.float64), axis=1, kind="stable")
    for cams in ((None, None), (qcams, gcams)):
        want = cmc_map(scores, qids, gids, *cams, max_rank=7)
        got = metrics.cmc_map_ranked(order, qids, gids, *cams, max_rank=7)
        np.testing.assert_array_equal(got.cmc, want.cmc)
        np.testing.assert_array_equal(got.ap, want.ap)
        assert got.mAP == want.mAP or (math.isnan(got.mAP) and math.isnan(want.mAP))
        assert (got.num_valid_queries, got.num_skipped_queries) == (
            want.num_valid_queries,
            want.num_skipped_queries,
        )


@pytest.mark.parametrize("seed", range(8))
def test_cmc_map_ranked_shortlists_match_the_loop_reference(seed):
    rng = np.random.default_rng(400 + seed)
    Q, G = int(rng.integers(1, 20)), int(rng.integers(2, 30))
    T = int(rng.integers(1, G + 1))
    ranked = np.stack([rng.permutation(G)[:T] for _ in range(Q)])
    qids, gids = rng.integers(-1, 5, Q), rng.integers(-1, 5, G)
    qcams, gcams = rng.integers(0, 3, Q), rng.integers(0, 3, G)
    for cams in ((None, None), (qcams, gcams)):
        ref = _ranked_ref(ranked, qids, gids, *cams, max_rank=9)
        assert_ranking_equal(metrics.cmc_map_ranked(ranked, qids, gids, *cams, max_rank=9), ref)


def test_cmc_map_ranked_hand_example():
    # query id 1: matches at 0 and 2, list [1, 0]: first hit at rank 2, AP = (1/2) / 2
    # query id 3: list [3, 1] = junk, id 2; its match (4) is not listed: valid, AP 0, never found
    # query id 7: no match in the gallery: skipped
    res = metrics.cmc_map_ranked([[1, 0], [3, 1], [4, 2]], [1, 3, 7], HAND_GIDS, max_rank=3)
    np.testing.assert_array_equal(res.cmc, [0.0, 0.5, 0.5])
    np.testing.assert_array_equal(res.ap, [0.25, 0.0, np.nan])
    assert res.mAP == 0.125 and (res.num_valid_queries, res.num_skipped_queries) == (2, 1)
    # with cameras, gallery 0 (id 1, camera 0) is the query's own camera: ignored
    res = metrics.cmc_map_ranked([[1, 0, 2]], [1], HAND_GIDS, [0], HAND_GCAMS, max_rank=2)
    np.testing.assert_array_equal(res.cmc, [0.0, 1.0])
    assert res.mAP == 0.5


@pytest.mark.parametrize(
    "ranked, qids, exc, msg",
    [
        ([[0, 0]], [1], ValueError, "ranked: row 0 lists a gallery index more than once"),
        ([[0, 5]], [1], ValueError, r"ranked: values must be gallery indices in \[0, 5\), got 5"),
        ([[0, -1]], [1], ValueError, r"ranked: values must be gallery indices in \[0, 5\), got -1"),
        ([[0.0, 1.0]], [1], TypeError, "ranked: expected an integer array"),
        ([0, 1], [1], ValueError, "ranked: expected a non-empty 2-d"),
        ([[0, 1]], [1, 2], ValueError, "query_ids: expected length 1"),
    ],
)
def test_cmc_map_ranked_bad_input(ranked, qids, exc, msg):
    with pytest.raises(exc, match=msg):
        metrics.cmc_map_ranked(ranked, qids, HAND_GIDS)


@pytest.mark.parametrize(
    "name, want",
    [
        ("0002_c1s1_000451_03.jpg", (2, 1)),
        ("/data/Market-1501/query/1501_c6s4_001902_01.jpg", (1501, 6)),
        ("C:\\market\\bounding_box_test\\0000_c3s1_000001_00.jpg", (0, 3)),
        ("-1_c3s2_000001_01.jpg", (-1, 3)),
        ("  0007_c2s3_070952_01.jpg\n", (7, 2)),
        ("0001_c2_f0046182.jpg", (1, 2)),  # DukeMTMC-reID
        ("0012_c14s3_000001_01.png", (12, 14)),
    ],
)
def test_parse_market_name(name, want):
    assert metrics.parse_market_name(name) == want


@pytest.mark.parametrize("name", ["foo.jpg", "", "0002c1s1.jpg", "-2_c1s1_0.jpg", "0002_s1c1.jpg", "x/0002"])
def test_parse_market_name_rejects_other_names(name):
    with pytest.raises(ValueError, match="is not a Market-1501 style image name"):
        metrics.parse_market_name(name)
    with pytest.raises(TypeError, match="name: expected a str"):
        metrics.parse_market_name(b"0002_c1s1_000451_03.jpg")


def test_read_market_list(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("query/0002_c1s1_000451_03.jpg\n\n-1_c3s2_000001_01.jpg\n0000_c6s1_000001_00.jpg\n\n")
    ids, cams = metrics.read_market_list(path)
    assert ids.dtype == cams.dtype == np.int64
    np.testing.assert_array_equal(ids, [2, -1, 0])
    np.testing.assert_array_equal(cams, [1, 3, 6])
    path.write_text("0002_c1s1_000451_03.jpg\n0003_c1s1_000451_03.jpg\nThumbs.db\n")
    with pytest.raises(ValueError, match=r"names.txt: line 3: 'Thumbs.db' is not a Market-1501 style"):
        metrics.read_market_list(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no image names"):
        metrics.read_market_list(path)
    with pytest.raises(FileNotFoundError):
        metrics.read_market_list(tmp_path / "missing.txt")


# ---------------------------------------------------------------- SPEC.md's pinned names


def test_rank_metrics_is_cmc_map_with_market_rules():
    rng = np.random.default_rng(7)
    S = rng.standard_normal((9, 30))
    qid, gid = rng.integers(0, 4, 9), rng.integers(-1, 4, 30)
    qc, gc = rng.integers(0, 2, 9), rng.integers(0, 2, 30)
    r = metrics.rank_metrics(S, qid, gid, qc, gc, max_rank=20)
    want = metrics.cmc_map(S, qid, gid, qc, gc, max_rank=20)
    assert r.cmc.dtype == np.float64 and r.cmc.shape == (20,)
    np.testing.assert_array_equal(r.cmc, want.cmc)
    assert r.mAP == want.mAP and r.num_valid_queries == want.num_valid_queries


def test_tar_at_far_scalar_and_sequence_match_verification():
    rng = np.random.default_rng(3)
    same = rng.random(400) < 0.5
    scores = rng.standard_normal(400) + same
    res = metrics.verification(scores, same)
    got = metrics.tar_at_far(scores, same, [1e-3, 1e-2, 1e-1])
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [res.tar_at_far[f] for f in (1e-3, 1e-2, 1e-1)])
    assert metrics.tar_at_far(scores, same, 0.1) == res.tar_at_far[0.1]
    assert metrics.tar_at_far(scores, same, 1.0) == 1.0


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(far=1.5), ValueError, "far"),
        (dict(far="0.1"), TypeError, "far"),
        (dict(same=[True] * 4), ValueError, "both same"),
        (dict(scores=[0.1, np.nan, 0.2, 0.3]), ValueError, "scores"),
    ],
)
def test_tar_at_far_bad_input(kwargs, exc, msg):
    args = dict(scores=[0.1, 0.2, 0.3, 0.4], same=[True, False, True, False], far=0.1)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        metrics.tar_at_far(**args)
