"""Location normalisation and the fused QAConv correlation + two-way max (forward and backward).

Maps are [M, C, H, W]; S = H*W locations flattened row-major (s = h*W + w).
mp[..., s] = max_r Z[s, r] (probe direction), mg[..., r] = max_s Z[s, r] (gallery direction),
ties to the first index. Argmax arrays are uint16.

Every function validates its arguments (errors name the argument), accepts any array-like (float64,
non-contiguous, big-endian, read-only, torch CPU tensors), never modifies its inputs, and gives
bit-identical results for any n_threads.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _native
from ._validate import _to_array, as_float32, as_index, check_real, resolve_threads, shape_str

MAX_LOCATIONS = 65535  # uint16 argmax indices

__all__ = [
    "match_scores",
    "normalize",
    "normalize_backward",
    "pair_maxima",
    "pair_maxima_backward",
    "pair_maxima_restricted",
    "pair_maxima_restricted_backward",
]


# ---------------------------------------------------------------- validation helpers


def _maps(x: object, name: str) -> np.ndarray:
    """A [M, C, H, W] float32 C-contiguous, finite, non-empty array of maps."""
    a = as_float32(x, name, 4)
    if a.shape[2] * a.shape[3] > MAX_LOCATIONS:
        S = a.shape[2] * a.shape[3]
        raise ValueError(f"{name}: at most {MAX_LOCATIONS} locations (H*W) are supported, got H*W = {S}")
    return a


def _same_map_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"{name_b}: expected maps of shape (C, H, W) = {shape_str(a.shape[1:])} like {name_a}, "
            f"got {shape_str(b.shape[1:])}"
        )


def _flat(a: np.ndarray) -> np.ndarray:
    """[M, C, H, W] -> [M, C, S] view."""
    return a.reshape(a.shape[0], a.shape[1], a.shape[2] * a.shape[3])


def _grad(x: object, name: str, shape: tuple[int, ...]) -> np.ndarray:
    a = as_float32(x, name, len(shape), allow_empty=True)
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape_str(shape)}, got {shape_str(a.shape)}")
    return a


def _argmax(x: object, name: str, shape: tuple[int, ...], S: int) -> np.ndarray:
    a = _to_array(x, name)
    if a.dtype.kind != "u" or a.dtype.itemsize != 2:
        raise TypeError(
            f"{name}: expected a uint16 array (as returned with return_argmax=True), got dtype {a.dtype}"
        )
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape_str(shape)}, got {shape_str(a.shape)}")
    out = np.ascontiguousarray(a, dtype=np.uint16)
    if out.size and int(out.max()) >= S:
        raise ValueError(f"{name}: values must be in [0, {S}) (locations), got {int(out.max())}")
    return out


def _candidates(x: object, B: int, N: int) -> np.ndarray:
    cand = as_index(x, "candidates", 2, N)
    if cand.shape[0] != B:
        raise ValueError(
            f"candidates: expected shape (B, K) with B = {B} (one row per feature map), "
            f"got {shape_str(cand.shape)}"
        )
    if cand.shape[1] < 1:
        raise ValueError(f"candidates: expected at least one column, got shape {shape_str(cand.shape)}")
    return cand


def _scalar(x: object, name: str) -> float:
    if not isinstance(x, numbers.Real) and not isinstance(x, np.generic):
        a = _to_array(x, name)
        if a.size != 1 or a.ndim > 1:
            raise TypeError(f"{name}: expected a real number, got an array of shape {shape_str(a.shape)}")
        if a.dtype.kind not in "fiu":
            raise TypeError(f"{name}: expected a real number, got dtype {a.dtype}")
        x = a.reshape(()).item()
    # the kernels take it as float32: a larger value would turn every result into inf
    f32_max = float(np.finfo(np.float32).max)
    return check_real(x, name, lo=-f32_max, hi=f32_max)


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


# ---------------------------------------------------------------- normalisation


def normalize(x, *, n_threads=None) -> tuple[np.ndarray, np.ndarray]:
    """x [M, C, H, W] -> (y [M, C, H, W] float32, norms [M, H*W] float32); y = x / max(||x||_C, 1e-12).

    The norm of each location's C-vector is summed in double; norms are the raw (unclamped) norms,
    needed by normalize_backward. A finite location whose norm exceeds float32's range (values near
    3.4e38) gets norm +inf and y = x / norm taken in double (not zeros); its gradient rounds to 0.
    """
    nt = resolve_threads(n_threads)
    a = as_float32(x, "x", 4)
    y, norms = _native.norm_forward(_flat(a), nt)
    return y.reshape(a.shape), norms


def normalize_backward(grad_y, y, norms, *, n_threads=None) -> np.ndarray:
    """grad_y, y [M, C, H, W], norms [M, S] -> grad_x [M, C, H, W].

    grad_x = (grad_y - y <y, grad_y>_C) / norm where norm >= 1e-12, grad_y / 1e-12 where the norm was clamped.
    """
    nt = resolve_threads(n_threads)
    yy = as_float32(y, "y", 4)
    gy = _grad(grad_y, "grad_y", yy.shape)
    M, S = yy.shape[0], yy.shape[2] * yy.shape[3]
    # +inf is a valid norm: normalize returns it for locations whose norm exceeds the float32 range
    # (the gradient through such a location rounds to 0).
    nrm = as_float32(norms, "norms", 2, allow_empty=True, check_finite=False)
    if nrm.shape != (M, S):
        raise ValueError(f"norms: expected shape {shape_str((M, S))}, got {shape_str(nrm.shape)}")
    if np.isnan(nrm).any() or (nrm < 0).any():
        raise ValueError("norms: expected non-negative norms (as returned by normalize), got NaN or < 0")
    gx = _native.norm_backward(_flat(gy), _flat(yy), nrm, nt)
    return gx.reshape(yy.shape)


# ---------------------------------------------------------------- pair maxima


def pair_maxima(probe, gallery, *, return_argmax: bool = False, n_threads=None):
    """All pairs of normalised maps: probe [P, C, H, W], gallery [G, C, H, W] ->
    (mp [P, G, S], mg [P, G, S]) or, with return_argmax, (mp, mg, ap, ag) with ap, ag uint16 [P, G, S].

    The maps are expected to be L2-normalised per location (normalize) but need not be; the correlation
    is summed in float32 over channels in order, and the [S, S] correlation is never stored beyond a tile.
    """
    nt = resolve_threads(n_threads)
    p = _maps(probe, "probe")
    g = _maps(gallery, "gallery")
    _same_map_shape(p, g, "probe", "gallery")
    return _native.match_maxima(_flat(p), _flat(g), _flag(return_argmax, "return_argmax"), nt)


def pair_maxima_restricted(features, embeds, candidates, *, return_argmax: bool = False, n_threads=None):
    """features [B, C, H, W], embeds [N, C, H, W] (normalised), candidates [B, K] int64 rows of embeds ->
    (mp [B, K, S], mg [B, K, S]) or (mp, mg, ap, ag);
    pair (b, j) is features[b] vs embeds[candidates[b, j]]."""
    nt = resolve_threads(n_threads)
    x = _maps(features, "features")
    e = _maps(embeds, "embeds")
    _same_map_shape(x, e, "features", "embeds")
    cand = _candidates(candidates, x.shape[0], e.shape[0])
    return _native.match_maxima_restricted(
        _flat(x), _flat(e), cand, _flag(return_argmax, "return_argmax"), nt
    )


def pair_maxima_backward(grad_mp, grad_mg, argmax_p, argmax_g, probe, gallery, *, n_threads=None):
    """Backward of pair_maxima: grads [P, G, S] -> (grad_probe [P, C, H, W], grad_gallery [G, C, H, W]).

    Through the recorded argmax only: grad_probe[c, s] += grad_mp[s] * gallery[c, ap[s]] and
    grad_gallery[c, ap[s]] += grad_mp[s] * probe[c, s] (likewise for the gallery direction), summed in
    double in a fixed order (bit-identical for any n_threads).
    """
    nt = resolve_threads(n_threads)
    p = _maps(probe, "probe")
    g = _maps(gallery, "gallery")
    _same_map_shape(p, g, "probe", "gallery")
    S = p.shape[2] * p.shape[3]
    shape = (p.shape[0], g.shape[0], S)
    gmp = _grad(grad_mp, "grad_mp", shape)
    gmg = _grad(grad_mg, "grad_mg", shape)
    ap = _argmax(argmax_p, "argmax_p", shape, S)
    ag = _argmax(argmax_g, "argmax_g", shape, S)
    gp, gg = _native.match_backward(_flat(p), _flat(g), gmp, gmg, ap, ag, nt)
    return gp.reshape(p.shape), gg.reshape(g.shape)


def pair_maxima_restricted_backward(
    grad_mp, grad_mg, argmax_p, argmax_g, features, embeds, candidates, *, n_threads=None
):
    """Backward of pair_maxima_restricted: grads [B, K, S] ->
    (grad_features [B, C, H, W], grad_embeds [N, C, H, W]); non-candidate rows are 0.

    A row of embeds that is a candidate several times gets the sum of its pairs' contributions, in
    (b, j) order whatever n_threads.
    """
    nt = resolve_threads(n_threads)
    x = _maps(features, "features")
    e = _maps(embeds, "embeds")
    _same_map_shape(x, e, "features", "embeds")
    cand = _candidates(candidates, x.shape[0], e.shape[0])
    S = x.shape[2] * x.shape[3]
    shape = (x.shape[0], cand.shape[1], S)
    gmp = _grad(grad_mp, "grad_mp", shape)
    gmg = _grad(grad_mg, "grad_mg", shape)
    ap = _argmax(argmax_p, "argmax_p", shape, S)
    ag = _argmax(argmax_g, "argmax_g", shape, S)
    gx, ge = _native.match_backward_restricted(_flat(x), _flat(e), cand, gmp, gmg, ap, ag, nt)
    return gx.reshape(x.shape), ge.reshape(e.shape)


def match_scores(probe, gallery, weight, bias, *, n_threads=None) -> np.ndarray:
    """Fused eval scores of normalised maps, [P, G] float32:
    out[p, g] = mp . weight[:S] + mg . weight[S:] + bias. Memory O(P*G + tiles).

    The maxima are exactly those of pair_maxima; the weighted sum is taken in double, in index order.
    """
    nt = resolve_threads(n_threads)
    p = _maps(probe, "probe")
    g = _maps(gallery, "gallery")
    _same_map_shape(p, g, "probe", "gallery")
    S = p.shape[2] * p.shape[3]
    w = as_float32(weight, "weight")
    if w.ndim != 1 or w.shape[0] != 2 * S:
        w_shape = shape_str(w.shape)
        raise ValueError(
            f"weight: expected a 1-d array of length 2*S = {2 * S} (S = H*W), got shape {w_shape}"
        )
    b = _scalar(bias, "bias")
    return _native.match_scores(_flat(p), _flat(g), w, b, nt)
