"""Fused losses on score matrices: value, accuracies and dLoss/dscores in one C pass.

Every function takes float32-convertible scores (any array-like; NaN/Inf rejected), computes in
double inside the C kernel and returns the loss as a Python float and the gradient as float32 of
the scores' shape. Ties: argmax/argmin take the first index; at a hinge kink the gradient is 0.
margin, triplet_weight and gamma are passed to the kernels as float32 (like the scores).
Results are bit-identical for any n_threads.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _native
from ._validate import as_float32, as_labels, check_real, resolve_threads, shape_str

__all__ = ["ClassLoss", "class_loss", "batch_triplet", "pairwise_bce", "focal_class_memory"]

# margin, triplet_weight and gamma are passed as float32: larger values would become inf in the kernel.
_F32_MAX = float(np.finfo(np.float32).max)


class ClassLoss(NamedTuple):
    loss: float
    loss_cls: float
    loss_triplet: float
    acc_cls: float
    acc_triplet: float
    grad: np.ndarray  # [B, K] dloss/dscores


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def class_loss(scores, margin: float = 1.0, triplet_weight: float = 0.5, *, n_threads=None) -> ClassLoss:
    """Restricted scores [B, K] (target in column 0, K >= 2): CE over the K candidates + margin ranking.

    loss = mean_b CE(s[b], 0) + triplet_weight * mean_b max(0, margin - s[b, 0] + max_{j>0} s[b, j]).
    acc_cls counts a tie with column 0 as correct; acc_triplet needs s[b, 0] > max_{j>0} s[b, j].
    """
    s = as_float32(scores, "scores", ndim=2)
    if s.shape[1] < 2:
        raise ValueError(
            f"scores: expected K >= 2 columns (target + at least one other), got {shape_str(s.shape)}"
        )
    margin = check_real(margin, "margin", lo=-_F32_MAX, hi=_F32_MAX)
    triplet_weight = check_real(triplet_weight, "triplet_weight", lo=0.0, hi=_F32_MAX)
    nt = resolve_threads(n_threads)
    loss, lc, lt, ac, at, grad = _native.loss_class(s, margin, triplet_weight, True, nt)
    return ClassLoss(loss, lc, lt, ac, at, grad)


def batch_triplet(scores, labels, margin: float = 16.0, *, return_accuracy: bool = False, n_threads=None):
    """In-batch batch-hard triplet over square scores [B, B]: (loss, grad [B, B]) (, acc).

    Row b: positive = lowest score among the other samples of its label (diagonal excluded), negative =
    highest score among other labels; loss = mean over rows having both of max(0, margin - pos + neg)
    (0 if no row has both); acc = mean over those rows of [pos > neg]. labels are any integers.
    """
    s = as_float32(scores, "scores", ndim=2)
    if s.shape[0] != s.shape[1]:
        raise ValueError(f"scores: expected a square (B, B) array, got {shape_str(s.shape)}")
    lab = as_labels(labels, "labels", n=s.shape[0])
    margin = check_real(margin, "margin", lo=-_F32_MAX, hi=_F32_MAX)
    want_acc = _check_flag(return_accuracy, "return_accuracy")
    nt = resolve_threads(n_threads)
    loss, acc, _nv, grad = _native.loss_batch_triplet(s, lab, margin, True, nt)
    return (loss, grad, acc) if want_acc else (loss, grad)


def pairwise_bce(scores, labels, gallery_labels=None, *, return_accuracy: bool = False, n_threads=None):
    """QAConv 2.0 pairwise BCE over scores [P, G]: (loss, grad) (, acc); gallery_labels default = labels.

    target t[p, g] = labels[p] == gallery_labels[g]; loss = mean_p sum_g BCE-with-logits(s[p, g], t[p, g]);
    acc = mean_p [min over positives > max over negatives] (a row lacking either counts as wrong).
    """
    s = as_float32(scores, "scores", ndim=2)
    lp = as_labels(labels, "labels", n=s.shape[0])
    if gallery_labels is None:
        if s.shape[0] != s.shape[1]:
            raise ValueError(
                f"gallery_labels: required when scores is not square, got scores {shape_str(s.shape)}"
            )
        lg = lp
    else:
        lg = as_labels(gallery_labels, "gallery_labels", n=s.shape[1])
    want_acc = _check_flag(return_accuracy, "return_accuracy")
    nt = resolve_threads(n_threads)
    loss, acc, grad = _native.loss_pairwise_bce(s, lp, lg, True, nt)
    return (loss, grad, acc) if want_acc else (loss, grad)


def focal_class_memory(scores, targets, gamma: float = 2.0, *, return_accuracy: bool = False, n_threads=None):
    """QAConv 1.x focal class-memory BCE over scores [B, N], targets [B]: (loss, grad) (, acc).

    p = sigmoid(s), t = onehot(targets); loss = mean_b sum_j BCE(s, t) * (t ? 1 - p : p) ** gamma, the focal
    weight differentiated too (as the original ClassMemoryLoss); acc = mean [first argmax == target].
    """
    s = as_float32(scores, "scores", ndim=2)
    t = as_labels(targets, "targets", n=s.shape[0], num_classes=s.shape[1])
    gamma = check_real(gamma, "gamma", lo=0.0, hi=_F32_MAX)
    want_acc = _check_flag(return_accuracy, "return_accuracy")
    nt = resolve_threads(n_threads)
    loss, acc, grad = _native.loss_focal(s, t, gamma, True, nt)
    return (loss, grad, acc) if want_acc else (loss, grad)
