"""NumPy float64 reference of the QAConv head (scalar BN -> fc -> scalar BN), forward and backward.

Written from the textbook formulas (explicit y = bn(x), explicit fc), independent of the C kernels.
"""

from __future__ import annotations

import numpy as np


def _state(head: dict) -> dict:
    return {k: np.asarray(v, dtype=np.float64) for k, v in head.items()}


def _fc(y: np.ndarray, w: np.ndarray, b: float, shared: bool) -> np.ndarray:
    """y [M, 2S] -> z [M]."""
    S = y.shape[1] // 2
    if shared:
        return y[:, :S] @ w + y[:, S:] @ w + 2.0 * b
    return y @ w + b


def forward(mp, mg, head: dict, shared: bool, training: bool = True, eps: float = 1e-5):
    """-> (out [M], cache dict). mp, mg [M, S]."""
    h = _state(head)
    x = np.concatenate([np.asarray(mp, np.float64), np.asarray(mg, np.float64)], axis=1)
    w = h["fc.weight"].reshape(-1)
    g1, b1 = float(h["bn.weight"][0]), float(h["bn.bias"][0])
    g2, b2 = float(h["logit_bn.weight"][0]), float(h["logit_bn.bias"][0])
    if training:
        mean1, var1 = x.mean(), x.var()
    else:
        mean1, var1 = float(h["bn.running_mean"][0]), float(h["bn.running_var"][0])
    xhat = (x - mean1) / np.sqrt(var1 + eps)
    y = g1 * xhat + b1
    z = _fc(y, w, float(h["fc.bias"][0]), shared)
    if training:
        mean2, var2 = z.mean(), z.var()
    else:
        mean2, var2 = float(h["logit_bn.running_mean"][0]), float(h["logit_bn.running_var"][0])
    zhat = (z - mean2) / np.sqrt(var2 + eps)
    out = g2 * zhat + b2
    cache = dict(
        x=x,
        xhat=xhat,
        y=y,
        z=z,
        zhat=zhat,
        var1=var1,
        var2=var2,
        mean1=mean1,
        mean2=mean2,
        w=w,
        g1=g1,
        g2=g2,
        shared=shared,
        eps=eps,
    )
    return out, cache


def _bn_backward(dy_hat_in: np.ndarray, xhat: np.ndarray, var: float, eps: float) -> np.ndarray:
    """Gradient through xhat = (x - mean) / sqrt(var + eps), batch statistics over all elements."""
    n = xhat.size
    return (dy_hat_in - dy_hat_in.sum() / n - xhat * (dy_hat_in * xhat).sum() / n) / np.sqrt(var + eps)


def backward(gout, c: dict):
    """-> (gmp [M, S], gmg [M, S], dict of parameter grads as float64 arrays shaped like the state)."""
    gout = np.asarray(gout, np.float64).reshape(-1)
    S = c["x"].shape[1] // 2
    g_lbn_w = (gout * c["zhat"]).sum()
    g_lbn_b = gout.sum()
    dz = _bn_backward(gout * c["g2"], c["zhat"], c["var2"], c["eps"])
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
    dx = _bn_backward(dy * c["g1"], c["xhat"], c["var1"], c["eps"])
    grads = {
        "bn.weight": np.array([g_bn_w]),
        "bn.bias": np.array([g_bn_b]),
        "fc.weight": g_fc_w.reshape(1, -1),
        "fc.bias": np.array([g_fc_b]),
        "logit_bn.weight": np.array([g_lbn_w]),
        "logit_bn.bias": np.array([g_lbn_b]),
    }
    return dx[:, :S], dx[:, S:], grads


def running_update(head: dict, c: dict, momentum: float = 0.1) -> dict:
    """New running statistics (float64) after one training forward, PyTorch BatchNorm1d rules."""
    M = c["z"].size
    n1 = c["x"].size
    h = _state(head)
    out = {}
    for name, mean, var, n in (("bn", c["mean1"], c["var1"], n1), ("logit_bn", c["mean2"], c["var2"], M)):
        out[f"{name}.running_mean"] = (1 - momentum) * h[f"{name}.running_mean"] + momentum * mean
        out[f"{name}.running_var"] = (1 - momentum) * h[f"{name}.running_var"] + momentum * var * n / (n - 1)
    return out


def numerical_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar function f at x (float64)."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f(x)
        x[i] = old - h
        fm = f(x)
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g
