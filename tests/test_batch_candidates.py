"""k_batch: per-sample extra candidates from the step's other classes, topped up with random classes; the
rule (in-batch classes first, never a duplicate, exactly k_batch more), determinism from (seed, labels),
the cap, gradients through the extras against the float64 oracle, and the sharded / adapter plumbing."""

from __future__ import annotations

import numpy as np
import pytest
import qaconv_gs as qg
from hypothesis import given, settings
from hypothesis import strategies as st
from qaconv_gs.distributed.model import ShardedQAConvGS
from qaconv_gs.model import QAConvGS
from test_mining import assert_step_matches_oracle

C, H, W = 4, 2, 3


def batch_model(N=30, k=3, k_batch=5, seed=0, **kw) -> QAConvGS:
    return QAConvGS(N, C, H, W, k_nearest=k, seed=seed, init="random", k_batch=k_batch, **kw)


def step(m: QAConvGS, y, seed=1):
    X = np.random.default_rng(seed).standard_normal((len(y), C, H, W)).astype(np.float32)
    return m.forward_backward(X, np.asarray(y))


@settings(max_examples=40, deadline=None)
@given(
    N=st.integers(6, 40),
    k=st.integers(1, 5),
    r=st.integers(1, 12),
    labels=st.lists(st.integers(0, 39), min_size=1, max_size=10),
    seed=st.integers(0, 2**16),
)
def test_extras_follow_the_rule(N, k, r, labels, seed):
    k = min(k, N - 1)
    y = np.array([c % N for c in labels])
    m = batch_model(N=N, k=k, k_batch=r, seed=seed)
    cand = step(m, y).candidates
    rr = m.batch_per_sample
    assert rr == min(r, N - 1 - k) and cand.shape == (len(y), 1 + k + rr) == (len(y), m.num_candidates)
    nbr = m.class_neighbors
    present = set(y.tolist())
    for i, row in enumerate(cand.tolist()):
        base, extra = row[: 1 + k], row[1 + k :]
        assert base == [int(y[i])] + nbr[y[i]].tolist()
        assert len(set(row)) == len(row)  # no class twice in a row
        assert all(0 <= c < N for c in extra)
        in_batch_left = present - set(base)
        # the batch's other classes come first: all of them when they fit, else only batch classes
        if len(in_batch_left) >= rr:
            assert set(extra) <= in_batch_left
        else:
            assert in_batch_left <= set(extra)


def test_pk_batch_gets_every_other_class_of_the_batch():
    # 4 classes x 2, k = 1: each sample's extras are the batch's classes outside its own row (2 or 3 of
    # them), then random classes outside the batch
    m = batch_model(N=50, k=1, k_batch=4)
    y = np.array([3, 3, 17, 17, 28, 28, 40, 40])
    cand = step(m, y).candidates
    for row in cand.tolist():
        left = {3, 17, 28, 40} - set(row[:2])
        assert left <= set(row[2:])
        assert not (set(row[2:]) - left) & {3, 17, 28, 40}


def test_draws_depend_on_seed_and_labels_only():
    y = np.array([0, 4, 4, 9])
    a = step(batch_model(k_batch=8, seed=5), y).candidates
    b = step(batch_model(k_batch=8, seed=5, n_threads=1), y, seed=9).candidates  # other maps, threads
    np.testing.assert_array_equal(a, b)
    m = batch_model(k_batch=8, seed=5)
    step(m, np.array([1, 2, 3]))
    np.testing.assert_array_equal(step(m, y).candidates, a)  # no hidden state between steps
    assert not np.array_equal(step(batch_model(k_batch=8, seed=6), y).candidates, a)
    assert not np.array_equal(step(batch_model(k_batch=8, seed=5), y[::-1]).candidates, a[::-1])


@pytest.mark.parametrize("k, k_batch, want", [(7, 5, 2), (9, 3, 0), (2, 0, 0), (4, 5, 5)])
def test_batch_per_sample_is_capped(k, k_batch, want):
    m = batch_model(N=10, k=k, k_batch=k_batch)
    assert m.batch_per_sample == want and m.num_candidates == 1 + k + want
    assert m.config["k_batch"] == k_batch
    cand = step(m, [0, 1, 2, 2]).candidates
    assert cand.shape == (4, 1 + k + want)
    if 1 + k + want == 10:  # every class once per row
        np.testing.assert_array_equal(np.sort(cand, axis=1), np.tile(np.arange(10), (4, 1)))


def test_with_k_mined_every_candidate_is_distinct():
    m = batch_model(N=25, k=2, k_batch=4, k_mined=3)
    assert m.num_candidates == 1 + 2 + 4 + 3
    cand = step(m, [0, 5, 5, 11, 24]).candidates
    assert all(len(set(row)) == len(row) for row in cand.tolist())


@pytest.mark.parametrize("fc, triplet", [("separate", "class"), ("shared", "batch")])
def test_gradients_through_batch_candidates_match_the_oracle(fc, triplet):
    m = batch_model(N=14, k=2, k_batch=4, fc=fc, triplet=triplet)
    assert_step_matches_oracle(m, fc, triplet)
    assert m.num_candidates == 7


def test_k_batch_validation_and_plumbing(tmp_path):
    with pytest.raises(ValueError, match="k_batch"):
        batch_model(k_batch=-1)
    with pytest.raises(TypeError, match="k_batch"):
        batch_model(k_batch=1.5)
    m = batch_model(k_batch=6)
    step(m, [1, 2, 3])
    m.save(tmp_path / "m.npz")
    assert QAConvGS.load(tmp_path / "m.npz").config["k_batch"] == 6
    dims = dict(num_classes=6, channels=2, height=1, width=2, k_nearest=2, seed=3)
    assert ShardedQAConvGS(**dims, k_batch=2).num_candidates == 5
    assert ShardedQAConvGS(**dims).config["k_batch"] == 0
    assert ShardedQAConvGS.from_model(qg.QAConvGS(**dims, k_batch=2)).config["k_batch"] == 2


def test_torch_adapter_passes_k_batch():
    pytest.importorskip("torch")
    from qaconv_gs.torch import QAConvGSLoss

    crit = QAConvGSLoss(20, C, H, W, k_nearest=2, k_batch=3, seed=0)
    assert crit.config["k_batch"] == 3 and crit._core.num_candidates == 6


# ------------------------------------------------------------------------------ weighted_extras


def weighted_model(N=14, k=2, k_batch=4, **kw) -> QAConvGS:
    kw.setdefault("triplet", "batch")
    kw.setdefault("fc", "shared")
    return batch_model(N=N, k=k, k_batch=k_batch, weighted_extras=True, **kw)


@pytest.mark.parametrize("fc", ["separate", "shared"])
@pytest.mark.parametrize("k_mined", [0, 2])
def test_weighted_extras_step_matches_the_oracle(fc, k_mined):
    """The extras weigh (N - 1 - k - mined) / k_batch in the head's statistics and add its log to their
    logits in the class softmax: the whole step (losses, scores, every gradient) against float64."""
    m = weighted_model(fc=fc, k_mined=k_mined)
    w = (14 - 1 - 2 - k_mined) / 4
    assert m.extra_weight == w
    weights = np.ones((6, m.num_candidates))
    weights[:, 3:7] = w
    assert_step_matches_oracle(m, fc, "batch", weights=weights)


def test_weighted_extras_with_the_class_triplet_off():
    m = weighted_model(triplet="class", triplet_weight=0.0, fc="separate")
    weights = np.ones((6, 7))
    weights[:, 3:] = (14 - 1 - 2) / 4
    assert_step_matches_oracle(m, "separate", "class", weights=weights)


def test_weighted_extras_change_the_step_and_nothing_without_extras():
    y = [1, 1, 5, 5, 9, 9]
    plain, weighted = batch_model(N=14, k=2, k_batch=4, triplet="batch"), weighted_model(fc="separate")
    a, b = step(plain, y), step(weighted, y)
    np.testing.assert_array_equal(a.candidates, b.candidates)
    assert a.loss != b.loss  # the extras now stand for the 11 unscored classes
    # without extras (k_batch=0, or no room after the neighbours) the flag changes nothing, bit for bit
    for kb, k in ((0, 2), (4, 13)):
        p = QAConvGS(14, C, H, W, k_nearest=k, seed=0, init="random", k_batch=kb, triplet="batch")
        q = QAConvGS(14, C, H, W, k_nearest=k, seed=0, init="random", k_batch=kb, triplet="batch",
                     weighted_extras=True)  # fmt: skip
        assert q.extra_weight == 1.0
        ra, rb = step(p, y), step(q, y)
        assert ra.loss == rb.loss and np.array_equal(ra.grad_features, rb.grad_features)


def test_weighted_extras_validation_and_plumbing(tmp_path):
    with pytest.raises(TypeError, match="^weighted_extras: expected a bool, got int$"):
        batch_model(weighted_extras=1)
    msg = r"^weighted_extras: needs triplet='batch' or triplet_weight=0"
    with pytest.raises(ValueError, match=msg):
        batch_model(weighted_extras=True)  # triplet="class", triplet_weight=0.5
    m = weighted_model()
    step(m, [1, 2, 3])
    m.save(tmp_path / "m.npz")
    back = QAConvGS.load(tmp_path / "m.npz")
    assert back.config["weighted_extras"] is True and back.extra_weight == m.extra_weight
    assert QAConvGS(6, C, H, W, k_nearest=2).config["weighted_extras"] is False
    dims = dict(num_classes=6, channels=2, height=1, width=2, k_nearest=2, seed=3)
    with pytest.raises(ValueError, match=msg):
        ShardedQAConvGS(**dims, weighted_extras=True)  # validated as QAConvGS does
    cfg = qg.QAConvGS(**dims, k_batch=2, triplet="batch", weighted_extras=True).config
    assert ShardedQAConvGS(**cfg).config == cfg
    assert ShardedQAConvGS(**cfg).extra_weight == qg.QAConvGS(**cfg).extra_weight == 1.5


def test_torch_adapter_passes_weighted_extras():
    pytest.importorskip("torch")
    from qaconv_gs.torch import QAConvGSLoss

    crit = QAConvGSLoss(20, C, H, W, k_nearest=2, k_batch=3, seed=0, triplet="batch", weighted_extras=True)
    assert crit.config["weighted_extras"] is True and crit._core.extra_weight == (20 - 1 - 2) / 3
