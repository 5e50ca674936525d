"""k_mined: per-sample mined candidates (aligned correlation over all classes) against a float64
reference, ties, the cap at N - 1 - k_nearest, gradients through mined candidates, the row hook."""

from __future__ import annotations

import numpy as np
import oracle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qaconv_gs.model import QAConvGS, _top_per_row
from test_model import assert_close, head_before

C, H, W = 4, 2, 3
S = H * W


def ref_top(sc: np.ndarray, ids: np.ndarray, m: int):
    """The m best per row, ties to the lower id, by a full sort."""
    out_i, out_s = [], []
    for r in range(sc.shape[0]):
        order = sorted(range(sc.shape[1]), key=lambda j: (-sc[r, j], ids[r, j]))[:m]
        out_i.append(ids[r, order])
        out_s.append(sc[r, order])
    return np.array(out_i).reshape(sc.shape[0], -1), np.array(out_s).reshape(sc.shape[0], -1)


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 5),
    n=st.integers(0, 12),
    m=st.integers(1, 6),
    levels=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_top_per_row_matches_a_full_sort(B, n, m, levels, seed):
    rng = np.random.default_rng(seed)
    sc = rng.integers(0, levels, (B, n)).astype(np.float32)  # few levels: many ties
    sc[rng.random((B, n)) < 0.1] = -np.inf
    ids = np.stack([rng.permutation(50)[:n] for _ in range(B)]).astype(np.int64).reshape(B, n)
    got_i, got_s = _top_per_row(sc, ids, m)
    want_i, want_s = ref_top(sc, ids, min(m, n))
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)


def mining_model(N=30, k=3, k_mined=5, seed=0, **kw) -> QAConvGS:
    return QAConvGS(N, C, H, W, k_nearest=k, seed=seed, init="random", k_mined=k_mined, **kw)


def ref_mined(X, E, base, m):
    """float64: per sample, aligned correlation of normalised maps with every normalised row, the m best
    outside `base`, ties to the lower id."""
    Xn, _ = oracle.normalize(np.asarray(X, np.float64).reshape(len(X), C, S))
    En, _ = oracle.normalize(np.asarray(E, np.float64).reshape(len(E), C, S))
    sc = np.einsum("bcs,ncs->bn", Xn, En)
    for b in range(len(X)):
        sc[b, base[b]] = -np.inf
    ids = np.broadcast_to(np.arange(len(E)), sc.shape)
    return ref_top(sc, ids, m)


def test_mined_candidates_follow_the_float64_reference():
    m = mining_model()
    rng = np.random.default_rng(3)
    X = rng.standard_normal((8, C, H, W)).astype(np.float32)
    y = rng.integers(0, m.num_classes, 8)
    E = m.class_embed.copy()
    r = m.forward_backward(X, y)
    assert m.num_candidates == 1 + 3 + 5 and r.candidates.shape == (8, 9)
    base = oracle.candidates(y, m.class_neighbors)
    np.testing.assert_array_equal(r.candidates[:, :4], base)
    mined = r.candidates[:, 4:]
    want_ids, want_sc = ref_mined(X, E, base, 5)
    # float32 products may swap classes whose float64 scores are within round-off: compare scores
    Xn, _ = oracle.normalize(X.astype(np.float64).reshape(8, C, S))
    En, _ = oracle.normalize(E.astype(np.float64).reshape(-1, C, S))
    got_sc = np.einsum("bcs,bkcs->bk", Xn, En[mined])
    np.testing.assert_allclose(got_sc, want_sc, atol=1e-5)
    for b in range(8):
        assert len(set(r.candidates[b].tolist())) == 9  # distinct, none of the target / neighbours
    if np.abs(np.diff(want_sc, axis=1)).min() > 1e-4:  # no near-ties: the ids themselves must agree
        np.testing.assert_array_equal(mined, want_ids)


def test_mining_ties_go_to_the_lower_class_id():
    """Values +-1 on C = 4 channels: every normalised entry is +-1/2 and every correlation is exact, so
    the ten identical rows tie exactly and the lowest ids outside the target's row must win."""
    N, k = 16, 1
    m = mining_model(N=N, k=k, k_mined=4)
    rng = np.random.default_rng(1)
    pattern = np.where(rng.random((C, H, W)) < 0.5, -1.0, 1.0).astype(np.float32)
    E = np.where(rng.random((N, C, H, W)) < 0.5, -1.0, 1.0).astype(np.float32)
    E[3:13] = pattern  # classes 3..12 tie and match the sample exactly
    E[0] = -pattern  # the target is far from the sample, so the tied rows are the best
    sd = m.state_dict()
    sd["class_embed"] = E
    m.load_state_dict(sd)
    X = pattern[None].copy()
    r = m.forward_backward(X, np.array([0]))
    base = r.candidates[0, : 1 + k].tolist()
    want = [c for c in range(3, 13) if c not in base][:4]
    assert r.candidates[0, 1 + k :].tolist() == want


@pytest.mark.parametrize("k, k_mined, want", [(7, 5, 2), (9, 3, 0), (2, 0, 0), (4, 5, 5)])
def test_mined_per_sample_is_capped(k, k_mined, want):
    m = mining_model(N=10, k=k, k_mined=k_mined)
    assert m.mined_per_sample == want and m.num_candidates == 1 + k + want
    assert m.config["k_mined"] == k_mined
    rng = np.random.default_rng(0)
    r = m.forward_backward(rng.standard_normal((4, C, H, W)), np.array([0, 1, 2, 2]))
    assert r.candidates.shape == (4, 1 + k + want)
    if 1 + k + want == 10:  # every class once per row
        np.testing.assert_array_equal(np.sort(r.candidates, axis=1), np.tile(np.arange(10), (4, 1)))


def assert_step_matches_oracle(m: QAConvGS, fc: str, triplet: str, weights=None) -> None:
    """One step of `m` (14 classes) on a fixed batch against the float64 oracle scoring the same candidates
    (so any candidate rule, mined or k_batch, is checked through the losses, scores and gradients)."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((6, C, H, W)).astype(np.float32)
    y = np.array([1, 1, 5, 5, 9, 9])
    head0, E0 = head_before(m), m.class_embed.copy()
    r = m.forward_backward(X, y)
    ref = oracle.forward_backward(
        X, y, E0, head0, m.class_neighbors, fc, triplet, m.triplet_weight, m.margin, r.candidates, weights
    )
    for key in ("loss", "loss_cls", "loss_triplet"):
        assert getattr(r, key) == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    assert_close(r.scores, ref["scores"])
    assert_close(r.grad_features, ref["grad_features"], err_msg="grad_features")
    np.testing.assert_array_equal(r.grad_embed_ids, np.unique(r.candidates))
    assert_close(r.dense_grad_embed(14), ref["grad_embed"], err_msg="grad_embed")
    for k in ref["grad_head"]:
        np.testing.assert_allclose(r.grad_head[k], ref["grad_head"][k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("fc, triplet", [("separate", "class"), ("shared", "batch")])
def test_gradients_through_mined_candidates_match_the_oracle(fc, triplet):
    assert_step_matches_oracle(mining_model(N=14, k=2, k_mined=4, fc=fc, triplet=triplet), fc, triplet)


def test_row_hook_sees_the_mined_rows_before_they_are_read():
    m = mining_model(N=20, k=2, k_mined=3)
    seen = []
    m.set_row_hook(lambda ids: seen.append(np.array(ids)))
    rng = np.random.default_rng(2)
    r = m.forward_backward(rng.standard_normal((5, C, H, W)), np.array([0, 3, 3, 7, 19]))
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], np.unique(r.candidates))
    assert set(r.candidates[:, 3:].ravel()) <= set(seen[0].tolist())


def test_k_mined_validation():
    with pytest.raises(ValueError, match="k_mined"):
        mining_model(k_mined=-1)
    with pytest.raises(TypeError, match="k_mined"):
        mining_model(k_mined=1.5)
