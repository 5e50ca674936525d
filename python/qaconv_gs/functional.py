"""Every kernel of qaconv-gs as a function on NumPy arrays (forward and backward), with validation."""

from .head import head_backward, head_eval_affine, head_forward, init_head
from .losses import ClassLoss, batch_triplet, class_loss, focal_class_memory, pairwise_bce
from .matching import (
    match_scores,
    normalize,
    normalize_backward,
    pair_maxima,
    pair_maxima_backward,
    pair_maxima_restricted,
    pair_maxima_restricted_backward,
)
from .neighbors import class_neighbors

__all__ = [
    "ClassLoss",
    "batch_triplet",
    "class_loss",
    "class_neighbors",
    "focal_class_memory",
    "head_backward",
    "head_eval_affine",
    "head_forward",
    "init_head",
    "match_scores",
    "normalize",
    "normalize_backward",
    "pair_maxima",
    "pair_maxima_backward",
    "pair_maxima_restricted",
    "pair_maxima_restricted_backward",
    "pairwise_bce",
]
