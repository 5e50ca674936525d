"""The shared boundary validation: conversions never modify inputs, errors name the argument."""

import numpy as np
import pytest
from qaconv_gs._validate import as_float32, as_index, as_labels, check_int, check_real, resolve_threads


def test_as_float32_accepts_the_zoo_without_modifying(rng):
    base = rng.standard_normal((4, 3, 5, 2))
    zoo = {
        "float64": base,
        "noncontig": np.asfortranarray(base),
        "strided": np.repeat(base, 2, axis=0)[::2],
        "bigendian": base.astype(">f4"),
        "int": np.arange(120, dtype=np.int32).reshape(4, 3, 5, 2),
    }
    ro = base.copy()
    ro.setflags(write=False)
    zoo["readonly"] = ro
    for name, x in zoo.items():
        before = x.copy()
        out = as_float32(x, "x", 4)
        assert out.dtype == np.float32 and out.flags.c_contiguous, name
        np.testing.assert_array_equal(out, before.astype(np.float32))
        np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize(
    "bad, exc, msg",
    [
        (None, TypeError, "None"),
        ("abc", TypeError, "numeric"),
        (np.array([True, False]), TypeError, "dtype bool"),
        (np.array([1 + 2j]), TypeError, "complex"),
        (np.array([object()]), TypeError, "object"),
        ([[1.0, 2.0], [3.0]], TypeError, "converted"),
        (np.zeros((0, 3)), ValueError, "non-empty"),
        (np.array([1.0, np.nan]), ValueError, "NaN or Inf"),
        (np.array([1.0, np.inf]), ValueError, "NaN or Inf"),
        (np.array([1e300]), ValueError, "float32 range"),
    ],
)
def test_as_float32_rejects(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        as_float32(bad, "features")
    with pytest.raises(exc, match="features"):
        as_float32(bad, "features")


def test_as_float32_ndim():
    with pytest.raises(ValueError, match=r"features: expected a 4-d array, got shape \(3,\)"):
        as_float32(np.ones(3), "features", 4)
    assert as_float32(np.ones((2, 3)), "E", (2, 4)).shape == (2, 3)


def test_as_labels():
    np.testing.assert_array_equal(as_labels([0, 2, 1], "labels", 3, 3), [0, 2, 1])
    np.testing.assert_array_equal(as_labels(np.array([1.0, 2.0]), "labels"), [1, 2])
    with pytest.raises(ValueError, match=r"labels: values must be in \[0, 3\), got 3"):
        as_labels([0, 3], "labels", 2, 3)
    with pytest.raises(ValueError, match="labels: values must be in .*got -1"):
        as_labels([-1, 0], "labels", 2, 3)
    with pytest.raises(ValueError, match="labels: expected length 3, got 2"):
        as_labels([0, 1], "labels", 3, 3)
    with pytest.raises(TypeError, match="labels: expected integer values"):
        as_labels([0.5, 1.0], "labels")
    with pytest.raises(TypeError, match="labels"):
        as_labels(np.array([True, False]), "labels")
    with pytest.raises(ValueError, match="labels: expected a 1-d array"):
        as_labels([[0, 1]], "labels")


def test_as_index():
    assert as_index(np.array([[0, 4]]), "candidates", 2, 5).dtype == np.int64
    with pytest.raises(ValueError, match="candidates"):
        as_index(np.array([[0, 5]]), "candidates", 2, 5)
    with pytest.raises(TypeError, match="candidates"):
        as_index(np.array([[0.0, 1.0]]), "candidates", 2, 5)
    # uint64 beyond int64: the message shows the value given, not a wrapped negative one
    with pytest.raises(ValueError, match=r"candidates: values must be in \[0, 5\), got 9223372036854775813"):
        as_index(np.full((1, 2), 2**63 + 5, np.uint64), "candidates", 2, 5)
    assert as_index(np.array([[0, 4]], np.uint64), "candidates", 2, 5).tolist() == [[0, 4]]


def test_scalars_and_threads():
    assert check_int(np.int64(3), "k", 1, 5) == 3
    for bad, exc in [(True, TypeError), (2.5, TypeError), ("3", TypeError), (0, ValueError), (9, ValueError)]:
        with pytest.raises(exc, match="k"):
            check_int(bad, "k", 1, 5)
    assert check_real(2, "margin", 0.0) == 2.0
    with pytest.raises(ValueError, match="margin"):
        check_real(float("nan"), "margin")
    with pytest.raises(TypeError, match="margin"):
        check_real("1", "margin")
    assert resolve_threads(None) >= 1
    assert resolve_threads(2) == 2
    for bad, exc in [
        (0, ValueError),
        (-1, ValueError),
        (1.5, TypeError),
        (True, TypeError),
        ("2", TypeError),
    ]:
        with pytest.raises(exc, match="n_threads"):
            resolve_threads(bad)
