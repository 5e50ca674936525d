"""Fused losses on score matrices: value, accuracies and dLoss/dscores in one C pass."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ClassLoss(NamedTuple):
    loss: float
    loss_cls: float
    loss_triplet: float
    acc_cls: float
    acc_triplet: float
    grad: np.ndarray  # [B, K] dloss/dscores


def class_loss(scores, margin: float = 1.0, triplet_weight: float = 0.5, *, n_threads=None) -> ClassLoss:
    """Restricted scores [B, K] (target in column 0, K >= 2): CE over the K candidates + margin ranking."""
    raise NotImplementedError  # CONTRACT STUB


def batch_triplet(scores, labels, margin: float = 16.0, *, return_accuracy: bool = False, n_threads=None):
    """In-batch batch-hard triplet over square scores [B, B]: (loss, grad [B, B]) (, acc)."""
    raise NotImplementedError  # CONTRACT STUB


def pairwise_bce(scores, labels, gallery_labels=None, *, return_accuracy: bool = False, n_threads=None):
    """QAConv 2.0 pairwise BCE over scores [P, G]: (loss, grad) (, acc); gallery_labels default = labels."""
    raise NotImplementedError  # CONTRACT STUB


def focal_class_memory(scores, targets, gamma: float = 2.0, *, return_accuracy: bool = False, n_threads=None):
    """QAConv 1.x focal class-memory BCE over scores [B, N], targets [B]: (loss, grad) (, acc)."""
    raise NotImplementedError  # CONTRACT STUB
