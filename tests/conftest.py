import os
import sys

import numpy as np
import pytest
from hypothesis import settings
from isa_levels import ISAS, at_isa

# the repository root, for `benchmarks` (its PyTorch twin, benchmarks/torch_reference.py, is a test oracle
# too); tests/ itself is on sys.path already (pytest's rootdir-relative import of this conftest), which
# makes `oracle`, `isa_levels` and the other helpers importable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("long", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("QG_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test on one SIMD path <= the CPU's best; the previous level is restored afterwards."""
    with at_isa(request.param) as level:
        yield level


if os.environ.get("QG_HIDE_TORCH") == "1":
    sys.modules["torch"] = None  # importorskip("torch") then skips: used by the sanitizer job
