"""Float64 reference of the QAConv head (scalar BN -> fc -> scalar BN), forward and backward.

Written from the textbook formulas (explicit y = bn(x), explicit fc), independent of the C kernels.
Unlike functional.head_forward it never writes `head`: training mode returns the new running statistics
(PyTorch BatchNorm1d rules) in cache["running"].
"""

from __future__ import annotations

import numpy as np


def _sc(x) -> float:
    """A one-element entry (shape (1,) or ()) as a Python float."""
    return float(np.asarray(x, dtype=np.float64).reshape(-1)[0])


def _check_fc(fc: str) -> bool:
    if fc not in ("separate", "shared"):
        raise ValueError(f"fc: expected 'separate' or 'shared', got {fc!r}")
    return fc == "shared"


def _fc(y: np.ndarray, w: np.ndarray, b: float, shared: bool) -> np.ndarray:
    """y [M, 2S] -> z [M]."""
    S = y.shape[1] // 2
    if shared:
        return y[:, :S] @ w + y[:, S:] @ w + 2.0 * b
    return y @ w + b


def _stats(v: np.ndarray, head: dict, name: str, training: bool, w=None) -> tuple[float, float]:
    """(mean, var): the batch statistics over all elements in training (weighted by w, broadcast like v),
    the running ones in eval."""
    if training:
        if w is None:
            return v.mean(), v.var()
        wb = np.broadcast_to(w, v.shape)
        mean = (wb * v).sum() / wb.sum()
        return mean, (wb * (v - mean) ** 2).sum() / wb.sum()
    return _sc(head[f"{name}.running_mean"]), _sc(head[f"{name}.running_var"])


def _running(head: dict, stats: dict, momentum: float) -> dict:
    """New running statistics (float64, shaped like the state) and counters after one training forward."""
    out = {}
    for name in ("bn", "logit_bn"):
        mean, var, n = stats[name]
        old_mean = np.asarray(head[f"{name}.running_mean"], np.float64)
        old_var = np.asarray(head[f"{name}.running_var"], np.float64)
        out[f"{name}.running_mean"] = (1 - momentum) * old_mean + momentum * mean
        out[f"{name}.running_var"] = (1 - momentum) * old_var + momentum * var * n / (n - 1)
        if f"{name}.num_batches_tracked" in head:
            out[f"{name}.num_batches_tracked"] = int(np.asarray(head[f"{name}.num_batches_tracked"])) + 1
    return out


def head_forward(
    mp, mg, head: dict, *, fc: str = "separate", training: bool = True, momentum=0.1, eps=1e-5, weights=None
):
    """mp, mg [M, S] -> (out [M], cache dict); cache["running"]: the new running statistics (training).
    weights [M] (training): per-pair weights of both batch statistics (a pair's 2S values each count it)."""
    shared = _check_fc(fc)
    x = np.concatenate([np.asarray(mp, np.float64), np.asarray(mg, np.float64)], axis=1)
    w = np.asarray(head["fc.weight"], np.float64).reshape(-1)
    g1, b1 = _sc(head["bn.weight"]), _sc(head["bn.bias"])
    g2, b2 = _sc(head["logit_bn.weight"]), _sc(head["logit_bn.bias"])
    wv = None if weights is None else np.asarray(weights, np.float64).reshape(-1)
    mean1, var1 = _stats(x, head, "bn", training, None if wv is None else wv[:, None])
    xhat = (x - mean1) / np.sqrt(var1 + eps)
    y = g1 * xhat + b1
    z = _fc(y, w, _sc(head["fc.bias"]), shared)
    mean2, var2 = _stats(z, head, "logit_bn", training, wv)
    zhat = (z - mean2) / np.sqrt(var2 + eps)
    out = g2 * zhat + b2
    cache = dict(
        x=x, xhat=xhat, y=y, z=z, zhat=zhat, var1=var1, var2=var2, mean1=mean1, mean2=mean2,
        w=w, g1=g1, g2=g2, shared=shared, eps=eps, wv=wv,
    )  # fmt: skip
    if training:
        stats = {"bn": (mean1, var1, x.size), "logit_bn": (mean2, var2, z.size)}
        cache["running"] = _running(head, stats, momentum)
    return out, cache


def _bn_backward(dy_hat_in: np.ndarray, xhat: np.ndarray, var: float, eps: float, w=None) -> np.ndarray:
    """Gradient through xhat = (x - mean) / sqrt(var + eps), batch statistics over all elements (weighted
    by w broadcast like xhat: element i's share of the mean and variance corrections is w_i / sum w)."""
    share = (
        np.full(xhat.shape, 1.0 / xhat.size)
        if w is None
        else np.broadcast_to(w, xhat.shape) / np.broadcast_to(w, xhat.shape).sum()
    )
    return (dy_hat_in - share * dy_hat_in.sum() - xhat * share * (dy_hat_in * xhat).sum()) / np.sqrt(
        var + eps
    )


def head_backward(grad_logits, cache: dict):
    """-> (grad_mp [M, S], grad_mg [M, S], parameter grads: float64 arrays shaped like the state)."""
    gout = np.asarray(grad_logits, np.float64).reshape(-1)
    c = cache
    S = c["x"].shape[1] // 2
    g_lbn_w = (gout * c["zhat"]).sum()
    g_lbn_b = gout.sum()
    wv = c.get("wv")
    dz = _bn_backward(gout * c["g2"], c["zhat"], c["var2"], c["eps"], wv)
    w = c["w"]
    if c["shared"]:
        g_fc_w = dz @ c["y"][:, :S] + dz @ c["y"][:, S:]
        g_fc_b = 2.0 * dz.sum()
        dy = np.outer(dz, np.concatenate([w, w]))
    else:
        g_fc_w = dz @ c["y"]
        g_fc_b = dz.sum()
        dy = np.outer(dz, w)
    g_bn_w = (dy * c["xhat"]).sum()
    g_bn_b = dy.sum()
    dx = _bn_backward(dy * c["g1"], c["xhat"], c["var1"], c["eps"], None if wv is None else wv[:, None])
    grads = {
        "bn.weight": np.array([g_bn_w]),
        "bn.bias": np.array([g_bn_b]),
        "fc.weight": g_fc_w.reshape(1, -1),
        "fc.bias": np.array([g_fc_b]),
        "logit_bn.weight": np.array([g_lbn_w]),
        "logit_bn.bias": np.array([g_lbn_b]),
    }
    return dx[:, :S], dx[:, S:], grads
