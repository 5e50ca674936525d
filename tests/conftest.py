import os

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("long", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("QG_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


if os.environ.get("QG_HIDE_TORCH") == "1":
    import sys

    sys.modules["torch"] = None  # importorskip("torch") then skips: used by the sanitizer job
