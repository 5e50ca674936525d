"""SIMD levels a test may run on (shared by conftest's `isa` fixture and the tests that loop over them)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from qaconv_gs import _native

LEVELS = ("portable", "avx2", "avx512")
# every SIMD path this CPU can run (the kernels pick theirs from the current level)
ISAS = LEVELS[: LEVELS.index(_native.best_isa()) + 1]


@contextlib.contextmanager
def at_isa(level: str) -> Iterator[str]:
    """Run the block on SIMD path `level`; the previous level is restored afterwards."""
    previous = _native.set_isa(level)
    try:
        yield level
    finally:
        _native.set_isa(previous)
