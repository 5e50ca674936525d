"""Evaluation metrics for re-identification and face verification, vectorised NumPy.

Ranking (re-ID): :func:`cmc_map`
    Market-1501 / MSMT17 protocol on a [Q, G] score matrix. For each query, the gallery is sorted by score
    (best first; see "Ties" below) and then these gallery items are **ignored** (removed from the ranked
    list before any rank is counted):

    - junk: every gallery item whose id is ``-1``;
    - same id AND same camera as the query (only when both ``query_cams`` and ``gallery_cams`` are
      given; with both None nothing but junk is ignored).

    Nothing else is ignored. Id ``0`` (Market-1501's distractors) is an ordinary id: it stays in the
    gallery as a non-match for every query whose id is not 0, and a query whose id is 0 would match it
    (the public Market-1501 and MSMT17 query sets contain no id 0 or -1). A query whose id is -1 can never
    match (junk is removed) and is therefore skipped. A query is *skipped* when no valid match is left
    after the removals; skipped queries are counted in ``num_skipped_queries``, get ``ap = NaN`` and take
    no part in CMC or mAP.

    CMC: ``cmc[r - 1]`` is the fraction of valid queries whose first true match is at rank <= r among the
    kept items. Its length is always ``max_rank``; ranks beyond the number of kept items repeat the last
    value (no truncation to G, unlike some implementations).

    AP: the torchreid / open-reid / scikit-learn ``average_precision_score`` definition, the mean of the
    precision at each true match: ``AP = (1 / R) * sum_{k : item k is a match} (matches in the top k) / k``
    with ``R`` the number of valid matches and ``k`` the 1-based rank among kept items. (The original
    Market-1501 MATLAB code averages the precision just before and at each hit instead; its numbers are
    slightly different.) ``mAP`` is the mean AP over valid queries.

    Ties: for each query the gallery is ordered by (score, then gallery index ascending), i.e. a stable
    sort of the scores (descending for similarities, ascending for distances), compared as float64.
    ``-0.0`` and ``0.0`` are equal; ``+-inf`` are allowed, NaN is rejected.

    ``single_gallery_shot=True`` is the CUHK03 single-shot protocol: for each query and each gallery id
    one valid (kept) image is chosen at random and the CMC is computed on those images only; this is
    repeated ``repeat`` times and the per-query CMC is averaged over the repeats. The draws are defined
    exactly so that they are reproducible and independent of the query blocking: with
    ``rng = np.random.default_rng(seed)``, repeat ``t`` (t = 0 .. repeat-1) uses the priority
    ``rng.permutation(G)`` (drawn in that order), and for every query and gallery id the kept image of
    that id with the largest priority is the chosen one (a uniformly random valid image per query and id;
    the same draw is shared by all queries). As in torchreid's ``cuhk03`` mode, AP / mAP are computed on
    the full kept gallery, without sampling.

Verification (face): :func:`verification`
    LFW-style: ``scores[n]`` is the similarity of pair n (higher = more likely the same identity), and a
    pair is predicted "same" when ``score >= threshold``. Accuracy is K-fold: the pairs are split into
    ``folds`` contiguous folds in the given order (LFW's pairs.txt order; sizes as ``np.array_split``,
    the first ``N % folds`` folds one pair longer). For each fold, the threshold is chosen on the other
    folds among the distinct scores of those folds (SPEC section "Evaluation names"); the one with the highest
    training accuracy wins, ties going to the smallest threshold. It is then applied to the held-out fold.
    (So a held-out same pair scoring below every same pair of the other folds is always rejected: the rule
    never puts a threshold between two observed scores, as midpoint rules do.) The mean and population
    std (``np.std``) of the fold accuracies are reported with the chosen thresholds. ROC, TAR@FAR, EER
    and AUC use all pairs.

Re-ranking: :func:`rerank`
    k-reciprocal re-ranking (Zhong et al., CVPR 2017) on distance matrices, memory-lean: the sparse
    k-reciprocal weight vectors take O((Q+G) x k) memory instead of a dense (Q+G)^2 matrix. It returns
    distances: evaluate them with ``cmc_map(..., higher_is_better=False)``. QAConv similarities are
    turned into distances with :func:`scores_to_distances`.

Shortlists: :func:`cmc_map_ranked`
    CMC and mAP of per-query ranked lists that cover only part of the gallery (e.g. the survivors of
    :func:`qaconv_gs.two_stage_search`), with the rules of :func:`cmc_map`. Gallery items outside a
    query's list count as not retrieved: they never hit in the CMC and add precision 0 to the AP, whose
    denominator is still the number of valid matches in the whole gallery. With lists that cover the whole
    gallery in the order :func:`cmc_map` sorts it, the numbers are those of :func:`cmc_map`, bit for bit.

Image names: :func:`parse_market_name`, :func:`read_market_list`
    Identity and camera from Market-1501 style names (``0002_c1s1_000451_03.jpg``: id 2, camera 1;
    ``-1_...`` junk; ``0000_...`` distractors; DukeMTMC-reID's ``0001_c2_f0046182.jpg`` has the same
    pattern).

Plots: :func:`plot_cmc`, :func:`plot_roc` (optional matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ._validate import _to_array, as_labels, check_int, check_real, shape_str

__all__ = [
    "RankingResult",
    "VerificationResult",
    "cmc_map",
    "cmc_map_ranked",
    "parse_market_name",
    "plot_cmc",
    "plot_roc",
    "rank_metrics",
    "read_market_list",
    "rerank",
    "scores_to_distances",
    "tar_at_far",
    "verification",
]

# Elements per [block, G] temporary in cmc_map: ~4M keeps each int64 temporary at ~32 MB.
_BLOCK_ELEMENTS = 1 << 22
# Gathered (query entry, gallery entry) pairs per chunk in the sparse re-ranking steps.
_PAIR_BUDGET = 1 << 22


# ----------------------------------------------------------------------------------------------------------
# validation helpers


def _as_float64(x: object, name: str, ndim: int, *, allow_inf: bool) -> np.ndarray:
    a = _to_array(x, name)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a real floating-point (or integer) array, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {shape_str(a.shape)}")
    if a.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {shape_str(a.shape)}")
    out = np.ascontiguousarray(a, dtype=np.float64)
    nan = int(np.count_nonzero(np.isnan(out)))
    if nan:
        raise ValueError(f"{name}: contains {nan} NaN value(s)")
    if not allow_inf:
        inf = int(np.count_nonzero(np.isinf(out)))
        if inf:
            raise ValueError(f"{name}: contains {inf} infinite value(s); scores must be finite")
    return out


def _scores_matrix(x: object, name: str, *, check_nan: bool = True) -> np.ndarray:
    """A non-empty 2-d real array (without NaN if check_nan), left in its own dtype: no full copy."""
    a = _to_array(x, name)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a real floating-point (or integer) array, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array, got shape {shape_str(a.shape)}")
    if a.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {shape_str(a.shape)}")
    if check_nan and a.dtype.kind == "f":
        rows = max(1, _BLOCK_ELEMENTS // a.shape[1])  # chunks bound the temporary mask
        nan = sum(int(np.count_nonzero(np.isnan(a[r0 : r0 + rows]))) for r0 in range(0, a.shape[0], rows))
        if nan:
            raise ValueError(f"{name}: contains {nan} NaN value(s)")
    return a


def _check_distances(D: np.ndarray, name: str) -> None:
    """Raise unless every entry of the float64 (view) D is finite and >= 0; checked in row chunks."""
    rows = max(1, _BLOCK_ELEMENTS // D.shape[1])
    nan = inf = 0
    low = 0.0
    for r0 in range(0, D.shape[0], rows):
        chunk = D[r0 : r0 + rows]
        nan += int(np.count_nonzero(np.isnan(chunk)))
        inf += int(np.count_nonzero(np.isinf(chunk)))
        low = min(low, float(np.nanmin(np.where(np.isinf(chunk), 0.0, chunk), initial=0.0)))
    if nan:
        raise ValueError(f"{name}: contains {nan} NaN value(s)")
    if inf:
        raise ValueError(f"{name}: contains {inf} infinite value(s); distances must be finite")
    if low < 0:
        raise ValueError(f"{name}: distances must be >= 0, got {low:.6g}")


def _ids(x: object, name: str, n: int, what: str) -> np.ndarray:
    out = as_labels(x, name)
    if out.shape[0] != n:
        raise ValueError(f"{name}: expected length {n} ({what}), got length {out.shape[0]}")
    return out


def _as_bool_labels(x: object, name: str, n: int) -> np.ndarray:
    a = _to_array(x, name)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {shape_str(a.shape)}")
    if a.shape[0] != n:
        raise ValueError(f"{name}: expected length {n} (one per score), got length {a.shape[0]}")
    if a.dtype.kind == "b":
        return np.ascontiguousarray(a)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected a bool (or 0/1) array, got dtype {a.dtype}")
    if not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name}: expected only 0/1 (or True/False) values")
    return np.ascontiguousarray(a != 0)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# ----------------------------------------------------------------------------------------------------------
# ranking: CMC and mAP


@dataclass(frozen=True, eq=False)
class RankingResult:
    """Result of :func:`cmc_map`.

    Attributes:
        cmc: [max_rank] float64, ``cmc[r - 1]`` = fraction of valid queries with a true match within rank r
            (in single-gallery-shot mode, averaged over the repeats). NaN if no query is valid.
        mAP: mean of ``ap`` over valid queries (NaN if none is valid).
        ap: [Q] float64 per-query average precision, NaN for skipped queries.
        num_valid_queries: queries with at least one valid match.
        num_skipped_queries: queries without one (``Q - num_valid_queries``).
    """

    cmc: np.ndarray
    mAP: float
    ap: np.ndarray
    num_valid_queries: int
    num_skipped_queries: int

    def rank(self, r: int) -> float:
        """CMC at rank r (1-based): ``rank(1)`` is the usual rank-1 accuracy."""
        r = check_int(r, "r", 1, int(self.cmc.shape[0]))
        return float(self.cmc[r - 1])


def cmc_map(
    scores,
    query_ids,
    gallery_ids,
    query_cams=None,
    gallery_cams=None,
    *,
    higher_is_better: bool = True,
    max_rank: int = 50,
    single_gallery_shot: bool = False,
    repeat: int = 10,
    seed: int = 0,
    block_size: int | None = None,
) -> RankingResult:
    """CMC and mAP of a query-vs-gallery score matrix, Market-1501 / MSMT17 (or CUHK03 single-shot) rules.

    See the module docstring for exactly what is ignored, the AP formula, the tie rule and the
    single-gallery-shot draws.

    Args:
        scores: [Q, G] similarities (``higher_is_better=True``) or distances (``False``); +-inf allowed,
            NaN rejected. Not modified.
        query_ids: [Q] integer ids of the queries.
        gallery_ids: [G] integer ids of the gallery; -1 = junk (removed), 0 = ordinary (distractor) id.
        query_cams, gallery_cams: [Q] / [G] integer camera ids, both or neither. When given, gallery items
            with the query's id and camera are ignored for that query.
        higher_is_better: True for similarities, False for distances.
        max_rank: length of the returned CMC (>= 1); independent of G.
        single_gallery_shot: CUHK03-style single-shot CMC (one random valid image per gallery id).
        repeat: number of random single-shot draws averaged (single_gallery_shot only).
        seed: seed of ``np.random.default_rng`` for the draws (single_gallery_shot only).
        block_size: queries per block (None: about 4M / G). Results do not depend on it; memory is
            O(block_size x G) on top of the scores.

    Returns:
        :class:`RankingResult`.
    """
    S = _scores_matrix(scores, "scores")
    Q, G = S.shape
    qid = _ids(query_ids, "query_ids", Q, f"one per row of scores, shape {shape_str(S.shape)}")
    gid = _ids(gallery_ids, "gallery_ids", G, f"one per column of scores, shape {shape_str(S.shape)}")
    if (query_cams is None) != (gallery_cams is None):
        raise ValueError("query_cams, gallery_cams: pass both or neither")
    use_cams = query_cams is not None
    if use_cams:
        qcam = _ids(query_cams, "query_cams", Q, f"one per row of scores, shape {shape_str(S.shape)}")
        gcam = _ids(gallery_cams, "gallery_cams", G, f"one per column of scores, shape {shape_str(S.shape)}")
    max_rank = check_int(max_rank, "max_rank", 1)
    sgs = bool(single_gallery_shot)
    if sgs:
        repeat = check_int(repeat, "repeat", 1)
        seed = check_int(seed, "seed", 0)
    if block_size is None:
        block_size = max(1, min(256, _BLOCK_ELEMENTS // G))
    block_size = check_int(block_size, "block_size", 1)

    if sgs:
        rng = np.random.default_rng(seed)
        priority = np.stack([rng.permutation(G) for _ in range(repeat)])  # [repeat, G], distinct per row
        codes, num_codes = _compact_codes(gid)

    ap = np.full(Q, np.nan)
    # hist[r] = (number of valid queries, summed over repeats) whose first hit is at rank r; the last
    # bucket collects every rank > max_rank.
    hist = np.zeros(max_rank + 2, dtype=np.int64)
    num_valid = 0
    for q0 in range(0, Q, block_size):
        q1 = min(Q, q0 + block_size)
        B = q1 - q0
        block = np.asarray(S[q0:q1], dtype=np.float64)  # per block: no full float64 copy of the scores
        order = np.argsort(-block if higher_is_better else block, axis=1, kind="stable")
        g_sorted = gid[order]
        qi = qid[q0:q1, None]
        keep = g_sorted != -1
        if use_cams:
            keep &= ~((g_sorted == qi) & (gcam[order] == qcam[q0:q1, None]))
        match = keep & (g_sorted == qi)
        pos = np.cumsum(keep, axis=1, dtype=np.int64)  # 1-based rank among kept items, at kept positions
        hits = np.cumsum(match, axis=1, dtype=np.int64)
        num_rel = hits[:, -1]
        valid = num_rel > 0
        prec = np.divide(hits, pos, out=np.zeros(match.shape), where=match)
        ap[q0:q1] = np.where(valid, prec.sum(axis=1) / np.maximum(num_rel, 1), np.nan)
        rows = np.flatnonzero(valid)
        num_valid += rows.size
        if rows.size == 0:
            continue
        if not sgs:
            first = pos[rows, np.argmax(match[rows], axis=1)]
            hist += np.bincount(np.minimum(first, max_rank + 1), minlength=max_rank + 2)
            continue
        c_sorted = codes[order]
        flat_group = np.arange(B)[:, None] * num_codes + c_sorted  # (query in block, gallery id) group
        for t in range(repeat):
            pri = np.where(keep, priority[t][order], -1)
            best = np.full(B * num_codes, -1, dtype=np.int64)
            np.maximum.at(best, flat_group.ravel(), pri.ravel())
            # priorities are distinct, so exactly one kept image per (query, id) group equals the maximum
            chosen = keep & (pri == best[flat_group])
            chosen_rank = np.cumsum(chosen, axis=1, dtype=np.int64)
            true_pos = np.argmax((chosen & match)[rows], axis=1)  # the chosen image of the query's own id
            first = chosen_rank[rows, true_pos]
            hist += np.bincount(np.minimum(first, max_rank + 1), minlength=max_rank + 2)

    return _ranking_result(hist, ap, int(num_valid), num_valid * (repeat if sgs else 1), Q, max_rank)


def _ranking_result(hist: np.ndarray, ap: np.ndarray, num_valid: int, draws: int, Q: int, max_rank: int):
    """RankingResult from the histogram of first-hit ranks (hist[r], r = 1..max_rank; 0 and max_rank + 1
    collect the rest) over `draws` ranked lists and the per-query AP (NaN for skipped queries)."""
    if num_valid:
        cmc = np.cumsum(hist[1 : max_rank + 1]) / draws
        mAP = float(np.mean(ap[~np.isnan(ap)]))
    else:
        cmc = np.full(max_rank, np.nan)
        mAP = float("nan")
    return RankingResult(
        cmc=_readonly(cmc),
        mAP=mAP,
        ap=_readonly(ap),
        num_valid_queries=num_valid,
        num_skipped_queries=int(Q - num_valid),
    )


def rank_metrics(
    scores, query_ids, gallery_ids, query_cams=None, gallery_cams=None, max_rank: int = 50
) -> RankingResult:
    """The pinned name of SPEC.md ("Evaluation names"): :func:`cmc_map` on similarities [Q, G] with the
    Market-1501 / MSMT17 rules; ``.cmc`` [max_rank] float64, ``.mAP``, ``.num_valid_queries``."""
    return cmc_map(scores, query_ids, gallery_ids, query_cams, gallery_cams, max_rank=max_rank)


def _compact_codes(ids: np.ndarray) -> tuple[np.ndarray, int]:
    uniq, codes = np.unique(ids, return_inverse=True)
    return codes.reshape(-1).astype(np.int64), int(uniq.size)


def _pair_codes(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes of the (a, b) pairs and the (c, d) pairs, equal exactly where the pairs are equal."""
    both = np.stack([np.concatenate([a, c]), np.concatenate([b, d])], axis=1)
    _, inv = np.unique(both, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    return inv[: a.shape[0]], inv[a.shape[0] :]


def _valid_match_counts(qid: np.ndarray, gid: np.ndarray, qcam=None, gcam=None) -> np.ndarray:
    """[Q] int64: gallery items that are a valid match of each query under the :func:`cmc_map` rules
    (same id, not junk -1, and not the query's camera when cameras are given). O((Q + G) log(Q + G))."""
    zeros_q = np.zeros_like(qid)
    zeros_g = np.zeros_like(gid)
    q_code, g_code = _pair_codes(qid, zeros_q, gid, zeros_g)
    count = np.bincount(g_code, minlength=int(q_code.max(initial=-1)) + 1)[q_code]
    if qcam is not None:
        q_code, g_code = _pair_codes(qid, qcam, gid, gcam)
        count = count - np.bincount(g_code, minlength=int(q_code.max(initial=-1)) + 1)[q_code]
    return np.where(qid == -1, 0, count).astype(np.int64)


def cmc_map_ranked(
    ranked,
    query_ids,
    gallery_ids,
    query_cams=None,
    gallery_cams=None,
    *,
    max_rank: int = 50,
) -> RankingResult:
    """CMC and mAP of ranked shortlists (best first), :func:`cmc_map`'s rules, missing items not retrieved.

    For each query only the gallery items of its list are ranked, in the given order; junk (id -1) and,
    with cameras, same-id same-camera items are removed from the list as in :func:`cmc_map`. A query is
    valid when the **whole** gallery holds a valid match for it (so the valid queries are those of
    :func:`cmc_map`); a valid match that is not in its list is never found: it takes no part in the CMC and
    contributes precision 0 to the AP (whose denominator counts every valid match of the gallery). The
    CMC beyond the list length repeats its last value. Lists covering the whole gallery in cmc_map's order
    (score descending, ties to the lower gallery index) give cmc_map's result bit for bit.

    Args:
        ranked: [Q, T] integer gallery indices in [0, G), distinct within a row, best first (e.g.
            ``two_stage_search(...).ids``).
        query_ids, gallery_ids, query_cams, gallery_cams: as for :func:`cmc_map`; G = len(gallery_ids).
        max_rank: length of the returned CMC (>= 1).

    Returns:
        :class:`RankingResult`.
    """
    gid = as_labels(gallery_ids, "gallery_ids")
    G = gid.shape[0]
    if G == 0:
        raise ValueError("gallery_ids: expected a non-empty array, got shape (0,)")
    r = _to_array(ranked, "ranked")
    if r.dtype.kind not in "iu":
        raise TypeError(f"ranked: expected an integer array of gallery indices, got dtype {r.dtype}")
    if r.ndim != 2 or r.size == 0:
        raise ValueError(f"ranked: expected a non-empty 2-d [Q, T] array, got shape {shape_str(r.shape)}")
    if (r < 0).any() or (r >= G).any():
        bad = int(r.min()) if (r < 0).any() else int(r.max())
        raise ValueError(f"ranked: values must be gallery indices in [0, {G}), got {bad}")
    r = np.ascontiguousarray(r, dtype=np.int64)
    Q, T = r.shape
    if T > 1:
        srt = np.sort(r, axis=1)
        dup = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
        if dup.size:
            raise ValueError(f"ranked: row {int(dup[0])} lists a gallery index more than once")
    qid = _ids(query_ids, "query_ids", Q, f"one per row of ranked, shape {shape_str(r.shape)}")
    if (query_cams is None) != (gallery_cams is None):
        raise ValueError("query_cams, gallery_cams: pass both or neither")
    use_cams = query_cams is not None
    qcam = gcam = None
    if use_cams:
        qcam = _ids(query_cams, "query_cams", Q, f"one per row of ranked, shape {shape_str(r.shape)}")
        gcam = _ids(gallery_cams, "gallery_cams", G, "one per gallery id")
    max_rank = check_int(max_rank, "max_rank", 1)

    num_rel = _valid_match_counts(qid, gid, qcam, gcam)
    ap = np.full(Q, np.nan)
    hist = np.zeros(max_rank + 2, dtype=np.int64)  # as cmc_map: the last bucket is "beyond max_rank"
    block_size = max(1, min(256, _BLOCK_ELEMENTS // T))
    for q0 in range(0, Q, block_size):
        q1 = min(Q, q0 + block_size)
        order = r[q0:q1]
        g_sorted = gid[order]
        qi = qid[q0:q1, None]
        keep = g_sorted != -1
        if use_cams:
            keep &= ~((g_sorted == qi) & (gcam[order] == qcam[q0:q1, None]))
        match = keep & (g_sorted == qi)
        pos = np.cumsum(keep, axis=1, dtype=np.int64)
        hits = np.cumsum(match, axis=1, dtype=np.int64)
        rel = num_rel[q0:q1]
        valid = rel > 0
        prec = np.divide(hits, pos, out=np.zeros(match.shape), where=match)
        ap[q0:q1] = np.where(valid, prec.sum(axis=1) / np.maximum(rel, 1), np.nan)
        rows = np.flatnonzero(valid)
        found = match[rows].any(axis=1)
        first = pos[rows[found], np.argmax(match[rows[found]], axis=1)]
        hist += np.bincount(np.minimum(first, max_rank + 1), minlength=max_rank + 2)
        hist[max_rank + 1] += int(np.count_nonzero(~found))  # not in the list: never found
    num_valid = int(np.count_nonzero(num_rel > 0))
    return _ranking_result(hist, ap, num_valid, num_valid, Q, max_rank)


# ----------------------------------------------------------------------------------------------------------
# image names: Market-1501 style


_MARKET_NAME = re.compile(r"(-1|\d+)_c(\d+)")


def parse_market_name(name: str) -> tuple[int, int]:
    """(identity, camera) of a Market-1501 style image name, e.g. ``0002_c1s1_000451_03.jpg`` -> (2, 1).

    A leading directory is ignored (``/data/query/0002_c1s1_000451_03.jpg``; ``/`` or ``\\``). Id ``-1`` is
    Market-1501's junk, ``0`` its distractors (both returned as they are, for :func:`cmc_map` to treat).
    DukeMTMC-reID names (``0001_c2_f0046182.jpg``) follow the same pattern.

    Raises:
        TypeError: name is not a str.
        ValueError: the name does not start with ``ID_cCAM`` (ID = digits or -1, CAM = digits).
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    base = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    m = _MARKET_NAME.match(base)
    if m is None:
        raise ValueError(
            f"name: {name!r} is not a Market-1501 style image name (expected ID_cCAM..., e.g. "
            "'0002_c1s1_000451_03.jpg', or -1_cCAM... for junk)"
        )
    return int(m.group(1)), int(m.group(2))


def read_market_list(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Ids and cameras of a text file of Market-1501 style image names, one per line -> (ids, cams), int64.

    Lines are stripped; blank lines are skipped; paths are allowed (the base name is parsed).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that does not parse (its 1-based number and text in the message), or no names.
    """
    path = os.fspath(path)
    ids, cams = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            try:
                pid, cam = parse_market_name(text)
            except ValueError:
                raise ValueError(
                    f"{path}: line {number}: {text!r} is not a Market-1501 style image name (expected "
                    "ID_cCAM..., e.g. '0002_c1s1_000451_03.jpg')"
                ) from None
            ids.append(pid)
            cams.append(cam)
    if not ids:
        raise ValueError(f"{path}: no image names (the file is empty)")
    return np.array(ids, dtype=np.int64), np.array(cams, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------
# verification: K-fold accuracy, ROC, TAR@FAR, EER, AUC


@dataclass(frozen=True, eq=False)
class VerificationResult:
    """Result of :func:`verification`.

    Attributes:
        accuracy: mean of ``fold_accuracies``.
        accuracy_std: population standard deviation (``np.std``) of ``fold_accuracies``; also ``std``.
        fold_accuracies: [folds] accuracy on each held-out fold.
        fold_thresholds: [folds] threshold chosen on the other folds (one of their scores); also
            readable as ``thresholds``.
        fpr, tpr, roc_thresholds: [T] ROC as scikit-learn's ``roc_curve(same, scores,
            drop_intermediate=False)``: thresholds are ``+inf`` then the unique scores in descending order,
            and point i counts the pairs with ``score >= roc_thresholds[i]`` as accepted.
        tar_at_far: {far: tar}, the largest TPR over ROC points with FPR <= far.
        eer: equal error rate, where FPR = 1 - TPR on the piecewise-linear ROC.
        auc: area under the ROC (trapezoids; equals P(pos > neg) + P(pos == neg) / 2).
    """

    accuracy: float
    accuracy_std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray
    fpr: np.ndarray
    tpr: np.ndarray
    roc_thresholds: np.ndarray
    tar_at_far: dict[float, float]
    eer: float
    auc: float

    @property
    def std(self) -> float:
        """``accuracy_std`` under the name SPEC.md pins."""
        return self.accuracy_std

    @property
    def thresholds(self) -> np.ndarray:
        """``fold_thresholds`` under the name SPEC.md pins."""
        return self.fold_thresholds

    @property
    def roc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fpr, tpr, thresholds), the order of scikit-learn's ``roc_curve``."""
        return self.fpr, self.tpr, self.roc_thresholds


def verification(
    scores,
    same,
    *,
    folds: int = 10,
    far_targets: Sequence[float] = (1e-3, 1e-2, 1e-1),
) -> VerificationResult:
    """Pair verification metrics: LFW K-fold accuracy, ROC, TAR@FAR, EER and AUC.

    Args:
        scores: [N] finite pair similarities (higher = same identity). For distances pass ``-d``.
        same: [N] bool (or 0/1): True where the pair shows the same identity. Both classes must occur.
        folds: number of contiguous folds (>= 2, <= N); LFW uses 10 folds of 600 pairs.
        far_targets: false-accept rates in [0, 1] at which TAR is reported.

    Returns:
        :class:`VerificationResult`; see the module docstring for the threshold selection rule.
    """
    s = _as_float64(scores, "scores", 1, allow_inf=False)
    N = s.shape[0]
    y = _as_bool_labels(same, "same", N)
    folds = check_int(folds, "folds", 2)
    if folds > N:
        raise ValueError(f"folds: expected at most the number of pairs N = {N}, got {folds}")
    if isinstance(far_targets, (str, bytes)) or not isinstance(far_targets, (Sequence, np.ndarray)):
        raise TypeError(f"far_targets: expected a sequence of numbers, got {type(far_targets).__name__}")
    fars = [check_real(f, "far_targets", 0.0, 1.0) for f in far_targets]
    _check_both_kinds(y)

    sizes = np.full(folds, N // folds)
    sizes[: N % folds] += 1  # np.array_split's sizes
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    fold_acc = np.empty(folds)
    fold_thr = np.empty(folds)
    for f in range(folds):
        test = np.zeros(N, dtype=bool)
        test[bounds[f] : bounds[f + 1]] = True
        thr = _best_threshold(s[~test], y[~test])
        fold_thr[f] = thr
        fold_acc[f] = np.mean((s[test] >= thr) == y[test])

    fpr, tpr, thr = _roc(s, y)
    tar = {f: _tar(fpr, tpr, f) for f in fars}
    return VerificationResult(
        accuracy=float(np.mean(fold_acc)),
        accuracy_std=float(np.std(fold_acc)),
        fold_accuracies=_readonly(fold_acc),
        fold_thresholds=_readonly(fold_thr),
        fpr=_readonly(fpr),
        tpr=_readonly(tpr),
        roc_thresholds=_readonly(thr),
        tar_at_far=tar,
        eer=_eer(fpr, tpr),
        auc=float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0),
    )


def tar_at_far(scores, same, far) -> float | np.ndarray:
    """True-accept rate at each requested false-accept rate: the largest TPR over the ROC points whose
    FPR <= far (the ROC of :func:`verification`: accept ``score >= t`` for each distinct score t).

    Args:
        scores: [N] finite pair similarities; same: [N] bool (or 0/1), both classes present.
        far: one rate in [0, 1] (returns a float) or a sequence of them (returns float64 [len(far)]).
    """
    s = _as_float64(scores, "scores", 1, allow_inf=False)
    y = _as_bool_labels(same, "same", s.shape[0])
    _check_both_kinds(y)
    if isinstance(far, (str, bytes)):
        raise TypeError(f"far: expected a number or a sequence of numbers, got {type(far).__name__}")
    scalar = not isinstance(far, (Sequence, np.ndarray))
    fars = [check_real(f, "far", 0.0, 1.0) for f in ([far] if scalar else list(np.asarray(far).ravel()))]
    fpr, tpr, _ = _roc(s, y)
    out = np.array([_tar(fpr, tpr, f) for f in fars], dtype=np.float64)
    return float(out[0]) if scalar else out


def _check_both_kinds(y: np.ndarray) -> None:
    """Verification needs same and different pairs (bool labels y [N])."""
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(
            f"same: both same (True) and different (False) pairs are needed, got {n_pos} of {y.size} True"
        )


def _tar(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    """The largest TPR over the ROC points with FPR <= far ((0, 0) is on the ROC: never empty)."""
    return float(tpr[fpr <= far].max())


def _best_threshold(s: np.ndarray, y: np.ndarray) -> float:
    """The distinct score t of ``s`` maximising the accuracy of ``s >= t`` on (s, y); the smallest among
    equals."""
    cand = np.unique(s)
    pos = np.sort(s[y])
    neg = np.sort(s[~y])
    accepted_pos = pos.size - np.searchsorted(pos, cand, side="left")
    rejected_neg = np.searchsorted(neg, cand, side="left")
    return float(cand[np.argmax(accepted_pos + rejected_neg)])  # argmax: first = smallest threshold


def _roc(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-s, kind="stable")
    ss = s[order]
    last = np.concatenate([np.flatnonzero(np.diff(ss)), [ss.size - 1]])  # last index of each score group
    tps = np.cumsum(y[order], dtype=np.int64)[last]
    fps = last + 1 - tps
    tpr = np.concatenate([[0], tps]) / tps[-1]
    fpr = np.concatenate([[0], fps]) / fps[-1]
    return fpr, tpr, np.concatenate([[np.inf], ss[last]])


def _eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Where FPR = FNR on the piecewise-linear ROC; the first crossing, coming from the highest threshold.

    d = FPR - FNR = FPR + TPR - 1 is non-decreasing along the ROC, from -1 at (0, 0) to +1 at (1, 1).
    """
    d = fpr + tpr - 1.0
    i = int(np.argmax(d >= 0))
    if d[i] == 0 or i == 0:
        return float(fpr[i])
    t = -d[i - 1] / (d[i] - d[i - 1])  # both FPR and FNR are linear in t on the segment
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


# ----------------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking


def scores_to_distances(scores, *, zero_diagonal: bool = False) -> np.ndarray:
    """Map similarity scores to non-negative distances for :func:`rerank`: ``d = log(1 + exp(-s))``.

    This is ``-log(sigmoid(s))``, the negative log-probability of "same identity" when the score is read
    as a logit (as QAConv's sigmoid-trained head outputs): strictly decreasing in s, > 0, close to ``-s``
    for very negative scores and to ``exp(-s)`` for very positive ones, with no saturation in float64.
    The same fixed transform must be applied to q_g, q_q and g_g so they stay comparable (a per-matrix
    rescaling such as ``s.max() - s`` would not be).

    Args:
        scores: finite array of any shape (float64 result of the same shape).
        zero_diagonal: for a square self-comparison matrix (q_q or g_g): set the diagonal to 0 so every
            sample is its own nearest neighbour, as re-ranking assumes.
    """
    s = _to_array(scores, "scores")
    if s.ndim == 0:
        raise ValueError("scores: expected an array, got a scalar")
    s = _as_float64(s, "scores", s.ndim, allow_inf=False)
    d = np.logaddexp(0.0, -s)
    if zero_diagonal:
        if s.ndim != 2 or s.shape[0] != s.shape[1]:
            raise ValueError(
                f"scores: zero_diagonal needs a square 2-d matrix, got shape {shape_str(s.shape)}"
            )
        np.fill_diagonal(d, 0.0)
    return d


@dataclass(frozen=True)
class _Sparse:
    """Row-compressed sparse rows: row i holds indices[indptr[i]:indptr[i+1]] and their values.

    Indices are ascending within a row, except in the k-reciprocal sets (forward-rank order).
    """

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)


def _from_pairs(rows: np.ndarray, cols: np.ndarray, values: np.ndarray | None, n: int) -> _Sparse:
    """Sparse rows from (row, col, value) triples sorted by row (row-major order kept as given)."""
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    vals = values if values is not None else np.ones(rows.size)
    return _Sparse(indptr, cols.astype(np.int64, copy=False), vals)


def _gather(sp: _Sparse, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each entry of ``which`` (row numbers), the positions of that row's entries in sp.

    Returns (owner, positions): owner[k] is the index into ``which`` that position k came from.
    """
    lengths = sp.lengths[which]
    total = int(lengths.sum())
    owner = np.repeat(np.arange(which.size), lengths)
    starts = np.repeat(sp.indptr[which] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return owner, starts + np.arange(total)


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """keys in sorted_keys, element-wise."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[at] == keys


def _chunks(cost: np.ndarray, budget: int, max_rows: int) -> list[tuple[int, int]]:
    """Split rows 0..len(cost)-1 into consecutive chunks of summed cost <= budget (>= 1 row each)."""
    out = []
    n = cost.size
    csum = np.concatenate([[0], np.cumsum(cost)])
    r0 = 0
    while r0 < n:
        r1 = int(np.searchsorted(csum, csum[r0] + budget, side="right")) - 1
        r1 = min(max(r1, r0 + 1), r0 + max_rows, n)
        out.append((r0, r1))
        r0 = r1
    return out


def _reciprocal_sets(rank: np.ndarray, k: int) -> _Sparse:
    """R(i, k) = {j in F(i) : i in F(j)} with F(i) = rank[i, :k + 1] (clamped to N), as sparse rows.

    Within a row the members keep their forward-rank order (values are unused ones).
    """
    N = rank.shape[0]
    F = rank[:, : min(k + 1, rank.shape[1])]
    rows = np.repeat(np.arange(N, dtype=np.int64), F.shape[1])
    cols = F.ravel().astype(np.int64)
    ok = _member(cols * N + rows, np.sort(rows * N + cols))
    return _from_pairs(rows[ok], cols[ok], None, N)


def _smallest(D: np.ndarray, k: int) -> np.ndarray:
    """[N, k] column indices of each row's k smallest values, ordered by (value, index).

    Equal to ``np.argsort(D, axis=1, kind="stable")[:, :k]`` but O(N) per row: np.partition finds the
    k-th value, every entry <= it is a candidate (all ties included, so the index order of ties is kept),
    and only the candidates are sorted.
    """
    N, M = D.shape
    out = np.empty((N, k), dtype=np.int64)
    rows_per = max(1, _BLOCK_ELEMENTS // M)
    for r0 in range(0, N, rows_per):
        block = D[r0 : r0 + rows_per]
        if k >= M:
            out[r0 : r0 + rows_per] = np.argsort(block, axis=1, kind="stable")[:, :k]
            continue
        kth = np.partition(block, k - 1, axis=1)[:, k - 1 : k]
        r, c = np.nonzero(block <= kth)  # row-major: rows ascending, columns ascending within a row
        o = np.lexsort((c, block[r, c], r))
        r, c = r[o], c[o]
        start = np.searchsorted(r, np.arange(block.shape[0]))
        first = np.arange(r.size) - start[r] < k  # each row has >= k candidates
        out[r0 : r0 + block.shape[0]] = c[first].reshape(-1, k)
    return out


def rerank(q_g, q_q, g_g, *, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of query-gallery distances.

    Follows the published steps on the (Q+G) x (Q+G) matrix D = [[q_q, q_g], [q_g^T, g_g]]:

    1. normalisation as the published code: each column of D divided by its maximum, then transposed,
       ``Dn[i, j] = D[j, i] / max_m D[m, i]`` (for symmetric q_q, g_g: each row divided by its maximum).
       A column of zeros is left as is. The published code squares (Euclidean) distances first; no
       squaring happens here, so pass squared Euclidean distances to reproduce it.
    2. ranks: each row of Dn sorted ascending, ties by index (stable). F(i, k) = the first k+1 (clamped
       to Q+G, so any k1 >= Q+G-1 means "everyone").
    3. R(i, k) = {j in F(i, k) : i in F(j, k)}. The expansion set of i is R(i, k1) plus R(c, h) for each
       c in R(i, k1) with ``|R(c, h) & R(i, k1)| > 2/3 |R(c, h)|``, where ``h = round(k1 / 2)`` rounded
       half to even as in the published code (evaluated exactly in integers: 3 |..| > 2 |..|).
    4. V[i, j] = exp(-Dn[i, j]) / sum over the expansion set, for j in it; 0 elsewhere.
    5. local query expansion (k2 > 1): V[i] <- mean of V[j] over the first min(k2, Q+G) ranked j of i.
    6. Jaccard distance ``1 - sum_j min(V[i,j], V[g,j]) / sum_j max(V[i,j], V[g,j])`` (1 when both rows
       are empty). This is the published ``1 - m / (2 - m)`` whenever every row sums to 1, which holds
       unless a sample has no k-reciprocal neighbour at all (possible only if a diagonal entry is not
       the smallest of its row; keep the diagonal of q_q and g_g at 0).
    7. result = (1 - lambda_value) * Jaccard + lambda_value * Dn[:Q, Q:].

    Memory and time: O((Q+G)^2) only for Dn, one float64 (Q+G) x (Q+G) array (8 (Q+G)^2 bytes, about
    3 GB for Market-1501's 19,281 query + gallery images), and for scanning its rows for neighbours
    (np.partition, O(Q+G) per row). Everything else is sparse: the neighbour lists (Q+G) x max(k1+1, k2),
    the k-reciprocal sets and the weights V, O((Q+G) x s) with s a row's support (at most k1+1 plus what
    the expansion adds, typically a few times k1, times up to k2 after query expansion), and the Q x G
    output. No dense V is ever formed: the Jaccard sums go through an inverted index in bounded chunks.

    Args:
        q_g: [Q, G] query-gallery distances, finite and >= 0.
        q_q: [Q, Q] query-query distances (diagonal ideally 0).
        g_g: [G, G] gallery-gallery distances (diagonal ideally 0).
        k1: k of the k-reciprocal sets (>= 1).
        k2: neighbours averaged in the local query expansion (>= 1; 1 = none).
        lambda_value: weight of the original distance, in [0, 1].

    For QAConv similarity scores use :func:`scores_to_distances` (or any fixed decreasing map to
    non-negative values, the same for all three matrices).

    Returns:
        [Q, G] float64 re-ranked distances (lower = better).
    """
    a = _scores_matrix(q_g, "q_g", check_nan=False)
    Q, G = a.shape
    qq = _scores_matrix(q_q, "q_q", check_nan=False)
    gg = _scores_matrix(g_g, "g_g", check_nan=False)
    if qq.shape != (Q, Q):
        raise ValueError(
            f"q_q: expected shape {shape_str((Q, Q))} for q_g of shape {shape_str(a.shape)}, "
            f"got {shape_str(qq.shape)}"
        )
    if gg.shape != (G, G):
        raise ValueError(
            f"g_g: expected shape {shape_str((G, G))} for q_g of shape {shape_str(a.shape)}, "
            f"got {shape_str(gg.shape)}"
        )
    k1 = check_int(k1, "k1", 1)
    k2 = check_int(k2, "k2", 1)
    lam = check_real(lambda_value, "lambda_value", 0.0, 1.0)
    N = Q + G

    # Dn = transpose of the column-normalised D: build D^T directly (the inputs are copied straight
    # into it, never into float64 copies of their own), validate each block in place, divide the rows.
    Dn = np.empty((N, N))
    Dn[:Q, :Q] = qq.T
    Dn[:Q, Q:] = a
    Dn[Q:, Q:] = gg.T
    for name, view in (("q_g", Dn[:Q, Q:]), ("q_q", Dn[:Q, :Q]), ("g_g", Dn[Q:, Q:])):
        _check_distances(view, name)
    Dn[Q:, :Q] = Dn[:Q, Q:].T
    mx = Dn.max(axis=1, keepdims=True)
    Dn /= np.where(mx > 0, mx, 1.0)

    kk = min(N, max(k1 + 1, k2))
    rank = _smallest(Dn, kk)

    V = _weights(Dn, rank, k1)
    if k2 > 1:
        V = _query_expansion(V, rank[:, : min(k2, N)])
    jac = _jaccard(V, Q)
    return (1.0 - lam) * jac + lam * Dn[:Q, Q:]


def _weights(Dn: np.ndarray, rank: np.ndarray, k1: int) -> _Sparse:
    """Steps 3-4: sparse rows V[i] over the expanded k-reciprocal set of i."""
    N = Dn.shape[0]
    R1 = _reciprocal_sets(rank, k1)
    R2 = _reciprocal_sets(rank, int(round(k1 / 2)))  # Python's round is half to even, like np.around
    r1_rows = np.repeat(np.arange(N, dtype=np.int64), R1.lengths)
    r1_keys = np.sort(r1_rows * N + R1.indices)
    cost = np.bincount(r1_rows, weights=R2.lengths[R1.indices], minlength=N) + R1.lengths
    parts_rows, parts_cols, parts_vals = [], [], []
    for r0, r1 in _chunks(cost, _PAIR_BUDGET, N):
        sel = slice(R1.indptr[r0], R1.indptr[r1])
        pi = r1_rows[sel]  # pairs (i, c), c in R(i, k1)
        pc = R1.indices[sel]
        owner, at = _gather(R2, pc)
        e = R2.indices[at]
        ei = pi[owner]
        inside = np.bincount(owner, weights=_member(ei * N + e, r1_keys), minlength=pc.size)
        accept = 3 * inside > 2 * R2.lengths[pc]
        take = accept[owner]
        keys = np.unique(np.concatenate([pi * N + pc, ei[take] * N + e[take]]))
        i, j = keys // N, keys % N
        w = np.exp(-Dn[i, j])
        total = np.bincount(i - r0, weights=w, minlength=r1 - r0)
        parts_rows.append(i)
        parts_cols.append(j)
        parts_vals.append(w / total[i - r0])
    return _from_pairs(np.concatenate(parts_rows), np.concatenate(parts_cols), np.concatenate(parts_vals), N)


def _query_expansion(V: _Sparse, nbrs: np.ndarray) -> _Sparse:
    """Step 5: row i becomes the mean of the rows nbrs[i, :] (sparse sum, coalesced per column)."""
    N, k = nbrs.shape
    cost = V.lengths[nbrs].sum(axis=1)
    parts_rows, parts_cols, parts_vals = [], [], []
    for r0, r1 in _chunks(cost, _PAIR_BUDGET, N):
        src = nbrs[r0:r1].ravel()
        owner, at = _gather(V, src)
        i = r0 + owner // k
        keys = i * N + V.indices[at]
        uniq, inv = np.unique(keys, return_inverse=True)
        parts_rows.append(uniq // N)
        parts_cols.append(uniq % N)
        parts_vals.append(np.bincount(inv.reshape(-1), weights=V.values[at]) / k)
    return _from_pairs(np.concatenate(parts_rows), np.concatenate(parts_cols), np.concatenate(parts_vals), N)


def _jaccard(V: _Sparse, Q: int) -> np.ndarray:
    """Step 6 for query rows 0..Q-1 against gallery rows Q..N-1, through an inverted (column) index."""
    N = V.indptr.size - 1
    G = N - Q
    row_sum = np.bincount(np.repeat(np.arange(N), V.lengths), weights=V.values, minlength=N)
    # inverted index of the gallery rows: for column c, the gallery rows holding it and their values
    g_start = int(V.indptr[Q])
    g_rows = np.repeat(np.arange(G, dtype=np.int64), V.lengths[Q:])
    g_cols = V.indices[g_start:]
    by_col = np.argsort(g_cols, kind="stable")
    inv = _from_pairs(g_cols[by_col], g_rows[by_col], V.values[g_start:][by_col], N)
    q_entries = int(V.indptr[Q])
    q_rows = np.repeat(np.arange(Q, dtype=np.int64), V.lengths[:Q])
    cost = np.bincount(q_rows, weights=inv.lengths[V.indices[:q_entries]], minlength=Q) + G
    out = np.empty((Q, G))
    for r0, r1 in _chunks(cost, _PAIR_BUDGET, 256):
        sel = slice(V.indptr[r0], V.indptr[r1])
        owner, at = _gather(inv, V.indices[sel])
        contrib = np.minimum(V.values[sel][owner], inv.values[at])
        flat = (q_rows[sel][owner] - r0) * G + inv.indices[at]
        smin = np.bincount(flat, weights=contrib, minlength=(r1 - r0) * G).reshape(r1 - r0, G)
        smax = row_sum[r0:r1, None] + row_sum[None, Q:] - smin  # min + max = a + b, summed over columns
        out[r0:r1] = 1.0 - np.divide(smin, smax, out=np.zeros_like(smin), where=smax > 0)
    return out


# ----------------------------------------------------------------------------------------------------------
# plots


def _figure(what: str):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            f"{what} needs matplotlib, which is not installed: pip install 'qaconv-gs[plot]'"
        ) from None
    fig = Figure(figsize=(6.0, 4.5), dpi=110)
    FigureCanvasAgg(fig)  # the Agg canvas directly: pyplot's global backend is left alone
    return fig


def _labelled(results: object, cls: type, name: str) -> list[tuple[str | None, object]]:
    if isinstance(results, cls):
        return [(None, results)]
    if isinstance(results, Mapping) and results:
        for label, r in results.items():
            if not isinstance(r, cls):
                raise TypeError(
                    f"{name}: value for {label!r} is a {type(r).__name__}, expected {cls.__name__}"
                )
        return [(str(k), v) for k, v in results.items()]
    raise TypeError(
        f"{name}: expected a {cls.__name__} or a non-empty {{label: {cls.__name__}}} dict, "
        f"got {type(results).__name__}"
    )


def plot_cmc(
    result_or_dict, path: str | os.PathLike, *, max_rank: int | None = None, title: str | None = None
) -> str:
    """Write a PNG of CMC curves (rank 1..max_rank, in %) to ``path`` and return the path.

    Args:
        result_or_dict: a :class:`RankingResult` or {label: RankingResult} (one curve each).
        path: output file (.png).
        max_rank: last rank drawn (default: the longest CMC).
        title: figure title.
    """
    items = _labelled(result_or_dict, RankingResult, "result_or_dict")
    longest = max(int(r.cmc.shape[0]) for _, r in items)
    last = longest if max_rank is None else check_int(max_rank, "max_rank", 1)
    fig = _figure("plot_cmc")
    ax = fig.subplots()
    for label, r in items:
        n = min(last, r.cmc.shape[0])
        text = f"R1 {100 * r.cmc[0]:.1f}%" + ("" if math.isnan(r.mAP) else f", mAP {100 * r.mAP:.1f}%")
        ax.plot(
            np.arange(1, n + 1),
            100 * r.cmc[:n],
            marker="." if n <= 50 else None,
            label=text if label is None else f"{label} ({text})",
        )
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_xlim(1, max(last, 2))
    ax.grid(True, alpha=0.3)
    return _save(fig, ax, title, path)


def plot_roc(
    result_or_dict, path: str | os.PathLike, *, log_far: bool = True, title: str | None = None
) -> str:
    """Write a PNG of ROC curves (TAR vs FAR) to ``path`` and return the path.

    Args:
        result_or_dict: a :class:`VerificationResult` or {label: VerificationResult}.
        path: output file (.png).
        log_far: logarithmic FAR axis (the usual face-verification view; FAR = 0 points are not drawn).
        title: figure title.
    """
    items = _labelled(result_or_dict, VerificationResult, "result_or_dict")
    fig = _figure("plot_roc")
    ax = fig.subplots()
    lo = 1.0
    for label, r in items:
        fpr, tpr = r.fpr, r.tpr
        if log_far:
            keep = fpr > 0
            fpr, tpr = fpr[keep], tpr[keep]
            if fpr.size:
                lo = min(lo, float(fpr.min()))
        text = f"AUC {r.auc:.4f}, EER {100 * r.eer:.2f}%"
        ax.plot(fpr, tpr, label=text if label is None else f"{label} ({text})")
    if log_far:
        ax.set_xscale("log")
        ax.set_xlim(10 ** math.floor(math.log10(lo)) if lo < 1 else 1e-3, 1.0)
    else:
        ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.grid(True, alpha=0.3, which="both")
    return _save(fig, ax, title, path)


def _save(fig, ax, title: str | None, path: str | os.PathLike) -> str:
    """Legend, optional title, PNG to `path`; returns the path as a string."""
    ax.legend(loc="lower right", fontsize="small")
    if title:
        ax.set_title(title)
    out = os.fspath(path)
    fig.savefig(out, format="png")
    return out
