"""Float64 NumPy test oracles: one implementation per primitive, named after `qaconv_gs.functional`.

    import oracle
    y, norms = oracle.normalize(x)                           # functional.normalize
    mp, mg, ap, ag, Z = oracle.pair_maxima(probe, gallery)   # functional.pair_maxima (+ Z for near-ties)
    out, cache = oracle.head_forward(mp, mg, head, fc="shared")
    r = oracle.class_loss(scores, margin, triplet_weight)    # the fields of functional.ClassLoss
    step = oracle.forward_backward(X, y, E, head, nbr, ...)  # QAConvGS.forward_backward, from the above

Written from the formulas (einsum, explicit scatter, textbook batch norm), independent of the C kernels;
nothing here writes its inputs (running statistics are returned, not stored). Families: matching, head,
losses, neighbors, model (a training step and eval scores built from the others), metrics (slow loop
references of qaconv_gs.metrics), numdiff (central differences).
"""

from .head import head_backward, head_forward
from .losses import BatchTriplet, ClassLoss, batch_triplet, class_loss, focal_class_memory, pairwise_bce
from .matching import (
    argmax_gap,
    composed_restricted,
    match_scores,
    normalize,
    normalize_backward,
    pair_maxima,
    pair_maxima_backward,
    pair_maxima_restricted,
    pair_maxima_restricted_backward,
)
from .model import HEAD_PARAM_KEYS, candidates, forward_backward, match
from .neighbors import assert_neighbors_close, class_neighbors, cosine_similarity
from .numdiff import numerical_grad

__all__ = [
    "HEAD_PARAM_KEYS",
    "BatchTriplet",
    "ClassLoss",
    "argmax_gap",
    "assert_neighbors_close",
    "batch_triplet",
    "candidates",
    "class_loss",
    "class_neighbors",
    "composed_restricted",
    "cosine_similarity",
    "focal_class_memory",
    "forward_backward",
    "head_backward",
    "head_forward",
    "match",
    "match_scores",
    "normalize",
    "normalize_backward",
    "numerical_grad",
    "pair_maxima",
    "pair_maxima_backward",
    "pair_maxima_restricted",
    "pair_maxima_restricted_backward",
    "pairwise_bce",
]
