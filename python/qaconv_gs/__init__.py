"""qaconv-gs: QAConv matching with class embeddings and neighbour-restricted scoring, on the CPU."""

from __future__ import annotations

from . import _native, functional
from .neighbors import class_neighbors

__version__ = "0.1.0"


def openmp_enabled() -> bool:
    """True if the C extension was built with OpenMP (multi-threaded kernels)."""
    return bool(_native.openmp_enabled())


__all__ = ["__version__", "class_neighbors", "functional", "openmp_enabled"]
