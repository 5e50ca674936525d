"""Float64 references of the fused losses (value, accuracy, gradient), written from the formulas."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from qaconv_gs.functional import ClassLoss  # the record only (its fields, here float64)


class BatchTriplet(NamedTuple):
    loss: float
    acc: float
    n_valid: int
    grad: np.ndarray  # [B, B]
    hinge: np.ndarray  # [B] margin - pos + neg of the rows having both, NaN elsewhere


def _softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _sigmoid(x):
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def class_loss(scores, margin=1.0, triplet_weight=0.5) -> ClassLoss:
    """Restricted scores [B, K], target column 0: CE over the K candidates + weight * margin ranking."""
    s = np.asarray(scores, np.float64)
    B, K = s.shape
    mx = s.max(axis=1, keepdims=True)
    e = np.exp(s - mx)
    se = e.sum(axis=1, keepdims=True)
    lse = (mx + np.log(se))[:, 0]
    lc = lse - s[:, 0]
    jn = 1 + np.argmax(s[:, 1:], axis=1)  # first max
    neg = s[np.arange(B), jn]
    h = margin - s[:, 0] + neg
    lt = np.maximum(h, 0)
    grad = e / se
    grad[:, 0] -= 1
    active = h > 0
    grad[active, 0] -= triplet_weight
    grad[np.arange(B)[active], jn[active]] += triplet_weight
    grad /= B
    acc_cls = float(np.mean(np.argmax(s, axis=1) == 0))
    acc_tri = float(np.mean(s[:, 0] > neg))
    return ClassLoss(lc.mean() + triplet_weight * lt.mean(), lc.mean(), lt.mean(), acc_cls, acc_tri, grad)


def batch_triplet(scores, labels, margin=16.0) -> BatchTriplet:
    """Batch-hard triplet over square scores [B, B]: hardest positive (diagonal excluded) and negative."""
    s = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    B = s.shape[0]
    same = labels[:, None] == labels[None, :]
    posmask = same & ~np.eye(B, dtype=bool)
    negmask = ~same
    valid = posmask.any(1) & negmask.any(1)
    nv = int(valid.sum())
    grad = np.zeros_like(s)
    hinge = np.full(B, np.nan)
    loss = acc = 0.0
    for b in np.flatnonzero(valid):
        jp = np.flatnonzero(posmask[b])[np.argmin(s[b, posmask[b]])]
        jn = np.flatnonzero(negmask[b])[np.argmax(s[b, negmask[b]])]
        h = margin - s[b, jp] + s[b, jn]
        hinge[b] = h
        loss += max(h, 0.0)
        acc += float(s[b, jp] > s[b, jn])
        if h > 0:
            grad[b, jp] -= 1.0 / nv
            grad[b, jn] += 1.0 / nv
    if nv:
        loss /= nv
        acc /= nv
    return BatchTriplet(loss, acc, nv, grad, hinge)


def pairwise_bce(scores, labels, gallery_labels=None):
    """-> (loss, acc, grad)."""
    s = np.asarray(scores, np.float64)
    lp = np.asarray(labels)
    lg = lp if gallery_labels is None else np.asarray(gallery_labels)
    t = (lp[:, None] == lg[None, :]).astype(np.float64)
    loss = (np.maximum(s, 0) - s * t + np.log1p(np.exp(-np.abs(s)))).sum(1).mean()
    grad = (_sigmoid(s) - t) / s.shape[0]
    acc = 0.0
    for p in range(s.shape[0]):
        pos, neg = s[p, t[p] == 1], s[p, t[p] == 0]
        acc += float(pos.size > 0 and neg.size > 0 and pos.min() > neg.max())
    return loss, acc / s.shape[0], grad


def focal_class_memory(scores, targets, gamma=2.0):
    """-> (loss, acc, grad); gradient from the product rule on bce * q**gamma."""
    s = np.asarray(scores, np.float64)
    B, N = s.shape
    t = np.zeros_like(s)
    t[np.arange(B), np.asarray(targets)] = 1
    p = _sigmoid(s)
    pm = _sigmoid(-s)
    q = np.where(t == 1, pm, p)
    bce = np.where(t == 1, _softplus(-s), _softplus(s))
    w = q**gamma
    dq = np.where(t == 1, -p * pm, p * pm)
    with np.errstate(divide="ignore", invalid="ignore"):
        dw = np.where(q > 0, gamma * q ** (gamma - 1) * dq, 0.0) if gamma != 0 else np.zeros_like(s)
    grad = ((p - t) * w + bce * dw) / B
    acc = float(np.mean(np.argmax(s, 1) == np.asarray(targets)))
    return (bce * w).sum(1).mean(), acc, grad
