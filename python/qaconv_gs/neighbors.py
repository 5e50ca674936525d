"""Class-neighbour kNN: for each class embedding, its k most cosine-similar other classes."""

from __future__ import annotations

import numpy as np


def class_neighbors(E, k: int, return_similarity: bool = False, n_threads: int | None = None):
    """k nearest other classes of each class embedding, by cosine similarity.

    Args:
        E: [N, C, H, W] (or [N, D]) class embeddings, any real dtype; flattened per class.
        k: neighbours per class, 1 <= k <= N-1.
        return_similarity: also return the [N, k] float32 cosine similarities.
        n_threads: None for OpenMP's default, else >= 1. Results are identical for any value.

    Returns:
        idx [N, k] int64 sorted by decreasing similarity, self excluded by index, ties to the
        lower class index; or (idx, sim) when return_similarity.
    """
    raise NotImplementedError  # CONTRACT STUB: implemented by the neighbours work


__all__ = ["class_neighbors"]
