"""Package-level facts: the build kept OpenMP, the public names exist, top-level match composes correctly."""

import os
import subprocess
import sys

import numpy as np
import oracle
import pytest
import qaconv_gs as qg


@pytest.mark.skipif(os.environ.get("QG_OPENMP") == "0", reason="built without OpenMP on purpose")
def test_build_has_openmp():
    # Fails if the extension silently lost OpenMP (single-threaded kernels).
    assert qg.openmp_enabled()
    assert qg.info()["openmp"] is True


def test_default_threads_respects_omp_num_threads():
    code = "import qaconv_gs as q; print(q.info()['default_threads'])"
    env = dict(os.environ, OMP_NUM_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    expected = 3 if qg.openmp_enabled() else 1
    assert int(out.stdout.strip()) == expected


def test_info_fields():
    info = qg.info()
    assert info["version"] == qg.__version__
    assert info["default_threads"] >= 1
    assert isinstance(info["simd"], str)


def test_functional_exports_exist():
    for name in qg.functional.__all__:
        assert callable(getattr(qg.functional, name)), name


@pytest.mark.parametrize("fc", ["separate", "shared"])
def test_top_level_match_equals_reference(fc, rng):
    C, H, W = 16, 6, 4
    p = rng.standard_normal((5, C, H, W))
    g = rng.standard_normal((7, C, H, W))
    state = qg.functional.init_head(H * W, fc, np.random.default_rng(1))
    # non-trivial running statistics, as after training
    state["bn.running_mean"][...] = 0.3
    state["bn.running_var"][...] = 0.7
    state["logit_bn.running_mean"][...] = -0.2
    state["logit_bn.running_var"][...] = 2.5
    state["bn.weight"][...] = 1.3
    state["logit_bn.bias"][...] = 0.4
    out = qg.match(p, g, state)
    assert out.shape == (5, 7) and out.dtype == np.float32
    np.testing.assert_allclose(out, oracle.match(p, g, state, fc), rtol=1e-4, atol=1e-5)


def test_top_level_match_errors(rng):
    p = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    state = qg.functional.init_head(9, "separate", np.random.default_rng(0))
    with pytest.raises(ValueError, match="gallery"):
        qg.match(p, rng.standard_normal((2, 4, 3, 2)), state)
    with pytest.raises(ValueError, match="probe"):
        qg.match(p[0], p, state)
    with pytest.raises(ValueError, match="fc.weight"):
        qg.match(p, p, qg.functional.init_head(8, "separate", np.random.default_rng(0)))
    with pytest.raises(TypeError, match="head_state"):
        qg.match(p, p, [1, 2, 3])
