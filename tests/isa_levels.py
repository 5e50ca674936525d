"""SIMD levels a test may run on (shared by conftest's `isa` fixture and the tests that loop over them)."""

from __future__ import annotations

from qaconv_gs import _native

LEVELS = ("portable", "avx2", "avx512")
# every SIMD path this CPU can run (the kernels pick theirs from the current level)
ISAS = LEVELS[: LEVELS.index(_native.best_isa()) + 1]
