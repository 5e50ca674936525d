"""Retrieval over large galleries in two stages: a cheap pooled-cosine shortlist, then exact QAConv scores.

Scoring every probe x gallery pair with QAConv (``qaconv_gs.match``) is exact but costs O(P*G*C*S^2) and
O(P*G) memory. ``two_stage_search`` keeps the exact scores where they matter:

1. Stage 1 (O(G*C*S + P*G*D)): every map is location-normalised (as QAConv sees it), averaged over each
   cell of a grid x grid partition of its locations and L2-normalised into a descriptor of D = C*grid^2
   values (grid = 1: the global average, [C]); the R gallery items of highest cosine with each probe are
   kept (the package's exact cross-block kNN kernel, or faiss ``IndexFlatIP``).
2. Stage 2 (O(P*R*C*S^2)): the R survivors of each probe get their exact eval-mode QAConv scores, bit for
   bit those of ``qaconv_gs.match`` for the same pair, and the best ``top`` of them are returned.

The search is exact whenever every exhaustive top-``top`` item is among the probe's R survivors (always
when R = G); ``benchmarks/bench_search.py`` measures how often that holds as R varies.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import _native
from ._validate import as_float32, check_int, resolve_threads, shape_str
from .evaluate import _numpy, head_fc_kind
from .head import head_eval_affine
from .matching import MAX_LOCATIONS
from .neighbors import _check_finite_rows, _cross_class_neighbors

__all__ = ["SearchResult", "two_stage_search"]

# Survivors of stage 1 per probe when `candidates` is None; chosen from benchmarks/bench_search.py (see
# two_stage_search's docstring for the measurement behind it).
DEFAULT_CANDIDATES = 50
DEFAULT_GRID = 4  # stage-1 descriptor cells per side when `grid` is None (same measurement)
_STAGE2_BUDGET = 64 << 20  # bytes of stage-2 temporaries per probe block when `block` is None
_DESC_CHUNK_BYTES = 32 << 20  # maps normalised at a time for the descriptors: bounds the temporary copy
_STAGE1_LIST_BYTES = 64 << 20  # per gallery chunk: the kernel's gallery-side lists (unused) stay this small
# Stage-1 probes per kernel call (see _probe_group): all of them up to this R, else small groups
_STAGE1_ALL_PROBES_MAX_R = 128
_STAGE1_SMALL_GROUP = 8
_STAGE1_SMALL_GROUP_MAX_D = 256
_FIRST_STAGES = ("pooled", "faiss")


@dataclass(frozen=True)
class SearchResult:
    """The result of ``two_stage_search``.

    Attributes:
        ids: [P, T] int64 gallery indices, best first (T = min(top, G)).
        scores: [P, T] float32 exact eval-mode QAConv scores of those pairs (as ``qaconv_gs.match`` gives).
        candidates: R, the stage-1 survivors per probe that were scored exactly.
    """

    ids: np.ndarray
    scores: np.ndarray
    candidates: int


def _cell_matrix(H: int, W: int, grid: int) -> np.ndarray:
    """[S, grid*grid] float64: column j averages the locations of cell j of a grid x grid partition of the
    H x W locations (location (h, w) is in cell (h*grid // H, w*grid // W): cells as even as possible)."""
    cell = ((np.arange(H) * grid // H)[:, None] * grid + (np.arange(W) * grid // W)[None, :]).reshape(-1)
    M = np.zeros((H * W, grid * grid))
    M[np.arange(H * W), cell] = 1.0
    return M / M.sum(axis=0, keepdims=True)


def _pooled_descriptors(maps: np.ndarray, nt: int, grid: int = 1) -> np.ndarray:
    """maps [n, C, H, W] float32 -> [n, C*grid*grid] float32 unit descriptors: the location-normalised map
    averaged over each cell of a grid x grid partition of the locations (grid=1: over all locations),
    flattened and L2-normalised (a zero map gives a zero descriptor, cosine 0 to everything).

    Maps are normalised in chunks so the extra memory is O(chunk) rather than a second copy of the gallery.
    """
    n, C, H, W = maps.shape
    S = H * W
    flat = maps.reshape(n, C, S)
    # float32 cell means (BLAS; ~5x faster than a float64 product at G = 10^5, error ~1e-7, far below the
    # cosine gaps stage 1 ranks by), norms summed in float64
    M = _cell_matrix(H, W, grid).astype(np.float32)
    out = np.empty((n, C * grid * grid), dtype=np.float32)
    rows = max(1, _DESC_CHUNK_BYTES // max(1, C * S * 4))
    for r0 in range(0, n, rows):
        y, _ = _native.norm_forward(flat[r0 : r0 + rows], nt)
        d = np.matmul(y, M).reshape(y.shape[0], -1)
        nrm = np.sqrt(np.einsum("nd,nd->n", d, d, dtype=np.float64))
        out[r0 : r0 + rows] = d / np.maximum(nrm, 1e-12).astype(np.float32)[:, None]
    return out


def _probe_group(P: int, R: int, D: int) -> int:
    """Probes per kernel call in stage 1 (P probes, R neighbours, descriptors of D values).

    The cross-block kernel also keeps, for every gallery row, a sorted list of its best min(R, group)
    probes, which is not needed here and costs O(list length) per insertion, while each call streams the
    whole gallery once. Measured at G = 10^5, P = 500, 2 threads (seconds):

        R = 100, D = 32:   one call 0.8, groups of 8: 1.0, of 64: 2.5
        R = 200, D = 128:  one call 2.3, groups of 8: 1.7
        R = 200, D = 512:  one call 2.2, groups of 8: 3.7, of 32: 2.6
        R = 500, D = 32:   one call 7.3, groups of 8: 1.3
        R = 500, D = 512:  one call 7.6, groups of 8: 4.0, of 64: 3.4

    so one call up to R = 128, then groups of 8 for short descriptors and of 32 for long ones."""
    if R <= _STAGE1_ALL_PROBES_MAX_R:
        return P
    return min(P, _STAGE1_SMALL_GROUP if D <= _STAGE1_SMALL_GROUP_MAX_D else 4 * _STAGE1_SMALL_GROUP)


def _first_stage_pooled(dp: np.ndarray, dg: np.ndarray, R: int, nt: int) -> np.ndarray:
    """Top-R gallery rows of each probe by descriptor cosine -> [P, R] int64, ties to the lower index.

    Probes go through in groups (_probe_group) and the gallery in chunks that bound the kernel's unused
    gallery-side lists to _STAGE1_LIST_BYTES. A pair's similarity does not depend on the grouping (the
    kernel gives each pair fixed bits), so neither does the result.
    """
    P, G = dp.shape[0], dg.shape[0]
    group = _probe_group(P, R, dp.shape[1])
    chunk = max(R, _STAGE1_LIST_BYTES // (12 * min(R, group)))
    best_ids = best_sim = None
    for g0 in range(0, G, chunk):
        part = dg[g0 : g0 + chunk]
        m = min(R, part.shape[0])
        ids = np.empty((P, m), dtype=np.int64)
        sim = np.empty((P, m), dtype=np.float32)
        for p0 in range(0, P, group):
            q = dp[p0 : p0 + group]
            # probe ids [0, n), gallery ids from n on: the kernel needs disjoint id ranges
            ia, sa, _, _ = _cross_class_neighbors(q, part, R, 0, q.shape[0], True, nt)
            ids[p0 : p0 + q.shape[0]] = ia - q.shape[0] + g0
            sim[p0 : p0 + q.shape[0]] = sa
        if best_ids is None:
            best_ids, best_sim = ids, sim
            continue
        ids = np.concatenate([best_ids, ids], axis=1)
        sim = np.concatenate([best_sim, sim], axis=1)
        # earlier chunks hold lower gallery ids and each list is sorted (ties to the lower id), so a
        # stable sort on the similarity alone keeps ties on the lower id
        order = np.argsort(-sim, axis=1, kind="stable")[:, :R]
        best_ids = np.take_along_axis(ids, order, axis=1)
        best_sim = np.take_along_axis(sim, order, axis=1)
    return best_ids


def _first_stage_faiss(dp: np.ndarray, dg: np.ndarray, R: int) -> np.ndarray:
    """Top-R by inner product of the unit descriptors with faiss IndexFlatIP -> [P, R] int64.
    faiss's order among exactly tied similarities is its own."""
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "first_stage='faiss' needs the faiss package (pip install faiss-cpu); "
            "first_stage='pooled' needs nothing extra"
        ) from None
    index = faiss.IndexFlatIP(dg.shape[1])
    index.add(np.ascontiguousarray(dg))
    _, idx = index.search(np.ascontiguousarray(dp), R)
    return np.ascontiguousarray(idx, dtype=np.int64)


def _pair_scores(mp: np.ndarray, mg: np.ndarray, w64: np.ndarray, bias32: float) -> np.ndarray:
    """mp, mg [B, R, S] float32 maxima -> [B, R] float32 eval scores, summed exactly as the C kernel of
    match_scores does (double products, accumulated in index order mp then mg, then the float32 bias), so
    each score has the bits ``qaconv_gs.match`` gives the same pair."""
    S = mp.shape[2]
    prod = np.empty(mp.shape[:2] + (2 * S,), dtype=np.float64)
    np.multiply(mp, w64[:S], out=prod[..., :S])
    np.multiply(mg, w64[S:], out=prod[..., S:])
    # accumulate is a running sum: the same order of additions as the kernel's loop (a matmul is not)
    np.add.accumulate(prod, axis=2, out=prod)
    return (prod[..., -1] + bias32).astype(np.float32)


def _auto_block(P: int, R: int, C: int, S: int) -> int:
    """Probes per stage-2 block for about _STAGE2_BUDGET bytes of temporaries."""
    # per probe: R gathered + R normalised maps, the maxima mp and mg, their float64 products
    per_probe = R * (8 * C * S + 8 * S + 16 * S)
    return int(min(P, max(1, _STAGE2_BUDGET // per_probe)))


def _second_stage(
    pf: np.ndarray,
    gf: np.ndarray,
    cand: np.ndarray,
    w: np.ndarray,
    bias: float,
    top: int,
    block: int,
    nt: int,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of each probe's candidates and its best `top` of them.

    pf [P, C, S], gf [G, C, S] raw maps; cand [P, R] int64 gallery rows (distinct within a row); (w [2S],
    bias) the eval affine. -> (ids [P, top] int64, scores [P, top] float32), best first, ties to the lower
    gallery index. Per block of probes only the distinct gallery maps it needs are copied and normalised:
    memory O(P*top + block*R*C*S), never P x G.
    """
    P, R = cand.shape
    S = pf.shape[2]
    w64 = w.astype(np.float64)
    bias32 = float(np.float32(bias))  # the kernel takes the bias as float32
    ids = np.empty((P, top), dtype=np.int64)
    scores = np.empty((P, top), dtype=np.float32)
    t0 = last = time.perf_counter()
    for b0 in range(0, P, block):
        b1 = min(P, b0 + block)
        rows, local = np.unique(cand[b0:b1], return_inverse=True)
        local = np.ascontiguousarray(local.reshape(b1 - b0, R), dtype=np.int64)
        gn, _ = _native.norm_forward(np.ascontiguousarray(gf[rows]), nt)
        pn, _ = _native.norm_forward(pf[b0:b1], nt)
        mp, mg = _native.match_maxima_restricted(pn, gn, local, False, nt)
        sc = _pair_scores(mp.reshape(b1 - b0, R, S), mg.reshape(b1 - b0, R, S), w64, bias32)
        c = cand[b0:b1]
        order = np.lexsort((c, -sc), axis=1)[:, :top]  # score descending, then the lower gallery index
        ids[b0:b1] = np.take_along_axis(c, order, axis=1)
        scores[b0:b1] = np.take_along_axis(sc, order, axis=1)
        now = time.perf_counter()
        if progress and (now - last >= 1.0 or b1 == P):
            last = now
            print(f"two_stage_search: scored {b1}/{P} probes ({now - t0:.1f} s)", file=sys.stderr, flush=True)
    return ids, scores


def _maps(x: object, name: str) -> np.ndarray:
    """[n, C, H, W] float32 C-contiguous maps, finiteness checked in row chunks (no gallery-sized mask)."""
    a = as_float32(x, name, 4, check_finite=False)
    S = a.shape[2] * a.shape[3]
    if S > MAX_LOCATIONS:
        raise ValueError(f"{name}: at most {MAX_LOCATIONS} locations (H*W) are supported, got H*W = {S}")
    _check_finite_rows(a, x if isinstance(x, np.ndarray) else None, name)
    return a


def _head_affine(head_state: object, S: int) -> tuple[np.ndarray, float]:
    if not isinstance(head_state, Mapping):
        raise TypeError(f"head_state: expected a mapping of head parameters, got {type(head_state).__name__}")
    fc = head_fc_kind(head_state, S)
    state = {key: np.asarray(_numpy(v)) for key, v in head_state.items()}
    w, b = head_eval_affine(state, S, fc)
    return np.ascontiguousarray(w, dtype=np.float32), float(b)


def two_stage_search(
    probe,
    gallery,
    head_state: Mapping[str, object],
    *,
    top: int = 10,
    candidates: int | None = None,
    grid: int | None = None,
    block: int | None = None,
    n_threads: int | None = None,
    first_stage: str = "pooled",
    progress: bool = False,
) -> SearchResult:
    """Best gallery maps of each probe by eval-mode QAConv score, without scoring every pair.

    Stage 1 shortlists, for each probe, the R gallery maps whose pooled descriptors (location-normalised
    map averaged over grid x grid cells of its locations, L2-normalised, D = C*grid*grid values) have the
    highest cosine with the probe's; stage 2 scores those R pairs exactly, with the head's eval affine as
    ``qaconv_gs.match`` (each score has the same float32 bits as that pair's entry of
    ``match(probe, gallery, head_state)``), and keeps the best ``top``. With R = G the result is the
    exhaustive top-``top`` of ``match``, ties included. Memory is O((P + G)*D + P*R + block*R*C*S) beyond
    the inputs; the P x G QAConv score matrix is never formed.

    Defaults (``benchmarks/bench_search.py``: 500 probe glyphs of held-out font families against galleries
    of 10^3, 10^4 and 10^5 Hangul glyphs, 32 x 8 x 8 maps of an untrained CNN, default-initialised head,
    2 threads): grid = 4 and R = 50 kept 99 %, 102 % and 108 % of the exhaustive rank-1 accuracy at 8x,
    26x and 47x less time than exhaustive scoring. The global average (grid = 1) kept 90 %, 59 % and 33 %
    at R = 50: it throws away the layout QAConv matches on. The shortlist is exact for its descriptor, not
    for QAConv: of the probes whose exhaustive top 1 was right, 92-93 % got that same top 1 at R = 50 and
    95-99 % at R = 200 (7x and 15x less time at G = 10^4 and 10^5); raise R where agreement with the
    exhaustive ranking matters more than time (R = G reproduces it).

    Args:
        probe: [P, C, H, W] feature maps (any real dtype / layout; not modified).
        gallery: [G, C, H, W] feature maps with the same C, H, W. float32 C-contiguous input is used in
            place (no copy of a large gallery).
        head_state: the head's state dict, as for ``qaconv_gs.match`` (bn.*, fc.*, logit_bn.* as NumPy
            arrays or torch tensors; fc="separate" or "shared" read off fc.weight's size).
        top: results per probe, >= 1; a value above G returns G columns.
        candidates: R, stage-1 survivors per probe, >= 1 and >= ``top``; clamped to G. None:
            DEFAULT_CANDIDATES = 50, raised to ``top`` if that is larger.
        grid: cells per side of the stage-1 descriptor, 1 <= grid <= min(H, W): the location-normalised
            map is averaged over each cell of a grid x grid partition of the locations ([C*grid*grid]);
            1 is the global average ([C]). None: DEFAULT_GRID = 4 (or min(H, W) if smaller).
        block: probes scored together in stage 2 (memory O(block*R*C*S)); None sizes it for about 64 MiB
            of temporaries. Results are identical for any value.
        n_threads: None for OpenMP's default, else >= 1, for the package's kernels (the descriptors' small
            BLAS product follows the BLAS library's own thread setting). Results are identical for any value.
        first_stage: "pooled" (the package's exact kNN kernel; ties to the lower gallery index) or
            "faiss" (faiss.IndexFlatIP on the same descriptors; needs faiss installed).
        progress: print stage-2 progress to stderr about once a second.

    Returns:
        SearchResult(ids [P, T] int64, scores [P, T] float32, candidates R), T = min(top, G), best first,
        ties to the lower gallery index.

    Raises:
        TypeError / ValueError: invalid arguments (the message names the argument and the shapes).
        ImportError: first_stage="faiss" without faiss.
    """
    nt = resolve_threads(n_threads)
    p = _maps(probe, "probe")
    g = _maps(gallery, "gallery")
    if p.shape[1:] != g.shape[1:]:
        raise ValueError(
            f"gallery: expected maps of shape (C, H, W) = {shape_str(p.shape[1:])} like probe, "
            f"got {shape_str(g.shape[1:])}"
        )
    P, G, C = int(p.shape[0]), int(g.shape[0]), int(p.shape[1])
    S = int(p.shape[2] * p.shape[3])
    w, bias = _head_affine(head_state, S)
    top = min(check_int(top, "top", lo=1), G)
    if candidates is None:
        R = max(DEFAULT_CANDIDATES, top)
    else:
        R = check_int(candidates, "candidates", lo=1)
        if R < top:
            raise ValueError(
                f"candidates: expected at least top = {top} survivors per probe (top results are picked "
                f"from them), got {R}"
            )
    R = min(R, G)
    H, W = int(p.shape[2]), int(p.shape[3])
    grid = min(DEFAULT_GRID, H, W) if grid is None else check_int(grid, "grid", lo=1)
    if grid > min(H, W):
        raise ValueError(f"grid: expected at most min(H, W) = {min(H, W)} cells per side, got {grid}")
    if block is None:
        block = _auto_block(P, R, C, S)
    else:
        block = check_int(block, "block", lo=1)
    if not isinstance(first_stage, str) or first_stage not in _FIRST_STAGES:
        raise ValueError(f"first_stage: expected one of {_FIRST_STAGES}, got {first_stage!r}")
    if not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress: expected a bool, got {type(progress).__name__}")

    pf = p.reshape(P, C, S)
    gf = g.reshape(G, C, S)
    dp = _pooled_descriptors(p, nt, grid)
    dg = _pooled_descriptors(g, nt, grid)
    if first_stage == "faiss":
        cand = _first_stage_faiss(dp, dg, R)
    else:
        cand = _first_stage_pooled(dp, dg, R, nt)
    ids, scores = _second_stage(pf, gf, cand, w, bias, top, block, nt, bool(progress))
    return SearchResult(ids=ids, scores=scores, candidates=R)
