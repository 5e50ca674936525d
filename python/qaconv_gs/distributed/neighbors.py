"""Sharded class neighbours: each rank holds a contiguous slice of the class table and gets the top-k
of its own rows, equal (indices and similarity bits) to the single-process `class_neighbors`.

Schedule (R ranks, T = floor(R / 2) rounds). Every unordered rank pair {r, s} is computed once:
rank r computes {r, r + t} for t = 1 .. T, except that for even R the distance-R/2 pairs are computed
only by ranks r < R/2. In round t the slices move one step round the ring (each rank sends the slice it
holds to rank - 1 and receives from rank + 1, so it then holds the slice of rank + t): T slice exchanges
over neighbour links. The pair computation yields top-k lists for the rows of both slices; the lists of
the visiting slice go straight back to their owner (one exchange per round: to rank + t, from rank - t),
and each rank folds every list it gets into a running top-k of its own rows. Memory per rank:
own slice + one visiting slice + the pair's [2n, D] table + O(n * k) lists.

Block-pair kernel and exactness: a pair is computed by the package's C kernel on the two slices stacked
in global row order. The kernel's similarity of two rows depends only on those two rows (row norms and
power-of-two prescales are per row; the dot product is summed in float32 over fixed 256-column panels,
panels in double, in column order, whatever the row position), so every similarity has exactly the bits
the single-process kernel gives it, and the tie rule (lower class id first) is preserved because the
stacked table keeps the global order. The price: the kernel also recomputes the two diagonal blocks, so a
round costs (2n)^2 / 2 similarities instead of the n^2 cross block (total work 2x the single process;
with R = 2 rank 1 computes nothing). A cross-block C kernel (A x B only, same panel arithmetic) removes
that waste without changing a bit; see the report / README "Scaling".
"""

from __future__ import annotations

import numpy as np

from .. import _native
from .._validate import as_float32, check_int, resolve_threads, shape_str
from .comm import Communicator, SingleProcessCommunicator
from .layout import ShardLayout

__all__ = ["sharded_class_neighbors", "merge_topk"]


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


def _pair_topk(
    lo_rows: np.ndarray, lo_start: int, hi_rows: np.ndarray, hi_start: int, k: int, nt: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over the union of two slices (stacked in global order) -> (idx [n_lo + n_hi, k'], sim),
    global ids, k' = min(k, n_lo + n_hi - 1)."""
    n_lo = lo_rows.shape[0]
    table = np.concatenate([lo_rows, hi_rows], axis=0)
    k_sub = min(k, table.shape[0] - 1)
    idx, sim = _native.neighbors_topk(table, k_sub, nt, True)
    glob = np.where(idx < n_lo, idx + lo_start, idx - n_lo + hi_start)
    return glob.astype(np.int64), sim


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
    arr = as_float32(E_local, "E_local", (2, 4), check_finite=True, allow_empty=True)
    flat = arr.reshape(arr.shape[0], int(np.prod(arr.shape[1:], dtype=np.int64)))
    n_r, D = int(flat.shape[0]), int(flat.shape[1])
    dims = comm.allgather(np.array([n_r, D], dtype=np.int64))
    sizes = [int(d[0]) for d in dims]
    if any(int(d[1]) != D for d in dims):
        raise ValueError(f"E_local: ranks disagree on the embedding size D: {[int(d[1]) for d in dims]}")
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
    k = check_int(k, "k")
    if not 1 <= k <= N - 1:
        raise ValueError(f"k: expected an integer in [1, {N - 1}] (N-1 other classes), got {k}")
    if not isinstance(return_similarity, (bool, np.bool_)):
        raise TypeError(f"return_similarity: expected a bool, got {type(return_similarity).__name__}")
    nt = resolve_threads(n_threads)
    R, r = comm.size, comm.rank
    lo_r = layout.range(r)[0]

    if R == 1:
        idx, sim = _native.neighbors_topk(flat, k, nt, True)
        return (idx, sim) if return_similarity else idx

    best_i = np.empty((n_r, 0), np.int64)
    best_s = np.empty((n_r, 0), np.float32)
    held = flat
    for t in range(1, R // 2 + 1):
        # ring step: afterwards this rank holds the slice of rank r + t
        held = comm.sendrecv(held, dest=(r - 1) % R, source=(r + 1) % R)
        s = (r + t) % R
        computes = not (2 * t == R and r >= R // 2)
        back_i = np.empty((0, 0), np.int64)
        back_s = np.empty((0, 0), np.float32)
        if computes and n_r + held.shape[0] >= 2:
            if held.ndim != 2 or held.shape[0] != layout.size_of(s):
                raise RuntimeError(f"ring: expected rank {s}'s slice, got shape {shape_str(held.shape)}")
            lo_s = layout.range(s)[0]
            if r < s:
                gi, gs = _pair_topk(flat, lo_r, held, lo_s, k, nt)
                mine_i, mine_s, back_i, back_s = gi[:n_r], gs[:n_r], gi[n_r:], gs[n_r:]
            else:
                gi, gs = _pair_topk(held, lo_s, flat, lo_r, k, nt)
                n_s = held.shape[0]
                back_i, back_s, mine_i, mine_s = gi[:n_s], gs[:n_s], gi[n_s:], gs[n_s:]
            best_i, best_s = _fold(best_i, best_s, mine_i, mine_s, k)
        # the visiting slice's lists go home; this rank's lists computed by rank r - t arrive
        got_i = comm.sendrecv(back_i, dest=s, source=(r - t) % R)
        got_s = comm.sendrecv(back_s, dest=s, source=(r - t) % R)
        if got_i.size:
            best_i, best_s = _fold(best_i, best_s, got_i, got_s, k)
    if n_r == 0:  # a rank without classes (N < R)
        best_i, best_s = np.empty((0, k), np.int64), np.empty((0, k), np.float32)
    if best_i.shape[1] != k:  # pragma: no cover - the schedule covers every rank pair
        raise RuntimeError(f"sharded_class_neighbors: rank {r} collected {best_i.shape[1]} of {k} neighbours")
    return (best_i, best_s) if return_similarity else best_i


def _fold(
    best_i: np.ndarray, best_s: np.ndarray, new_i: np.ndarray, new_s: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Running top-k: keep at most k per row. Rows of one slice see the same calls, so while a call
    lists every class of its union they all hold the same number (< k) of distinct candidates."""
    if best_i.shape[0] == 0:
        return best_i, best_s
    return merge_topk([best_i, new_i], [best_s, new_s], k)
