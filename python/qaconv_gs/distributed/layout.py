"""How the class table is split over ranks: contiguous row ranges, sizes differing by at most one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ShardLayout"]


@dataclass(frozen=True)
class ShardLayout:
    """Rank r owns class rows [bounds[r], bounds[r+1]); the first N % R ranks own one row more.

    Attributes:
        num_classes: N.
        world_size: R.
        bounds: int64 [R + 1], bounds[0] = 0, bounds[R] = N, non-decreasing.
    """

    num_classes: int
    world_size: int
    bounds: tuple[int, ...]

    @classmethod
    def even(cls, num_classes: int, world_size: int) -> ShardLayout:
        N, R = int(num_classes), int(world_size)
        if R < 1:
            raise ValueError(f"world_size: expected >= 1, got {R}")
        if N < 0:
            raise ValueError(f"num_classes: expected >= 0, got {N}")
        base, extra = divmod(N, R)
        sizes = [base + (1 if r < extra else 0) for r in range(R)]
        return cls(N, R, tuple(int(v) for v in np.concatenate([[0], np.cumsum(sizes)])))

    def range(self, rank: int) -> tuple[int, int]:
        """(lo, hi) of rank's rows."""
        return self.bounds[rank], self.bounds[rank + 1]

    def size_of(self, rank: int) -> int:
        lo, hi = self.range(rank)
        return hi - lo

    def owner(self, ids: object) -> np.ndarray:
        """Rank owning each class id (int64 array of ids' shape)."""
        b = np.asarray(self.bounds, dtype=np.int64)
        return np.searchsorted(b, np.asarray(ids, dtype=np.int64), side="right").astype(np.int64) - 1
