"""Location normalisation and the fused QAConv correlation + two-way max (forward and backward).

Maps are [M, C, H, W]; S = H*W locations flattened row-major (s = h*W + w).
mp[..., s] = max_r Z[s, r] (probe direction), mg[..., r] = max_s Z[s, r] (gallery direction),
ties to the first index. Argmax arrays are uint16.
"""

from __future__ import annotations

import numpy as np


def normalize(x, *, n_threads=None) -> tuple[np.ndarray, np.ndarray]:
    """x [M, C, H, W] -> (y [M, C, H, W] float32, norms [M, H*W] float32); y = x / max(||x||_C, 1e-12)."""
    raise NotImplementedError  # CONTRACT STUB


def normalize_backward(grad_y, y, norms, *, n_threads=None) -> np.ndarray:
    """grad_y, y [M, C, H, W], norms [M, S] -> grad_x [M, C, H, W]."""
    raise NotImplementedError  # CONTRACT STUB


def pair_maxima(probe, gallery, *, return_argmax: bool = False, n_threads=None):
    """All pairs of normalised maps: probe [P, C, H, W], gallery [G, C, H, W] ->
    (mp [P, G, S], mg [P, G, S]) or, with return_argmax, (mp, mg, ap, ag) with ap, ag uint16 [P, G, S]."""
    raise NotImplementedError  # CONTRACT STUB


def pair_maxima_restricted(features, embeds, candidates, *, return_argmax: bool = False, n_threads=None):
    """features [B, C, H, W], embeds [N, C, H, W] (normalised), candidates [B, K] int64 rows of embeds ->
    (mp [B, K, S], mg [B, K, S]) or (mp, mg, ap, ag); pair (b, j) is features[b] vs embeds[candidates[b, j]]."""
    raise NotImplementedError  # CONTRACT STUB


def pair_maxima_backward(grad_mp, grad_mg, argmax_p, argmax_g, probe, gallery, *, n_threads=None):
    """Backward of pair_maxima: grads [P, G, S] -> (grad_probe [P, C, H, W], grad_gallery [G, C, H, W])."""
    raise NotImplementedError  # CONTRACT STUB


def pair_maxima_restricted_backward(grad_mp, grad_mg, argmax_p, argmax_g, features, embeds, candidates,
                                    *, n_threads=None):
    """Backward of pair_maxima_restricted: grads [B, K, S] ->
    (grad_features [B, C, H, W], grad_embeds [N, C, H, W]); non-candidate rows are 0."""
    raise NotImplementedError  # CONTRACT STUB


def match_scores(probe, gallery, weight, bias, *, n_threads=None) -> np.ndarray:
    """Fused eval scores of normalised maps: out[p, g] = mp . weight[:S] + mg . weight[S:] + bias, [P, G] float32.
    Memory O(P*G + tiles)."""
    raise NotImplementedError  # CONTRACT STUB
