"""Fused losses: C kernels vs NumPy float64, the C scalar references and PyTorch autograd."""

from __future__ import annotations

import numpy as np
import oracle
import pytest
from hypothesis import given
from hypothesis import strategies as st
from qaconv_gs import _native
from qaconv_gs.functional import ClassLoss, batch_triplet, class_loss, focal_class_memory, pairwise_bce


def _close(a, b, rtol=1e-4, atol=1e-7):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


def _labels(rng, n, n_ids):
    return rng.integers(0, n_ids, size=n)


# ------------------------------------------------------------------------------------------- class loss


@pytest.mark.parametrize("B,K", [(1, 2), (2, 3), (7, 33), (97, 5), (3, 200)])
def test_class_loss_vs_numpy_and_c_ref(B, K, rng):
    s = (rng.normal(size=(B, K)) * 3).astype(np.float32)
    r = class_loss(s, margin=1.5, triplet_weight=0.7)
    assert isinstance(r, ClassLoss) and isinstance(r.loss, float)
    assert r.grad.dtype == np.float32 and r.grad.shape == (B, K)
    ref = oracle.class_loss(s, 1.5, np.float32(0.7))  # the kernel takes margin and weight as float32
    _close(r[:5], ref[:5], rtol=1e-9, atol=1e-12)  # double inside: values agree to double rounding
    _close(r.grad, ref[5], rtol=1e-5, atol=1e-8)
    cr = _native.loss_class_ref(s, 1.5, 0.7, True, 1)
    _close(r[:5], cr[:5], rtol=1e-12, atol=1e-14)  # double inside; formulas differ only in rounding
    _close(r.grad, cr[5], rtol=1e-6, atol=1e-9)


def test_class_loss_vs_torch(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    B, K = 11, 6
    s = (rng.normal(size=(B, K)) * 2).astype(np.float32)
    r = class_loss(s, margin=1.0, triplet_weight=0.5)
    ts = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    ce = F.cross_entropy(ts, torch.zeros(B, dtype=torch.long))
    neg = ts[:, 1:].max(dim=1)[0]
    tri = F.margin_ranking_loss(ts[:, 0], neg, torch.ones(B, dtype=torch.float64), margin=1.0)
    loss = ce + 0.5 * tri
    loss.backward()
    _close([r.loss, r.loss_cls, r.loss_triplet], [loss.item(), ce.item(), tri.item()], rtol=1e-9)
    _close(r.grad, ts.grad.numpy(), rtol=1e-5, atol=1e-8)
    assert r.acc_cls == float((ts.argmax(1) == 0).double().mean())
    assert r.acc_triplet == float((ts[:, 0] > neg).double().mean())


def test_class_loss_reference_finite_differences(rng):
    s = rng.normal(size=(4, 5)) * 2
    s[:, 0] += 0.3  # keep hinges away from 0 and negatives distinct
    f = lambda x: oracle.class_loss(x, 1.0, 0.5)[0]  # noqa: E731
    g = oracle.class_loss(s, 1.0, 0.5).grad
    assert np.min(np.abs(1.0 - s[:, 0] + np.max(s[:, 1:], 1))) > 1e-3
    _close(oracle.numerical_grad(f, s), g, rtol=1e-6, atol=1e-9)


def test_class_loss_huge_scores():
    s = np.array([[1e30, -1e30, 0.0], [-1e30, 1e30, 5.0], [3e38, -3e38, 1.0], [0.0, 1e30, 1e30]], np.float32)
    r = class_loss(s)
    assert np.isfinite([r.loss, r.loss_cls, r.loss_triplet]).all() and np.isfinite(r.grad).all()
    ref = oracle.class_loss(s.astype(np.float64), 1.0, 0.5)
    _close(r[:5], ref[:5], rtol=1e-9)
    _close(r.grad, ref[5], rtol=1e-6, atol=1e-9)
    # row 3: ties between the two negatives -> the first one gets the hinge gradient
    assert r.grad[3, 1] > r.grad[3, 2]


def test_class_loss_ties_and_kink():
    # a row of equal scores: argmax is column 0 (a tie with the target counts as correct), pos > neg is false
    s = np.zeros((1, 4), np.float32)
    r = class_loss(s, margin=1.0, triplet_weight=0.5)
    assert r.acc_cls == 1.0 and r.acc_triplet == 0.0
    _close(
        r.grad[0], [-0.75 - 0.5, 0.25 + 0.5, 0.25, 0.25], rtol=1e-6
    )  # hinge grad to the first tied negative
    # the hinge kink: margin - pos + neg == 0 exactly -> triplet loss 0 and zero triplet gradient
    s = np.array([[2.0, 1.0, 0.5]], np.float32)
    r = class_loss(s, margin=1.0, triplet_weight=0.5)
    ce_only = class_loss(s, margin=1.0, triplet_weight=0.0)
    assert r.loss_triplet == 0.0
    np.testing.assert_array_equal(r.grad, ce_only.grad)
    r2 = class_loss(s, margin=1.0 + 1e-6, triplet_weight=0.5)  # just past the kink, the hinge is active
    assert r2.loss_triplet > 0 and r2.grad[0, 0] < ce_only.grad[0, 0]
    # rows whose gradient sums to zero (softmax and ranking are shift-invariant)
    rng = np.random.default_rng(1)
    g = class_loss(rng.normal(size=(5, 7))).grad
    _close(g.sum(1), np.zeros(5), atol=1e-7)


# ------------------------------------------------------------------------------------------- batch triplet


def _qaconv21_triplet(torch, score, target, margin):
    """QAConv 2.1's TripletLoss mining (1e15 masking) + margin ranking, on a score matrix."""
    F = torch.nn.functional
    pair = (target[:, None] == target[None, :]).double()
    eye = torch.eye(score.shape[0], dtype=torch.float64)
    min_pos = torch.min(score * pair + (1 - pair + eye) * 1e15, dim=1)[0]
    max_neg = torch.max(score * (1 - pair) - pair * 1e15, dim=1)[0]
    return F.margin_ranking_loss(min_pos, max_neg, torch.ones_like(min_pos), margin=margin), min_pos, max_neg


@pytest.mark.parametrize("B,n_ids", [(1, 1), (2, 1), (2, 2), (8, 3), (97, 20), (64, 64)])
def test_batch_triplet_vs_numpy_and_c_ref(B, n_ids, rng):
    s = (rng.normal(size=(B, B)) * 10).astype(np.float32)
    lab = _labels(rng, B, n_ids)
    loss, grad, acc = batch_triplet(s, lab, margin=16.0, return_accuracy=True)
    rl, ra, nv, rg, _ = oracle.batch_triplet(s, lab, 16.0)
    _close(loss, rl, rtol=1e-9)
    assert acc == pytest.approx(ra, abs=1e-12)
    np.testing.assert_array_equal(grad, rg.astype(np.float32))
    cl, ca, cnv, cg = _native.loss_batch_triplet_ref(s, lab, 16.0, True, 1)
    assert cnv == nv and cl == pytest.approx(loss, rel=1e-12) and ca == acc
    np.testing.assert_array_equal(grad, cg)
    if nv == 0:
        assert loss == 0.0 and acc == 0.0 and not grad.any()


def test_batch_triplet_vs_torch_qaconv21(rng):
    torch = pytest.importorskip("torch")
    B = 12
    lab = np.repeat(np.arange(4), 3)  # every row has positives and negatives
    s = (rng.normal(size=(B, B)) * 8).astype(np.float32)
    ts = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    tl, min_pos, max_neg = _qaconv21_triplet(torch, ts, torch.from_numpy(lab), 16.0)
    tl.backward()
    loss, grad, acc = batch_triplet(s, lab, return_accuracy=True)
    _close(loss, tl.item(), rtol=1e-9)
    _close(grad, ts.grad.numpy(), rtol=1e-6, atol=1e-9)
    assert acc == float((min_pos > max_neg).double().mean())


def test_batch_triplet_excludes_invalid_rows_vs_torch(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    lab = np.array([0, 0, 1, 2, 2, 2, 3])  # rows of labels 1 and 3 have no positive
    B = lab.size
    s = (rng.normal(size=(B, B)) * 8).astype(np.float32)
    ts = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    tl = torch.from_numpy(lab)
    same = tl[:, None] == tl[None, :]
    pos = same & ~torch.eye(B, dtype=torch.bool)
    valid = pos.any(1) & (~same).any(1)
    min_pos = ts.masked_fill(~pos, float("inf")).min(1)[0][valid]
    max_neg = ts.masked_fill(same, float("-inf")).max(1)[0][valid]
    tloss = F.margin_ranking_loss(min_pos, max_neg, torch.ones_like(min_pos), margin=4.0)
    tloss.backward()
    loss, grad = batch_triplet(s, lab, margin=4.0)
    _close(loss, tloss.item(), rtol=1e-9)
    _close(grad, ts.grad.numpy(), rtol=1e-6, atol=1e-9)
    assert not grad[2].any() and not grad[6].any()


def test_batch_triplet_ties_and_kink():
    lab = np.array([0, 0, 0, 1, 1])
    s = np.zeros((5, 5), np.float32)
    loss, grad = batch_triplet(s, lab, margin=1.0)
    assert loss == 1.0
    # first index among tied positives / negatives (diagonal excluded)
    assert grad[0, 1] < 0 and grad[0, 2] == 0 and grad[0, 3] > 0 and grad[0, 4] == 0
    assert grad[1, 0] < 0 and grad[3, 4] < 0 and grad[3, 0] > 0
    s2 = np.full((5, 5), 1.0, np.float32)  # margin - pos + neg == 0 exactly
    s2[lab[:, None] != lab[None, :]] = 0.0
    loss, grad, acc = batch_triplet(s2, lab, margin=1.0, return_accuracy=True)
    assert loss == 0.0 and not grad.any() and acc == 1.0


# ------------------------------------------------------------------------------------------- pairwise BCE


@pytest.mark.parametrize("P,G", [(1, 1), (2, 2), (9, 9), (97, 13), (4, 300)])
def test_pairwise_bce_vs_numpy_and_c_ref(P, G, rng):
    s = (rng.normal(size=(P, G)) * 4).astype(np.float32)
    lp, lg = _labels(rng, P, 4), _labels(rng, G, 4)
    args = (lp,) if P == G and rng.random() < 0.5 else (lp, lg)
    loss, grad, acc = pairwise_bce(s, *args, return_accuracy=True)
    rl, ra, rg = oracle.pairwise_bce(s, *args)
    _close(loss, rl, rtol=1e-9)
    assert acc == pytest.approx(ra, abs=1e-12)
    _close(grad, rg, rtol=1e-5, atol=1e-9)
    cl, ca, cg = _native.loss_pairwise_bce_ref(s, lp, args[-1], True, 1)
    _close(loss, cl, rtol=1e-12)
    assert ca == acc
    _close(grad, cg, rtol=1e-6, atol=1e-10)


def test_pairwise_bce_vs_torch_qaconv20(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    B = 10
    lab = np.repeat(np.arange(5), 2)
    s = (rng.normal(size=(B, B)) * 3).astype(np.float32)
    ts = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    tl = torch.from_numpy(lab)
    pair = (tl[:, None] == tl[None, :]).double()
    tloss = F.binary_cross_entropy_with_logits(ts, pair, reduction="none").sum(-1).mean()
    tloss.backward()
    with torch.no_grad():
        min_pos = torch.min(ts * pair + (1 - pair) * 1e15, dim=1)[0]
        max_neg = torch.max(ts * (1 - pair) - pair * 1e15, dim=1)[0]
        tacc = float((min_pos > max_neg).double().mean())
    loss, grad, acc = pairwise_bce(s, lab, return_accuracy=True)
    _close(loss, tloss.item(), rtol=1e-9)
    _close(grad, ts.grad.numpy(), rtol=1e-6, atol=1e-10)
    assert acc == tacc


def test_pairwise_bce_huge_and_rows_without_negatives():
    s = np.array([[1e30, -1e30], [-1e30, 1e30]], np.float32)
    loss, grad, acc = pairwise_bce(s, [0, 1], return_accuracy=True)
    assert loss == 0.0 and acc == 1.0 and not grad.any()
    loss, grad = pairwise_bce(s, [0, 1], [1, 0])  # the wrong way round: finite, huge
    assert loss == pytest.approx(2e30, rel=1e-6) and np.isfinite(grad).all()
    _close(grad, [[0.5, -0.5], [-0.5, 0.5]])
    loss, grad, acc = pairwise_bce(np.ones((2, 2)), [3, 3], return_accuracy=True)
    assert acc == 0.0  # rows lacking negatives count as wrong


# ------------------------------------------------------------------------------------------- focal


def _torch_focal(torch, ts, target, gamma):
    F = torch.nn.functional
    onehot = torch.zeros_like(ts).scatter(1, target[:, None], 1)
    loss = F.binary_cross_entropy_with_logits(ts, onehot, reduction="none")
    prob = ts.sigmoid()
    weight = torch.pow(torch.where(onehot.bool(), 1.0 - prob, prob), gamma)
    return (loss * weight).sum(-1).mean()


@pytest.mark.parametrize("B,N", [(1, 1), (2, 3), (13, 40), (97, 7)])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.0])
def test_focal_vs_numpy_c_ref_and_torch(B, N, gamma, rng):
    torch = pytest.importorskip("torch")
    s = (rng.normal(size=(B, N)) * 3).astype(np.float32)
    t = _labels(rng, B, N)
    loss, grad, acc = focal_class_memory(s, t, gamma=gamma, return_accuracy=True)
    rl, ra, rg = oracle.focal_class_memory(s, t, gamma)
    _close(loss, rl, rtol=1e-9)
    assert acc == pytest.approx(ra, abs=1e-12)
    _close(grad, rg, rtol=1e-5, atol=1e-9)
    cl, ca, cg = _native.loss_focal_ref(s, t, gamma, True, 1)
    _close(loss, cl, rtol=1e-12)
    assert ca == acc
    _close(grad, cg, rtol=1e-6, atol=1e-10)
    ts = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    tl = _torch_focal(torch, ts, torch.from_numpy(t), gamma)
    tl.backward()
    _close(loss, tl.item(), rtol=1e-9)
    _close(grad, ts.grad.numpy(), rtol=1e-5, atol=1e-9)


def test_focal_gamma0_is_bce_and_reference_fd(rng):
    s = rng.normal(size=(4, 6)).astype(np.float32)
    t = np.array([0, 5, 2, 2])
    loss, grad = focal_class_memory(s, t, gamma=0.0)  # plain one-hot BCE-with-logits
    onehot = np.zeros((4, 6))
    onehot[np.arange(4), t] = 1
    x = s.astype(np.float64)
    _close(loss, (np.maximum(x, 0) - x * onehot + np.log1p(np.exp(-np.abs(x)))).sum(1).mean(), rtol=1e-9)
    s64 = rng.normal(size=(3, 4)) * 2
    t3 = np.array([1, 0, 3])
    for gamma in (0.5, 2.0):
        num = oracle.numerical_grad(lambda x, g=gamma: oracle.focal_class_memory(x, t3, g)[0], s64)
        _close(num, oracle.focal_class_memory(s64, t3, gamma)[2], rtol=1e-6, atol=1e-9)


def test_focal_huge_scores_finite():
    s = np.array([[1e30, -1e30, 0.0], [-1e30, 1e30, 50.0]], np.float32)
    for gamma in (0.0, 0.5, 2.0):
        loss, grad, acc = focal_class_memory(s, [0, 0], gamma=gamma, return_accuracy=True)
        assert np.isfinite(loss) and np.isfinite(grad).all() and acc == 0.5
        _close(grad, oracle.focal_class_memory(s, [0, 0], gamma)[2], rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------------------------------- threads


def test_threads_bit_identical(rng):
    B, K = 3000, 33  # many row blocks
    s = (rng.normal(size=(B, K)) * 3).astype(np.float32)
    sq = (rng.normal(size=(600, 600)) * 3).astype(np.float32)
    lab = _labels(rng, 600, 40)
    t = _labels(rng, B, K)
    calls = [
        lambda nt: class_loss(s, n_threads=nt),
        lambda nt: batch_triplet(sq, lab, return_accuracy=True, n_threads=nt),
        lambda nt: pairwise_bce(sq, lab, return_accuracy=True, n_threads=nt),
        lambda nt: focal_class_memory(s, t, return_accuracy=True, n_threads=nt),
    ]
    for call in calls:
        base = call(1)
        for nt in (2, 3):
            other = call(nt)
            for a, b in zip(base, other):
                if isinstance(a, np.ndarray):
                    assert np.array_equal(a, b)
                else:
                    assert a == b


# ------------------------------------------------------------------------------------------- zoo and errors


def test_input_zoo_not_modified(rng):
    torch = pytest.importorskip("torch")
    s = (rng.normal(size=(6, 6)) * 3).astype(np.float32)
    lab = np.array([0, 0, 1, 1, 2, 2])
    base = [class_loss(s), batch_triplet(s, lab), pairwise_bce(s, lab), focal_class_memory(s, lab)]
    big = np.zeros((6, 12), np.float32)
    big[:, ::2] = s
    ro = s.copy()
    ro.setflags(write=False)
    for x in (s.astype(np.float64), big[:, ::2], s.astype(">f4"), ro, s.tolist(), torch.from_numpy(s.copy())):
        keep = np.asarray(x).copy()
        got = [
            class_loss(x),
            batch_triplet(x, lab.astype(">i4")),
            pairwise_bce(x, lab.tolist()),
            focal_class_memory(x, torch.from_numpy(lab)),
        ]
        for g, b in zip(got, base):
            assert g[0] == b[0]
            np.testing.assert_array_equal(
                g[-1] if isinstance(g, ClassLoss) else g[1], b[-1] if isinstance(b, ClassLoss) else b[1]
            )
        np.testing.assert_array_equal(np.asarray(x), keep)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_errors():
    s = np.zeros((3, 3), np.float32)
    lab = np.array([0, 1, 1])
    with pytest.raises(ValueError, match="scores"):
        class_loss(np.zeros(3))
    with pytest.raises(ValueError, match="scores"):
        class_loss(np.zeros((3, 1)))  # K < 2
    with pytest.raises(ValueError, match="scores"):
        class_loss(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="scores"):
        class_loss(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="scores"):
        class_loss(np.array([[0.0, np.inf]]))
    with pytest.raises(ValueError, match="scores"):
        class_loss(np.array([[0.0, 1e300]]))  # beyond float32
    with pytest.raises(TypeError, match="scores"):
        class_loss(np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="margin"):
        class_loss(s, margin=np.nan)
    with pytest.raises(ValueError, match="triplet_weight"):
        class_loss(s, triplet_weight=-1.0)
    with pytest.raises(ValueError, match="n_threads"):
        class_loss(s, n_threads=0)
    with pytest.raises(ValueError, match="scores"):
        batch_triplet(np.zeros((3, 4)), lab)
    with pytest.raises(ValueError, match="labels"):
        batch_triplet(s, lab[:2])
    with pytest.raises(TypeError, match="labels"):
        batch_triplet(s, [0.5, 1, 1])
    with pytest.raises(TypeError, match="return_accuracy"):
        batch_triplet(s, lab, return_accuracy=1)
    with pytest.raises(ValueError, match="gallery_labels"):
        pairwise_bce(np.zeros((3, 4)), lab)
    with pytest.raises(ValueError, match="gallery_labels"):
        pairwise_bce(np.zeros((3, 4)), lab, [0, 1])
    with pytest.raises(ValueError, match="targets"):
        focal_class_memory(s, [0, 1, 3])  # out of range
    with pytest.raises(ValueError, match="targets"):
        focal_class_memory(s, [0, -1, 2])
    with pytest.raises(ValueError, match="gamma"):
        focal_class_memory(s, lab, gamma=-1.0)
    with pytest.raises(ValueError, match="scores"):
        focal_class_memory(np.full((3, 3), np.nan), lab)
    # the private bindings and the C kernels re-check what they rely on
    with pytest.raises(ValueError, match="scores"):
        _native.loss_class(np.zeros((2, 1), np.float32))
    with pytest.raises(ValueError, match="labels"):
        _native.loss_batch_triplet(s, lab[:2])
    with pytest.raises(ValueError, match="out of range"):
        _native.loss_focal(s, np.array([0, 1, 5]))
    with pytest.raises(ValueError, match="NaN"):
        _native.loss_class(np.array([[0.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="NaN"):
        _native.loss_pairwise_bce(
            np.array([[np.inf]], np.float32), np.zeros(1, np.int64), np.zeros(1, np.int64)
        )
    nan_rows = np.array([[0.0, np.nan, 1.0], [np.nan, 0.0, 2.0], [1.0, 2.0, 0.0]], np.float32)
    with pytest.raises(ValueError, match="NaN"):
        _native.loss_batch_triplet(nan_rows, np.array([0, 0, 1], np.int64))


def test_focal_accuracy_ties_take_the_first_class():
    """A row whose largest scores tie counts as correct when the target is the first of them (the first
    index wins, as np.argmax in the reference), and as wrong when it is a later one."""
    s = np.array([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]], np.float32)
    for targets, want in (([0, 0], 1.0), ([1, 2], 0.0)):
        assert focal_class_memory(s, targets, return_accuracy=True)[2] == want
        assert oracle.focal_class_memory(s, np.array(targets), 2.0)[1] == want


# ------------------------------------------------------------------------------------------- property


@given(
    B=st.integers(1, 30),
    K=st.integers(2, 30),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 1.0, 50.0, 1e20]),
    margin=st.floats(0.0, 5.0),
)
def test_property_class_loss(B, K, seed, scale, margin):
    rng = np.random.default_rng(seed)
    s = (rng.normal(size=(B, K)) * scale).astype(np.float32)
    if rng.random() < 0.3:
        s = np.round(s)  # ties
    r = class_loss(s, margin=margin)
    ref = oracle.class_loss(s, np.float32(margin), 0.5)
    _close(r[:5], ref[:5], rtol=1e-9, atol=1e-12)
    _close(r.grad, ref[5], rtol=1e-5, atol=1e-8)


@given(B=st.integers(1, 30), n_ids=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_property_batch_losses(B, n_ids, seed):
    rng = np.random.default_rng(seed)
    s = np.round(rng.normal(size=(B, B)) * 5).astype(np.float32)  # many ties
    lab = _labels(rng, B, n_ids)
    loss, grad, acc = batch_triplet(s, lab, margin=3.0, return_accuracy=True)
    rl, ra, _, rg, _ = oracle.batch_triplet(s, lab, 3.0)
    _close(loss, rl, rtol=1e-9, atol=1e-12)
    assert acc == pytest.approx(ra, abs=1e-12)
    np.testing.assert_array_equal(grad, rg.astype(np.float32))
    loss, grad, acc = pairwise_bce(s, lab, return_accuracy=True)
    rl, ra, rg = oracle.pairwise_bce(s, lab)
    _close(loss, rl, rtol=1e-9)
    assert acc == pytest.approx(ra, abs=1e-12)
    _close(grad, rg, rtol=1e-5, atol=1e-9)
