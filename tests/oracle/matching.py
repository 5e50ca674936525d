"""Float64 references of the matching kernels (functional.normalize ... match_scores).

Straightforward maths: einsum for the correlation, max / first argmax (np.argmax returns the first
maximum, like torch.max), explicit scatter-add (np.add.at) for the backward. Maps are [M, C, H, W] or
[M, C, S]; outputs keep the input's shape.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def _flat(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], x.shape[1], -1)


def normalize(x) -> tuple[np.ndarray, np.ndarray]:
    """x [M, C, ...] -> (y shaped like x, norms [M, S]); y = x / max(||x||_C, 1e-12), norms unclamped."""
    xf = _flat(x)
    norms = np.sqrt((xf * xf).sum(axis=1))
    y = xf / np.maximum(norms, EPS)[:, None, :]
    return y.reshape(np.shape(x)), norms


def normalize_backward(grad_y, y, norms) -> np.ndarray:
    """(grad_y - y <y, grad_y>_C) / norm, grad_y / 1e-12 where the norm was clamped."""
    gyf, yf = _flat(grad_y), _flat(y)
    n = np.asarray(norms, dtype=np.float64)
    dot = (gyf * yf).sum(axis=1)
    clamped = n < EPS
    gx = np.where(
        clamped[:, None, :], gyf / EPS, (gyf - yf * dot[:, None, :]) / np.where(clamped, 1.0, n)[:, None, :]
    )
    return gx.reshape(np.shape(grad_y))


def _maxima(Z: np.ndarray):
    """Z [..., S, S] -> (mp, mg, ap, ag, Z): maxima over gallery / probe locations, first argmax."""
    return Z.max(axis=-1), Z.max(axis=-2), Z.argmax(axis=-1), Z.argmax(axis=-2), Z


def pair_maxima(probe, gallery):
    """All pairs -> (mp, mg, ap, ag [P, G, S], Z [P, G, S, S]); Z for near-tie checks."""
    return _maxima(np.einsum("pcs,gcr->pgsr", _flat(probe), _flat(gallery)))


def pair_maxima_restricted(features, embeds, candidates):
    """Pair (b, j) = features[b] vs embeds[candidates[b, j]] -> (mp, mg, ap, ag [B, K, S], Z [B, K, S, S])."""
    x, e = _flat(features), _flat(embeds)
    return _maxima(np.einsum("bcs,bkcr->bksr", x, e[np.asarray(candidates)]))


def argmax_gap(Z) -> float:
    """Smallest gap between the maximum and the runner-up over every row and column of Z [..., S, S]
    (how far the argmax is from switching)."""
    a = np.sort(Z, axis=-1)
    b = np.sort(Z, axis=-2)
    return min(float((a[..., -1] - a[..., -2]).min()), float((b[..., -1, :] - b[..., -2, :]).min()))


def _pair_backward(gmp, gmg, ap, ag, P, G):
    """One pair, explicit scatter. P, G [C, S]; returns (dP, dG) [C, S]."""
    S = P.shape[1]
    dP = np.zeros_like(P)
    dG = np.zeros_like(G)
    s_idx = np.arange(S)
    # probe direction: Z[s, ap[s]]
    dP += gmp[None, :] * G[:, ap]
    np.add.at(dG, (slice(None), ap), gmp[None, :] * P)
    # gallery direction: Z[ag[r], r]
    np.add.at(dP, (slice(None), ag), gmg[None, :] * G[:, s_idx])
    dG += gmg[None, :] * P[:, ag]
    return dP, dG


def _scatter_pairs(gmp, gmg, ap, ag, p, g, pairs):
    """Sum _pair_backward over (probe row i, pair index, gallery row n) -> (grad_p, grad_g) [M, C, S]."""
    gp, gg = np.zeros_like(p), np.zeros_like(g)
    for i, at, n in pairs:
        dP, dG = _pair_backward(
            np.asarray(gmp[at], np.float64),
            np.asarray(gmg[at], np.float64),
            np.asarray(ap[at], np.int64),
            np.asarray(ag[at], np.int64),
            p[i],
            g[n],
        )
        gp[i] += dP
        gg[n] += dG
    return gp, gg


def pair_maxima_backward(grad_mp, grad_mg, argmax_p, argmax_g, probe, gallery):
    """Through the recorded argmax only -> (grad_probe, grad_gallery) shaped like the maps."""
    p, g = _flat(probe), _flat(gallery)
    pairs = ((i, (i, j), j) for i in range(p.shape[0]) for j in range(g.shape[0]))
    gp, gg = _scatter_pairs(grad_mp, grad_mg, argmax_p, argmax_g, p, g, pairs)
    return gp.reshape(np.shape(probe)), gg.reshape(np.shape(gallery))


def pair_maxima_restricted_backward(grad_mp, grad_mg, argmax_p, argmax_g, features, embeds, candidates):
    """-> (grad_features, grad_embeds) shaped like the maps; rows of embeds that are no candidate are 0."""
    x, e = _flat(features), _flat(embeds)
    cand = np.asarray(candidates)
    pairs = ((b, (b, j), int(cand[b, j])) for b in range(cand.shape[0]) for j in range(cand.shape[1]))
    gx, ge = _scatter_pairs(grad_mp, grad_mg, argmax_p, argmax_g, x, e, pairs)
    return gx.reshape(np.shape(features)), ge.reshape(np.shape(embeds))


def composed_restricted(features, embeds, candidates, wp, wg) -> float:
    """f = sum_{b,j,s} wp[b,j,s] mp[b,j,s] + wg[b,j,s] mg[b,j,s] of the normalised maps (float64)."""
    x, _ = normalize(features)
    e, _ = normalize(embeds)
    mp, mg, _, _, _ = pair_maxima_restricted(x, e, candidates)
    return float((wp * mp).sum() + (wg * mg).sum())


def match_scores(probe, gallery, weight, bias):
    """out[p, g] = mp . weight[:S] + mg . weight[S:] + bias, [P, G]."""
    mp, mg, _, _, _ = pair_maxima(probe, gallery)
    S = mp.shape[2]
    w = np.asarray(weight, np.float64)
    return mp @ w[:S] + mg @ w[S:] + float(bias)
