"""Sharded class neighbours: each rank holds a contiguous slice of the class table and gets the top-k
of its own rows, equal (indices and similarity bits) to the single-process `class_neighbors`.

Work: the N x N similarity triangle is cut into R diagonal blocks and R(R-1)/2 cross blocks (rank
pairs); every block is computed exactly once, so the total is the single process's N^2 D / 2
multiply-adds, and every rank does about 1/R of it:
- its own diagonal block with the symmetric kernel (`_native.neighbors_topk`, k_sub = min(k, n_r - 1));
- the cross block {r, r + t} for t = 1 .. ceil(R/2) - 1 with the cross kernel
  (`_native.neighbors_cross_topk`: slice x slice only, never a slice with itself);
- for even R, the distance-R/2 pair {p, q = p + R/2} (p < R/2) is split by rows of p's slice: rank p
  computes the first n_p // 2 rows of its slice against q's slice, rank q the remaining rows (so with
  R = 2 both ranks do half of the cross block).

Schedule (T = floor(R / 2) rounds): in round t the slices move one step round the ring (each rank sends
the slice it holds to rank - 1 and receives from rank + 1, so it then holds the slice of rank + t); the
rank computes its share of the pair {r, r + t}, and the lists of the visiting slice's rows go straight
back to their owner (one exchange per round: to rank + t, from rank - t). Each rank folds every list of
its own rows (diagonal, own cross blocks, lists sent back) into a running top-k (a per-row sort of
the two lists; no class appears in two lists of a row, so unlike `merge_topk` nothing is deduplicated);
every list of a round covers all of the rank's rows with one width (in the split round the rank's own
half and the half sent back by its partner are stacked), so the running lists keep one width.

Memory per rank: own slice + one visiting slice (n_r * D * 4 bytes each) + O(n_r * k) lists and the
kernels' block scratch; nothing n x n, no stacked table. Data moved per refresh: floor(R/2) slices
and as many list exchanges per rank.

Exactness: the kernels' similarity of two rows depends only on those two rows (row norms and
power-of-two prescales are per row; the dot product is summed in float32 over fixed 256-column panels,
then over the panels, in column order, whatever the rows' positions or which side of a cross block
they are on), so every similarity has exactly the bits the single-process kernel gives it; the cross
kernel records global ids, and the merge uses the same order (similarity desc, lower class id first).
"""

from __future__ import annotations

import numpy as np

from .. import _native
from .._validate import as_float32, check_int, resolve_threads, shape_str
from .comm import Communicator, SingleProcessCommunicator
from .layout import ShardLayout

__all__ = ["merge_topk", "ring_pairs_per_rank", "sharded_class_neighbors"]


def merge_topk(
    idx_parts: list[np.ndarray], sim_parts: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge candidate lists of the same n rows into the top-k per row.

    idx_parts[i] int64 [n, k_i] (global class ids), sim_parts[i] float32 [n, k_i]. A class listed several
    times for a row keeps its largest similarity. Order: decreasing similarity, ties to the lower id.
    Returns width m = min(k, fewest distinct candidates of a row) (k when every row has enough).
    """
    ids_ = np.concatenate([np.asarray(p, dtype=np.int64) for p in idx_parts], axis=1)
    S = np.concatenate([np.asarray(p, dtype=np.float32) for p in sim_parts], axis=1)
    n, width = ids_.shape
    if n == 0:
        return np.empty((0, k), np.int64), np.empty((0, k), np.float32)
    rows = np.repeat(np.arange(n, dtype=np.int64), width)
    ids_, S = ids_.reshape(-1), S.reshape(-1)
    # 1) one entry per (row, id), keeping the largest similarity
    o = np.lexsort((-S, ids_, rows))
    rows, ids_, S = rows[o], ids_[o], S[o]
    first = np.ones(rows.size, dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (ids_[1:] != ids_[:-1])
    rows, ids_, S = rows[first], ids_[first], S[first]
    # 2) per row by decreasing similarity, ties to the lower id (as the C kernel)
    o = np.lexsort((ids_, -S, rows))
    rows, ids_, S = rows[o], ids_[o], S[o]
    start = np.searchsorted(rows, np.arange(n, dtype=np.int64), side="left")
    count = np.diff(np.append(start, rows.size))
    m = int(min(k, int(count.min())))
    take = start[:, None] + np.arange(m, dtype=np.int64)[None, :]
    return ids_[take], S[take]


def _diag_topk(rows: np.ndarray, start: int, k: int, nt: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of a slice within itself (symmetric kernel) -> (idx [n, min(k, n - 1)] global ids, sim)."""
    idx, sim = _native.neighbors_topk(rows, min(k, rows.shape[0] - 1), nt, True)
    idx += start
    return idx, sim


def _cross_topk(
    a_rows: np.ndarray, a_start: int, b_rows: np.ndarray, b_start: int, k: int, nt: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cross block of two disjoint slices -> (idx_a [na, min(k, nb)], sim_a, idx_b [nb, min(k, na)],
    sim_b), global ids; an empty side gives empty lists (width 0 for the other side)."""
    na, nb = a_rows.shape[0], b_rows.shape[0]
    if na == 0 or nb == 0:
        return (
            np.empty((na, min(k, nb)), np.int64),
            np.empty((na, min(k, nb)), np.float32),
            np.empty((nb, min(k, na)), np.int64),
            np.empty((nb, min(k, na)), np.float32),
        )
    return _native.neighbors_cross_topk(a_rows, b_rows, a_start, b_start, k, nt, True)


def ring_pairs_per_rank(layout: ShardLayout) -> list[int]:
    """Similarities (row pairs) each rank computes in `sharded_class_neighbors` under `layout`.

    Their sum is N (N - 1) / 2, the single process's count: every pair is computed once.
    """
    R = layout.world_size
    n = [layout.size_of(q) for q in range(R)]
    work = [m * (m - 1) // 2 for m in n]
    for r in range(R):
        for t in range(1, R // 2 + 1):
            s = (r + t) % R
            if 2 * t != R:
                work[r] += n[r] * n[s]
            elif r < s:
                work[r] += (n[r] // 2) * n[s]
            else:
                work[r] += (n[s] - n[s] // 2) * n[r]
    return work


def sharded_class_neighbors(
    E_local: object,
    k: int,
    comm: Communicator | None = None,
    *,
    layout: ShardLayout | None = None,
    return_similarity: bool = False,
    n_threads: int | None = None,
):
    """k nearest other classes of this rank's classes, by cosine similarity over the whole sharded table.

    Collective: every rank calls it with its slice.

    Args:
        E_local: [n_r, C, H, W] or [n_r, D] this rank's class embeddings, rows layout.range(rank).
        k: neighbours per class, 1 <= k <= N - 1 (N = total classes).
        comm: communicator (default: single process, then this is class_neighbors).
        layout: the class split; default ShardLayout.even(N, R), which must match every rank's n_r.
        return_similarity: also return the float32 similarities.
        n_threads: threads for the C kernel (None: OpenMP default). Results identical for any value.

    Returns:
        idx [n_r, k] int64 global class ids (or (idx, sim [n_r, k] float32)), exactly the rows
        layout.range(rank) of class_neighbors(full table, k).
    """
    comm = SingleProcessCommunicator() if comm is None else comm
    # This rank's own checks first, agreed on before any exchange: a NaN shard or a bad argument on one
    # rank raises on every rank instead of leaving the others inside a half-done collective.
    err: BaseException | None = None
    try:
        arr = as_float32(E_local, "E_local", (2, 4), check_finite=True, allow_empty=True)
        k = check_int(k, "k")
        if not isinstance(return_similarity, (bool, np.bool_)):
            raise TypeError(f"return_similarity: expected a bool, got {type(return_similarity).__name__}")
        nt = resolve_threads(n_threads)
    except (TypeError, ValueError) as exc:
        err = exc
    comm.agree(err)
    flat = arr.reshape(arr.shape[0], int(np.prod(arr.shape[1:], dtype=np.int64)))
    n_r, D = int(flat.shape[0]), int(flat.shape[1])
    dims = comm.allgather(np.array([n_r, D, k], dtype=np.int64))
    sizes = [int(d[0]) for d in dims]
    if any(int(d[1]) != D for d in dims):
        raise ValueError(f"E_local: ranks disagree on the embedding size D: {[int(d[1]) for d in dims]}")
    if any(int(d[2]) != k for d in dims):
        raise ValueError(f"k: every rank must pass the same k; ranks passed {[int(d[2]) for d in dims]}")
    N = int(sum(sizes))
    if layout is None:
        layout = ShardLayout.even(N, comm.size)
    if layout.world_size != comm.size or layout.num_classes != N:
        raise ValueError(
            f"layout: expected {comm.size} ranks and {N} classes, got {layout.world_size} and "
            f"{layout.num_classes}"
        )
    if [layout.size_of(r) for r in range(comm.size)] != sizes:
        raise ValueError(f"E_local: rows per rank {sizes} do not match the layout {list(layout.bounds)}")
    if N < 2:
        raise ValueError(f"E_local: class_neighbors needs at least 2 classes in total, got {N}")
    if not 1 <= k <= N - 1:
        raise ValueError(f"k: expected an integer in [1, {N - 1}] (N-1 other classes), got {k}")
    R, r = comm.size, comm.rank
    lo_r = layout.range(r)[0]

    if R == 1:
        idx, sim = _native.neighbors_topk(flat, k, nt, True)
        return (idx, sim) if return_similarity else idx

    best_i = np.empty((n_r, 0), np.int64)
    best_s = np.empty((n_r, 0), np.float32)
    if n_r >= 2:
        best_i, best_s = _diag_topk(flat, lo_r, k, nt)
    held = flat
    for t in range(1, R // 2 + 1):
        # ring step: afterwards this rank holds the slice of rank r + t
        held = comm.sendrecv(held, dest=(r - 1) % R, source=(r + 1) % R)
        s = (r + t) % R
        lo_s, n_s = layout.range(s)[0], layout.size_of(s)
        if held.ndim != 2 or held.shape[0] != n_s:
            raise RuntimeError(f"ring: expected rank {s}'s slice, got shape {shape_str(held.shape)}")
        if 2 * t != R:  # the whole pair {r, s}; the lists of s's rows go back to s
            mine_i, mine_s, back_i, back_s = _cross_topk(flat, lo_r, held, lo_s, k, nt)
        elif r < s:  # split pair, this rank the lower one: the first half of its rows against s
            h = n_r // 2
            mine_i, mine_s, back_i, back_s = _cross_topk(flat[:h], lo_r, held, lo_s, k, nt)
        else:  # split pair, this rank the upper one: the second half of s's rows against this slice
            h = n_s // 2
            back_i, back_s, mine_i, mine_s = _cross_topk(held[h:], lo_s + h, flat, lo_r, k, nt)
        # the visiting slice's lists go home; this rank's lists computed by rank r - t arrive
        got_i = comm.sendrecv(back_i, dest=s, source=(r - t) % R)
        got_s = comm.sendrecv(back_s, dest=s, source=(r - t) % R)
        if 2 * t == R and r < s:  # own first half (computed here) + second half (computed by s)
            mine_i, mine_s = np.concatenate([mine_i, got_i]), np.concatenate([mine_s, got_s])
        elif got_i.size:
            best_i, best_s = _fold(best_i, best_s, got_i, got_s, k)
        if mine_i.size:
            best_i, best_s = _fold(best_i, best_s, mine_i, mine_s, k)
    if n_r == 0:  # a rank without classes (N < R)
        best_i, best_s = np.empty((0, k), np.int64), np.empty((0, k), np.float32)
    if best_i.shape[1] != k:  # pragma: no cover - the schedule covers every rank pair
        raise RuntimeError(f"sharded_class_neighbors: rank {r} collected {best_i.shape[1]} of {k} neighbours")
    return (best_i, best_s) if return_similarity else best_i


def _fold(
    best_i: np.ndarray, best_s: np.ndarray, new_i: np.ndarray, new_s: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Running top-k: keep at most k per row, ordered as the C kernels (similarity desc, id asc).

    The ring computes every pair once, so a class never appears in two lists of one row: no
    deduplication is needed (merge_topk's general merge does it, ~10x slower: a lexsort over all rows'
    entries with a row key). Every list folded in covers all the rank's rows with one width, so the
    rows always hold the same number of candidates (fewer than k only while the lists so far list
    fewer than k classes).
    """
    if best_i.shape[0] == 0:
        return best_i, best_s
    if best_i.shape[1] == 0:
        return new_i, new_s
    ids = np.concatenate([best_i, new_i], axis=1)
    sims = np.concatenate([best_s, new_s], axis=1)
    order = np.lexsort((ids, -sims), axis=1)[:, :k]  # per row; the last key is the primary one
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1)
