"""The QAConv head: scalar BatchNorm -> fc -> scalar BatchNorm (PyTorch BatchNorm1d semantics).

Head state is a dict with PyTorch's key names and shapes:
  bn.weight (1,), bn.bias (1,), bn.running_mean (1,), bn.running_var (1,), bn.num_batches_tracked () int64,
  fc.weight (1, 2S) [separate] or (1, S) [shared], fc.bias (1,),
  logit_bn.weight, logit_bn.bias, logit_bn.running_mean, logit_bn.running_var, logit_bn.num_batches_tracked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _native
from ._validate import as_float32, check_int, check_real, resolve_threads, shape_str

__all__ = ["init_head", "head_forward", "head_backward", "head_eval_affine"]

_FC_MODES = ("separate", "shared")
_F32_MAX = float(np.finfo(np.float32).max)
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")
_GRAD_KEYS = ("bn.weight", "bn.bias", "fc.weight", "fc.bias", "logit_bn.weight", "logit_bn.bias")


def _check_fc(fc: object) -> bool:
    """True for fc="shared"."""
    if fc not in _FC_MODES:
        raise ValueError(f"fc: expected 'separate' or 'shared', got {fc!r}")
    return fc == "shared"


def init_head(S: int, fc: str = "separate", rng: np.random.Generator | None = None) -> dict:
    """Fresh head state: BN weight 1 / bias 0 / running 0 and 1, fc.weight = 1/S,
    fc.bias ~ U(+-1/sqrt(fan_in)) with fan_in = 2S (separate) or S (shared), drawn from `rng`."""
    S = check_int(S, "S", lo=1)
    shared = _check_fc(fc)
    if rng is None:
        rng = np.random.default_rng()
    elif not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator or None, got {type(rng).__name__}")
    fan_in = S if shared else 2 * S
    bound = 1.0 / math.sqrt(fan_in)  # torch.nn.Linear's default bias init
    state: dict = {}
    for name in ("bn", "logit_bn"):
        state[f"{name}.weight"] = np.ones(1, np.float32)
        state[f"{name}.bias"] = np.zeros(1, np.float32)
        state[f"{name}.running_mean"] = np.zeros(1, np.float32)
        state[f"{name}.running_var"] = np.ones(1, np.float32)
        state[f"{name}.num_batches_tracked"] = np.array(0, dtype=np.int64)
    state["fc.weight"] = np.full((1, fan_in), 1.0 / S, dtype=np.float32)
    state["fc.bias"] = rng.uniform(-bound, bound, size=1).astype(np.float32)
    # keep PyTorch's key order: bn.*, fc.*, logit_bn.*
    order = [f"bn.{k}" for k in (*_BN_KEYS, "num_batches_tracked")] + ["fc.weight", "fc.bias"]
    order += [f"logit_bn.{k}" for k in (*_BN_KEYS, "num_batches_tracked")]
    return {k: state[k] for k in order}


def _scalar(head: dict, key: str) -> float:
    """A finite one-element head entry as a Python float."""
    if key not in head:
        raise ValueError(f"head: missing key {key!r}")
    a = as_float32(head[key], f"head[{key!r}]", check_finite=True)
    if a.size != 1:
        raise ValueError(f"head[{key!r}]: expected one value (shape (1,)), got shape {shape_str(a.shape)}")
    return float(a.reshape(-1)[0])


def _fc_weight(head: dict, S: int, shared: bool) -> np.ndarray:
    if "fc.weight" not in head:
        raise ValueError("head: missing key 'fc.weight'")
    w = as_float32(head["fc.weight"], "head['fc.weight']", ndim=(1, 2))
    nw = S if shared else 2 * S
    if w.size != nw or (w.ndim == 2 and w.shape[0] != 1):
        mode = "shared" if shared else "separate"
        raise ValueError(
            f"head['fc.weight']: expected shape (1, {nw}) for fc={mode!r} and S={S}, got {shape_str(w.shape)}"
        )
    return w.reshape(-1)


def _params(head: dict, S: int, shared: bool, eps: float) -> tuple[tuple, np.ndarray]:
    """(params tuple for the C bindings, fc weight [nw] float32)."""
    if not isinstance(head, dict):
        raise TypeError(f"head: expected a dict (state from init_head), got {type(head).__name__}")
    vals = {k: _scalar(head, k) for k in (f"{n}.{s}" for n in ("bn", "logit_bn") for s in _BN_KEYS)}
    for n in ("bn", "logit_bn"):
        if vals[f"{n}.running_var"] < 0:
            raise ValueError(f"head['{n}.running_var']: expected >= 0, got {vals[f'{n}.running_var']}")
    fc_bias = _scalar(head, "fc.bias")
    for n in ("bn", "logit_bn"):
        _count(head, f"{n}.num_batches_tracked")  # validated before anything is updated
    params = (
        int(shared),
        eps,
        vals["bn.weight"],
        vals["bn.bias"],
        vals["bn.running_mean"],
        vals["bn.running_var"],
        fc_bias,
        vals["logit_bn.weight"],
        vals["logit_bn.bias"],
        vals["logit_bn.running_mean"],
        vals["logit_bn.running_var"],
    )
    return params, _fc_weight(head, S, shared)


def _set_entry(head: dict, key: str, value: float | int) -> None:
    """Write a running statistic in place when the entry is a writable NumPy array (or a tensor)."""
    cur = head.get(key)
    if isinstance(cur, np.ndarray) and cur.flags.writeable:
        cur[...] = value
    elif cur is not None and hasattr(cur, "fill_") and not isinstance(cur, np.ndarray):
        cur.fill_(value)  # torch tensor buffers: in place, like BatchNorm1d
    elif key.endswith("num_batches_tracked"):
        head[key] = np.array(value, dtype=np.int64)
    else:
        head[key] = np.array([value], dtype=np.float32)


def _running_update(head: dict, name: str, mean: float, var: float, n: int, momentum: float) -> tuple:
    """The new (running_mean, running_var) of BN layer `name`; ValueError if they leave the float32 range."""
    unbiased = var * n / (n - 1)
    rm = _scalar(head, f"{name}.running_mean")
    rv = _scalar(head, f"{name}.running_var")
    new = ((1.0 - momentum) * rm + momentum * mean, (1.0 - momentum) * rv + momentum * unbiased)
    if not all(math.isfinite(v) and abs(v) <= _F32_MAX for v in new):
        # Writing them would store inf into the state and poison every later call.
        raise ValueError(
            f"mp, mg: values too large: the batch statistics of {name} (mean {mean:.4g}, variance {var:.4g}) "
            f"overflow the float32 running statistics; the head state was not updated"
        )
    return new


def _update_running(head: dict, updates: dict) -> None:
    for name, (rm, rv) in updates.items():
        _set_entry(head, f"{name}.running_mean", rm)
        _set_entry(head, f"{name}.running_var", rv)
        _set_entry(head, f"{name}.num_batches_tracked", _count(head, f"{name}.num_batches_tracked") + 1)


def _count(head: dict, key: str) -> int:
    """num_batches_tracked as an int (0 when absent, as in old PyTorch checkpoints)."""
    cur = head.get(key)
    if cur is None:
        return 0
    if not isinstance(cur, np.ndarray) and hasattr(cur, "detach"):
        cur = cur.detach().cpu().numpy()
    a = np.asarray(cur)
    if a.size != 1 or a.dtype.kind not in "iu":
        raise ValueError(
            f"head[{key!r}]: expected one integer, got dtype {a.dtype} shape {shape_str(a.shape)}"
        )
    return int(a.reshape(-1)[0])


@dataclass(frozen=True)
class _HeadCache:
    """What head_backward needs. mp and mg are the float32 inputs as converted by head_forward (they may
    share memory with the caller's arrays, which must then not be modified before the backward)."""

    mp: np.ndarray  # [M, S] float32
    mg: np.ndarray  # [M, S] float32
    lead: tuple  # leading shape of the inputs
    fc_weight: np.ndarray  # [nw] float32
    fc_shape: tuple
    params: tuple
    stats: tuple  # (mean1, var1, mean2, var2)
    weights: np.ndarray | None = None  # [M] float32 statistics weights, or None


def head_forward(
    mp,
    mg,
    head: dict,
    *,
    fc: str = "separate",
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    n_threads=None,
    weights=None,
):
    """mp, mg [..., S] -> (logits [...] float32, cache).

    training=True uses batch statistics and updates head's running stats in place (like
    torch.nn.functional.batch_norm); cache is what head_backward needs (None in eval mode).
    weights (training only): None, or [...] per-pair statistics weights (finite, >= 0, not all 0): both
    batch statistics become weighted over the pairs (a pair's 2S maxima each count its weight), and the
    backward differentiates through them. A restricted step uses this so that sampled candidates standing
    for the classes it does not score move the statistics as those classes would. All ones = None.
    """
    shared = _check_fc(fc)
    for x, name in ((mp, "mp"), (mg, "mg")):
        if x is not None and not isinstance(x, (str, bytes)) and np.ndim(x) < 1:
            raise ValueError(f"{name}: expected an array of shape (..., S), got a scalar")
    mp = as_float32(mp, "mp")
    mg = as_float32(mg, "mg")
    if mg.shape != mp.shape:
        raise ValueError(f"mg: expected shape {shape_str(mp.shape)} (like mp), got {shape_str(mg.shape)}")
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    momentum = check_real(momentum, "momentum", lo=0.0, hi=1.0)
    eps = check_real(eps, "eps", hi=_F32_MAX)
    if not np.float32(eps) > 0:  # the kernels take eps as float32
        raise ValueError(f"eps: expected a number > 0 (after rounding to float32), got {eps}")
    nt = resolve_threads(n_threads)
    S = int(mp.shape[-1])
    lead = tuple(int(d) for d in mp.shape[:-1])
    M = int(np.prod(lead, dtype=np.int64)) if lead else 1
    params, fcw = _params(head, S, shared, eps)
    mp2 = mp.reshape(M, S)
    mg2 = mg.reshape(M, S)
    wts = None
    if weights is not None:
        if not training:
            raise ValueError(
                "weights: per-pair statistics weights apply to training mode only (training=False)"
            )
        wts = _pair_weights(weights, lead)
    if not training:
        out = _native.head_forward_eval(mp2, mg2, fcw, params, nt)
        return out.reshape(lead), None
    if M < 2:
        raise ValueError(
            f"mp: expected more than 1 value per channel when training (M >= 2 pairs), got shape "
            f"{shape_str(mp.shape)}"
        )
    _z, out, stats = _native.head_forward_train(mp2, mg2, fcw, params, nt, wts)
    updates = {  # both checked before either is written
        "bn": _running_update(head, "bn", stats[0], stats[1], M * 2 * S, momentum),
        "logit_bn": _running_update(head, "logit_bn", stats[2], stats[3], M, momentum),
    }
    _update_running(head, updates)
    fc_shape = (1, fcw.size)
    cache = _HeadCache(mp2, mg2, lead, fcw, fc_shape, params, tuple(stats), wts)
    return out.reshape(lead), cache


def _pair_weights(weights: object, lead: tuple) -> np.ndarray:
    """Validated [M] float32 statistics weights of shape `lead` (ValueError naming `weights`)."""
    w = as_float32(weights, "weights")
    if w.shape != lead:
        raise ValueError(
            f"weights: expected shape {shape_str(lead)} (one per pair, like mp[..., 0]), "
            f"got {shape_str(w.shape)}"
        )
    if (w < 0).any():
        raise ValueError(f"weights: expected values >= 0, got {float(w.min()):.4g}")
    total = float(w.sum(dtype=np.float64))
    if not total > 0.0:
        raise ValueError("weights: expected at least one weight > 0 (the statistics need mass), got all 0")
    return np.ascontiguousarray(w.reshape(-1))


def head_backward(grad_logits, cache, *, n_threads=None):
    """grad_logits [...] -> (grad_mp [..., S], grad_mg [..., S], grads: dict keyed like the state:
    bn.weight, bn.bias, fc.weight, fc.bias, logit_bn.weight, logit_bn.bias; same shapes as the state)."""
    if cache is None:
        raise ValueError("cache: got None; head_backward needs the cache of head_forward(..., training=True)")
    if not isinstance(cache, _HeadCache):
        raise TypeError(f"cache: expected the cache returned by head_forward, got {type(cache).__name__}")
    g = as_float32(grad_logits, "grad_logits")
    if g.shape != cache.lead:
        raise ValueError(f"grad_logits: expected shape {shape_str(cache.lead)}, got {shape_str(g.shape)}")
    nt = resolve_threads(n_threads)
    S = cache.mp.shape[1]
    gmp, gmg, gfw, sc = _native.head_backward(
        cache.mp, cache.mg, cache.fc_weight, cache.params, cache.stats, g.reshape(-1), nt, cache.weights
    )
    grads = {
        "bn.weight": np.array([sc[0]], np.float32),
        "bn.bias": np.array([sc[1]], np.float32),
        "fc.weight": gfw.reshape(cache.fc_shape),
        "fc.bias": np.array([sc[2]], np.float32),
        "logit_bn.weight": np.array([sc[3]], np.float32),
        "logit_bn.bias": np.array([sc[4]], np.float32),
    }
    return gmp.reshape((*cache.lead, S)), gmg.reshape((*cache.lead, S)), grads


def head_eval_affine(head: dict, S: int, fc: str = "separate") -> tuple[np.ndarray, float]:
    """Eval-mode head as an affine map: (w [2S] float32, b) with logit = mp . w[:S] + mg . w[S:] + b.

    Folded in float64 from the running statistics with BatchNorm1d's default eps = 1e-5; for fc="shared"
    the S weights appear in both halves and the bias counts twice.
    """
    S = check_int(S, "S", lo=1)
    shared = _check_fc(fc)
    p, fcw = _params(head, S, shared, 1e-5)
    eps = 1e-5
    _, _, g1, b1, rm1, rv1, fcb, g2, b2, rm2, rv2 = p
    w = fcw.astype(np.float64)
    if shared:
        w = np.concatenate([w, w])
        fcb = 2.0 * fcb
    a1 = g1 / math.sqrt(rv1 + eps)
    a2 = g2 / math.sqrt(rv2 + eps)
    weff = a2 * a1 * w
    beff = a2 * (float(w.sum()) * (b1 - a1 * rm1) + fcb - rm2) + b2
    # The maxima are cosines in [-1, 1], so |score| <= sum|w| + |b|: bounding that keeps every score
    # (match, match_pairs, identify) finite in float32 instead of overflowing to Inf somewhere downstream.
    bound = float(np.abs(weff).sum()) + abs(beff)
    if not math.isfinite(bound) or bound >= float(np.finfo(np.float32).max):
        raise ValueError(
            "head: the eval-mode head (bn.*, fc.*, logit_bn.* weights and running statistics) folds to "
            f"scores as large as {bound:.3g}, beyond float32's range (tiny running variances or huge "
            "weights); expected a bound below 3.4e38"
        )
    return weff.astype(np.float32), float(beff)
