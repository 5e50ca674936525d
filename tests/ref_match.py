"""NumPy float64 reference implementations of the matching kernels (test oracles).

Straightforward maths: einsum for the correlation, max / first argmax (np.argmax returns the first
maximum, like torch.max), explicit scatter-add (np.add.at) for the backward.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def flat(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], x.shape[1], -1)


def normalize_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [M, C, H, W] -> (y, norms [M, S])."""
    xf = flat(x)
    norms = np.sqrt((xf * xf).sum(axis=1))
    y = xf / np.maximum(norms, EPS)[:, None, :]
    return y.reshape(np.shape(x)), norms


def normalize_backward_ref(gy: np.ndarray, y: np.ndarray, norms: np.ndarray) -> np.ndarray:
    gyf, yf = flat(gy), flat(y)
    n = np.asarray(norms, dtype=np.float64)
    dot = (gyf * yf).sum(axis=1)
    clamped = n < EPS
    gx = np.where(
        clamped[:, None, :], gyf / EPS, (gyf - yf * dot[:, None, :]) / np.where(clamped, 1.0, n)[:, None, :]
    )
    return gx.reshape(np.shape(gy))


def correlation(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """p [P, C, S], g [G, C, S] (float64) -> Z [P, G, S, S]."""
    return np.einsum("pcs,gcr->pgsr", p, g)


def pair_maxima_ref(probe: np.ndarray, gallery: np.ndarray):
    """-> (mp, mg, ap, ag, Z) in float64 / int64; Z [P, G, S, S] for near-tie checks."""
    Z = correlation(flat(probe), flat(gallery))
    return Z.max(axis=3), Z.max(axis=2), Z.argmax(axis=3), Z.argmax(axis=2), Z


def restricted_correlation(features: np.ndarray, embeds: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """-> Z [B, K, S, S] with Z[b, j] = features[b]^T embeds[cand[b, j]]."""
    x, e = flat(features), flat(embeds)
    return np.einsum("bcs,bkcr->bksr", x, e[np.asarray(cand)])


def pair_maxima_restricted_ref(features: np.ndarray, embeds: np.ndarray, cand: np.ndarray):
    Z = restricted_correlation(features, embeds, cand)
    return Z.max(axis=3), Z.max(axis=2), Z.argmax(axis=3), Z.argmax(axis=2), Z


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


def pair_maxima_backward_ref(gmp, gmg, ap, ag, probe, gallery):
    p, g = flat(probe), flat(gallery)
    gp, gg = np.zeros_like(p), np.zeros_like(g)
    for i in range(p.shape[0]):
        for j in range(g.shape[0]):
            dP, dG = _pair_backward(
                np.asarray(gmp[i, j], np.float64),
                np.asarray(gmg[i, j], np.float64),
                np.asarray(ap[i, j], np.int64),
                np.asarray(ag[i, j], np.int64),
                p[i],
                g[j],
            )
            gp[i] += dP
            gg[j] += dG
    return gp.reshape(np.shape(probe)), gg.reshape(np.shape(gallery))


def pair_maxima_restricted_backward_ref(gmp, gmg, ap, ag, features, embeds, cand):
    x, e = flat(features), flat(embeds)
    gx, ge = np.zeros_like(x), np.zeros_like(e)
    cand = np.asarray(cand)
    for b in range(x.shape[0]):
        for j in range(cand.shape[1]):
            n = int(cand[b, j])
            dX, dE = _pair_backward(
                np.asarray(gmp[b, j], np.float64),
                np.asarray(gmg[b, j], np.float64),
                np.asarray(ap[b, j], np.int64),
                np.asarray(ag[b, j], np.int64),
                x[b],
                e[n],
            )
            gx[b] += dX
            ge[n] += dE
    return gx.reshape(np.shape(features)), ge.reshape(np.shape(embeds))


def composed_restricted(features, embeds, cand, wp, wg) -> float:
    """f = sum_{b,j,s} wp[b,j,s] mp[b,j,s] + wg[b,j,s] mg[b,j,s] of the normalised maps (float64)."""
    x, _ = normalize_ref(features)
    e, _ = normalize_ref(embeds)
    mp, mg, _, _, _ = pair_maxima_restricted_ref(x, e, cand)
    return float((wp * mp).sum() + (wg * mg).sum())


def match_scores_ref(probe, gallery, weight, bias):
    mp, mg, _, _, _ = pair_maxima_ref(probe, gallery)
    S = mp.shape[2]
    w = np.asarray(weight, np.float64)
    return mp @ w[:S] + mg @ w[S:] + float(bias)
