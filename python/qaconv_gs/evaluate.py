"""Evaluation entry points that need no model object: QAConv scores of probe vs gallery maps."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ._validate import as_float32, resolve_threads, shape_str
from .head import head_eval_affine
from .matching import match_scores, normalize


def head_fc_kind(head_state: Mapping[str, object], S: int) -> str:
    """'separate' or 'shared', read off the shape of head_state['fc.weight'] for S locations."""
    if "fc.weight" not in head_state:
        raise ValueError("head_state: missing key 'fc.weight'")
    size = int(np.asarray(_numpy(head_state["fc.weight"])).size)
    if size == 2 * S:
        return "separate"
    if size == S:
        return "shared"
    raise ValueError(
        f"head_state: 'fc.weight' has {size} values; expected {2 * S} (fc='separate') or {S} (fc='shared') "
        f"for S = H*W = {S}"
    )


def _numpy(value: object) -> object:
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu().numpy()
    return value


def match(probe, gallery, head_state: Mapping[str, object], *, n_threads: int | None = None) -> np.ndarray:
    """QAConv similarity of every probe map with every gallery map, head in eval mode.

    Args:
        probe: [P, C, H, W] feature maps (any real dtype / layout; not modified).
        gallery: [G, C, H, W] feature maps with the same C, H, W.
        head_state: the head's state dict (PyTorch key names: bn.*, fc.*, logit_bn.*), NumPy arrays or
            torch tensors; fc="separate" or "shared" is read off fc.weight's size.
        n_threads: None for OpenMP's default; results are identical for any value.

    Returns:
        [P, G] float32 scores. Memory is O(P*G) plus cache-sized tiles; the [P, G, S] maxima are never stored.
    """
    nt = resolve_threads(n_threads)
    p = as_float32(probe, "probe", 4)
    g = as_float32(gallery, "gallery", 4)
    if p.shape[1:] != g.shape[1:]:
        raise ValueError(
            f"gallery: expected maps of shape (C, H, W) = {shape_str(p.shape[1:])} like probe, "
            f"got {shape_str(g.shape[1:])}"
        )
    if not isinstance(head_state, Mapping):
        raise TypeError(f"head_state: expected a mapping of head parameters, got {type(head_state).__name__}")
    S = p.shape[2] * p.shape[3]
    fc = head_fc_kind(head_state, S)
    state = {key: np.asarray(_numpy(v)) for key, v in head_state.items()}
    w, b = head_eval_affine(state, S, fc)
    pn, _ = normalize(p, n_threads=nt)
    gn, _ = normalize(g, n_threads=nt)
    return match_scores(pn, gn, w, b, n_threads=nt)
