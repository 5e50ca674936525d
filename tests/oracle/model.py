"""Float64 reference of one QAConvGS training step (SPEC section 1) and of its eval scores, composed of
the primitive oracles (normalize -> pair maxima -> head -> losses, and back).

    step = forward_backward(features, labels, class_embed, head, nbr, fc="separate", triplet="class", ...)
    step["loss"], step["scores"], step["grad_features"], step["grad_embed"] (dense [N, C, H, W]), ...
"""

from __future__ import annotations

import numpy as np

from . import losses, matching
from .head import head_backward, head_forward

HEAD_PARAM_KEYS = ("bn.weight", "bn.bias", "fc.weight", "fc.bias", "logit_bn.weight", "logit_bn.bias")


def candidates(labels, nbr) -> np.ndarray:
    """[B, 1 + k]: each label, then its neighbours in nbr [N, k]."""
    labels = np.asarray(labels, dtype=np.int64)
    return np.concatenate([labels[:, None], np.asarray(nbr, dtype=np.int64)[labels]], axis=1)


def _head(mp, mg, head, fc, **kw):
    """head_forward over maxima [..., S] -> (logits [...], cache)."""
    S = mp.shape[-1]
    out, cache = head_forward(mp.reshape(-1, S), mg.reshape(-1, S), head, fc=fc, **kw)
    return out.reshape(mp.shape[:-1]), cache


def forward_backward(
    features,
    labels,
    class_embed,
    head,
    nbr,
    fc="separate",
    triplet="class",
    triplet_weight=0.5,
    margin=1.0,
    cand=None,
    weights=None,
):
    """One training step in float64 (candidates [B, K]: the target and its neighbours in `nbr`, unless
    `cand` gives them, target first). weights [B, K] (weighted_extras): each candidate stands for that
    many classes: the class head's batch statistics are weighted by it and the class loss's softmax
    takes log(weight) added to the logit (the ranking term of triplet="class" is then not supported).
    Returns a dict with loss terms, accuracies, scores, candidates, grad_features [B, C, H, W], grad_embed
    (dense [N, C, H, W]), grad_head, running (new running stats), and diagnostics (argmax gap, hinge
    values) to keep finite differences away from switches and kinks."""
    X = np.asarray(features, dtype=np.float64)
    E = np.asarray(class_embed, dtype=np.float64)
    B, C, H, W = X.shape
    S = H * W
    labels = np.asarray(labels, dtype=np.int64)
    cand = candidates(labels, nbr) if cand is None else np.asarray(cand, dtype=np.int64)
    Xn, xnorm = matching.normalize(X.reshape(B, C, S))
    En, enorm = matching.normalize(E.reshape(E.shape[0], C, S))
    mp, mg, ap, ag, Z = matching.pair_maxima_restricted(Xn, En, cand)
    gap = matching.argmax_gap(Z)
    wts = None if weights is None else np.asarray(weights, dtype=np.float64)
    scores, cache = _head(mp, mg, head, fc, weights=None if wts is None else wts.reshape(-1))
    running = cache["running"]
    logits = scores if wts is None else scores + np.log(wts)
    gXn = np.zeros_like(Xn)
    grad_head = None
    if triplet == "class":
        assert wts is None or triplet_weight == 0
        cl = losses.class_loss(logits, margin, triplet_weight)
        loss_t, acc_t = cl.loss_triplet, cl.acc_triplet
        hinges = [margin - scores[:, 0] + scores[:, 1:].max(axis=1)]
    else:
        cl = losses.class_loss(logits, margin, 0.0)
        loss_t = acc_t = 0.0
        hinges = []
        if B >= 2:
            bmp, bmg, bap, bag, bZ = matching.pair_maxima(Xn, Xn)
            gap = min(gap, matching.argmax_gap(bZ))
            bscores, bcache = _head(bmp, bmg, {**head, **running}, fc)
            running = bcache["running"]
            bt = losses.batch_triplet(bscores, labels, margin)
            loss_t, acc_t = bt.loss, bt.acc
            hinges.append(bt.hinge[np.isfinite(bt.hinge)])
            gbmp, gbmg, grad_head = head_backward(triplet_weight * bt.grad, bcache)
            gP, gG = matching.pair_maxima_backward(
                gbmp.reshape(bmp.shape), gbmg.reshape(bmg.shape), bap, bag, Xn, Xn
            )
            gXn += gP + gG
    gmp, gmg, gh = head_backward(cl.grad, cache)
    if grad_head is not None:
        gh = {k: gh[k] + grad_head[k] for k in gh}
    gX, gEn = matching.pair_maxima_restricted_backward(
        gmp.reshape(mp.shape), gmg.reshape(mg.shape), ap, ag, Xn, En, cand
    )
    gXn += gX
    return dict(
        loss=cl.loss_cls + triplet_weight * loss_t,
        loss_cls=cl.loss_cls,
        loss_triplet=loss_t,
        acc_cls=cl.acc_cls,
        acc_triplet=acc_t,
        scores=scores,
        candidates=cand,
        grad_features=matching.normalize_backward(gXn, Xn, xnorm).reshape(B, C, H, W),
        grad_embed=matching.normalize_backward(gEn, En, enorm).reshape(E.shape),
        grad_head=gh,
        running=running,
        argmax_gap=gap,
        hinges=np.concatenate(hinges) if hinges else np.zeros(0),
    )


def match(probe, gallery, head, fc="separate", eps=1e-5):
    """Eval-mode scores of all pairs [P, G] with the running statistics (qaconv_gs.match), float64."""
    Pn, _ = matching.normalize(probe)
    Gn, _ = matching.normalize(gallery)
    mp, mg, _, _, _ = matching.pair_maxima(Pn, Gn)
    return _head(mp, mg, head, fc, training=False, eps=eps)[0]
