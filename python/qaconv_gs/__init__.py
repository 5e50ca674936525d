"""qaconv-gs: QAConv matching with class embeddings and neighbour-restricted scoring, on the CPU.

Exact C11 + OpenMP kernels behind a NumPy API; PyTorch is an optional front end (qaconv_gs.torch).
"""

from __future__ import annotations

from . import _native, data, functional, metrics, optim
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import match
from .history import History
from .model import QAConvGS, StepResult
from .neighbors import class_neighbors
from .sampler import GraphSampler
from .search import SearchResult, two_stage_search
from .trainer import Trainer, lr_schedule

__version__ = "0.1.0"


def openmp_enabled() -> bool:
    """True if the C extension was built with OpenMP (multi-threaded kernels)."""
    return bool(_native.openmp_enabled())


def info() -> dict:
    """Build and runtime facts: version, OpenMP, default thread count, SIMD path in use."""
    return {
        "version": __version__,
        "openmp": openmp_enabled(),
        "default_threads": int(_native.default_threads()),
        "simd": str(_native.isa()),
        "best_simd": str(_native.best_isa()),
    }


__all__ = [
    "GraphSampler",
    "History",
    "QAConvGS",
    "SearchResult",
    "StepResult",
    "Trainer",
    "__version__",
    "class_neighbors",
    "data",
    "functional",
    "info",
    "load_checkpoint",
    "lr_schedule",
    "match",
    "metrics",
    "openmp_enabled",
    "optim",
    "save_checkpoint",
    "two_stage_search",
]
