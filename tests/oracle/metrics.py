"""Slow loop references for qaconv_gs.metrics, written from the protocol descriptions.

Deliberately a different style from the vectorised code: per-query Python loops over explicitly sorted
lists, dense matrices for re-ranking, pair counting for AUC, brute-force threshold scans.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def ranked_gallery(row, higher_is_better: bool) -> list[int]:
    """Gallery indices best first; ties by gallery index."""
    idx = list(range(len(row)))
    if higher_is_better:
        return sorted(idx, key=lambda g: (-float(row[g]), g))
    return sorted(idx, key=lambda g: (float(row[g]), g))


def cmc_map_ref(
    scores,
    query_ids,
    gallery_ids,
    query_cams=None,
    gallery_cams=None,
    *,
    higher_is_better=True,
    max_rank=50,
    single_gallery_shot=False,
    repeat=10,
    seed=0,
):
    """Returns (cmc [max_rank], mAP, ap [Q] with NaN for skipped, num_valid, num_skipped)."""
    scores = np.asarray(scores, dtype=np.float64)
    Q, G = scores.shape
    qids = [int(v) for v in query_ids]
    gids = [int(v) for v in gallery_ids]
    cams = query_cams is not None
    priorities = None
    if single_gallery_shot:
        rng = np.random.default_rng(seed)
        priorities = [rng.permutation(G).tolist() for _ in range(repeat)]

    first_hit_counts = [0.0] * (max_rank + 1)  # index r = rank r (1-based), weighted
    ap = []
    valid = 0
    for q in range(Q):
        kept = []
        for g in ranked_gallery(scores[q], higher_is_better):
            if gids[g] == -1:
                continue
            if cams and gids[g] == qids[q] and int(gallery_cams[g]) == int(query_cams[q]):
                continue
            kept.append(g)
        is_match = [gids[g] == qids[q] for g in kept]
        n_rel = sum(is_match)
        if n_rel == 0:
            ap.append(float("nan"))
            continue
        valid += 1
        found = 0
        precisions = []
        for k, m in enumerate(is_match, start=1):
            if m:
                found += 1
                precisions.append(found / k)
        ap.append(sum(precisions) / n_rel)

        if not single_gallery_shot:
            r = is_match.index(True) + 1
            if r <= max_rank:
                first_hit_counts[r] += 1.0
            continue
        for t in range(repeat):
            # the kept image of each id with the largest priority of this repeat
            chosen = {}
            for g in kept:
                if gids[g] not in chosen or priorities[t][g] > priorities[t][chosen[gids[g]]]:
                    chosen[gids[g]] = g
            picked = [g for g in kept if chosen[gids[g]] == g]  # still in rank order
            r = [gids[g] == qids[q] for g in picked].index(True) + 1
            if r <= max_rank:
                first_hit_counts[r] += 1.0 / repeat

    if valid == 0:
        return np.full(max_rank, np.nan), float("nan"), np.array(ap), 0, Q
    cmc = []
    running = 0.0
    for r in range(1, max_rank + 1):
        running += first_hit_counts[r]
        cmc.append(running / valid)
    aps = [a for a in ap if not math.isnan(a)]
    return np.array(cmc), sum(aps) / len(aps), np.array(ap), valid, Q - valid


def best_threshold_ref(scores, same):
    """Brute force over the distinct scores; first best = smallest."""
    best, best_correct = None, -1
    for t in sorted(set(float(s) for s in scores)):
        correct = sum(1 for s, y in zip(scores, same) if (s >= t) == bool(y))
        if correct > best_correct:
            best, best_correct = t, correct
    return best


def roc_ref(scores, same):
    """(fpr, tpr, thresholds): thresholds inf then the unique scores, descending; accept score >= t."""
    thresholds = [math.inf] + sorted(set(float(s) for s in scores), reverse=True)
    P = sum(1 for y in same if y)
    N = len(same) - P
    fpr, tpr = [], []
    for t in thresholds:
        tp = sum(1 for s, y in zip(scores, same) if y and s >= t)
        fp = sum(1 for s, y in zip(scores, same) if not y and s >= t)
        tpr.append(tp / P)
        fpr.append(fp / N)
    return np.array(fpr), np.array(tpr), np.array(thresholds)


def auc_ref(scores, same):
    """Mann-Whitney: P(pos score > neg score) + 0.5 P(equal), by counting all pairs."""
    pos = [float(s) for s, y in zip(scores, same) if y]
    neg = [float(s) for s, y in zip(scores, same) if not y]
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else (0.5 if p == n else 0.0)
    return wins / (len(pos) * len(neg))


def eer_ref(scores, same):
    """Exact rational arithmetic: intersect each ROC segment with the line FPR = 1 - TPR, first hit."""
    P = sum(1 for y in same if y)
    N = len(same) - P
    points = [(Fraction(0), Fraction(0))]
    for t in sorted(set(scores), reverse=True):
        tp = sum(1 for s, y in zip(scores, same) if y and s >= t)
        fp = sum(1 for s, y in zip(scores, same) if not y and s >= t)
        points.append((Fraction(fp, N), Fraction(tp, P)))
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 == 1 - y0:
            return float(x0)
        if x0 + y0 < 1 < x1 + y1:
            s = (1 - x0 - y0) / ((x1 - x0) + (y1 - y0))  # (x0 + s dx, y0 + s dy) lies on x + y = 1
            return float(x0 + s * (x1 - x0))
    x, y = points[-1]
    assert x == 1 - y
    return float(x)


def verification_ref(scores, same, *, folds=10, far_targets=(1e-3, 1e-2, 1e-1)):
    """dict with accuracy, accuracy_std, fold_accuracies, fold_thresholds, fpr, tpr, roc_thresholds,
    tar_at_far, eer, auc."""
    scores = [float(s) for s in scores]
    same = [bool(y) for y in same]
    n = len(scores)
    parts = np.array_split(np.arange(n), folds)
    accs, thrs = [], []
    for part in parts:
        test = set(part.tolist())
        tr_s = [scores[i] for i in range(n) if i not in test]
        tr_y = [same[i] for i in range(n) if i not in test]
        t = best_threshold_ref(tr_s, tr_y)
        thrs.append(t)
        accs.append(sum(1 for i in test if (scores[i] >= t) == same[i]) / len(test))
    fpr, tpr, thr = roc_ref(scores, same)
    tar = {}
    for f in far_targets:
        tar[f] = max(tp for fp, tp in zip(fpr, tpr) if fp <= f)
    mean = sum(accs) / folds
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / folds)
    return {
        "accuracy": mean,
        "accuracy_std": std,
        "fold_accuracies": np.array(accs),
        "fold_thresholds": np.array(thrs),
        "fpr": fpr,
        "tpr": tpr,
        "roc_thresholds": thr,
        "tar_at_far": tar,
        "eer": eer_ref(scores, same),
        "auc": auc_ref(scores, same),
    }


def rerank_ref(q_g, q_q, g_g, *, k1=20, k2=6, lambda_value=0.3):
    """Dense k-reciprocal re-ranking following the paper's published steps, one row at a time."""
    q_g = np.asarray(q_g, dtype=np.float64)
    Q, G = q_g.shape
    n = Q + G
    D = np.zeros((n, n))
    D[:Q, :Q] = q_q
    D[:Q, Q:] = q_g
    D[Q:, :Q] = q_g.T
    D[Q:, Q:] = g_g
    # published order: divide each column by its maximum, then transpose
    M = np.zeros((n, n))
    for j in range(n):
        top = max(D[i, j] for i in range(n))
        for i in range(n):
            M[i, j] = D[i, j] / top if top > 0 else D[i, j]
    dist = M.T.copy()

    ranks = [sorted(range(n), key=lambda j, i=i: (dist[i, j], j)) for i in range(n)]
    memo = {}

    def recip(i, k):
        if (i, k) not in memo:
            forward = ranks[i][: k + 1]
            memo[(i, k)] = [j for j in forward if i in ranks[j][: k + 1]]
        return memo[(i, k)]

    half = round(k1 / 2)
    V = np.zeros((n, n))
    for i in range(n):
        base = recip(i, k1)
        expanded = set(base)
        for c in base:
            cand = recip(c, half)
            if len(set(cand) & set(base)) > 2.0 / 3.0 * len(cand):
                expanded.update(cand)
        if not expanded:
            continue
        w = {j: math.exp(-dist[i, j]) for j in expanded}
        total = sum(w.values())
        for j, v in w.items():
            V[i, j] = v / total

    if k2 != 1:
        V_qe = np.zeros((n, n))
        for i in range(n):
            neigh = ranks[i][:k2]
            for j in neigh:
                V_qe[i] += V[j]
            V_qe[i] /= len(neigh)
        V = V_qe

    out = np.zeros((Q, G))
    for i in range(Q):
        for g in range(G):
            lo = hi = 0.0
            for c in range(n):
                lo += min(V[i, c], V[Q + g, c])
                hi += max(V[i, c], V[Q + g, c])
            jac = 1.0 - lo / hi if hi > 0 else 1.0
            out[i, g] = (1 - lambda_value) * jac + lambda_value * dist[i, Q + g]
    return out
