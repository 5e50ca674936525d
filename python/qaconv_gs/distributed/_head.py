"""The training-mode head (BN -> fc -> BN) over pairs spread across ranks, with global batch statistics.

The C head kernel takes its statistics from the rows it is given, so the sharded path evaluates the head
in NumPy float64 around per-rank partial sums that are all-reduced (`Communicator.allreduce_sum` adds the
R partials in rank order, so every rank gets the same bits). The maths is the C kernel's (qg_head.c):

    x = [mp | mg] (2S values per pair), mean1 / var1 over all M*2S values of all ranks (biased),
    dot[m] = w . x[m],  z[m] = a1 * (dot[m] - mean1 * sum(w)) + bn_bias * sum(w) + fc_bias_total,
    mean2 / var2 over the M values of z (all ranks),  out[m] = a2 * (z[m] - mean2) + lbn_bias,
    a1 = bn_weight / sqrt(var1 + eps), a2 = lbn_weight / sqrt(var2 + eps),

and the backward is the C kernel's formulas with its five sums (sum g, sum g*zhat, sum dz, sum dz*xw and
the column sums sum_m dz[m] x[m, :]) all-reduced. With per-pair statistics weights v[m] (a restricted
step's weighted extras) every statistic is the v-weighted one (a pair's 2S values each count v[m]; the
running updates keep the unweighted counts), as the C kernel's weighted path. Statistics use two passes
(mean, then squared deviations), as numerically careful as the kernel's Chan merges. Results agree with
the one-process C head to float64 rounding before the final float32 rounding (a last-bit difference of an
output is possible).
Parameters, eps and momentum are used exactly as the kernel sees them (float32 values widened to double).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .comm import Communicator

__all__ = ["ShardedHeadCache", "sharded_head_forward", "sharded_head_backward"]

_EPS = float(np.float32(1e-5))  # the C kernel receives eps as float32


def _p(head: dict, key: str) -> float:
    return float(np.asarray(head[key], dtype=np.float32).reshape(-1)[0])


def _weights(head: dict, S: int, fc: str) -> tuple[np.ndarray, float, float]:
    """(w [2S] float64 as seen by the 2S inputs, sum(w) as the kernel computes it, total fc bias)."""
    fw = np.asarray(head["fc.weight"], dtype=np.float32).reshape(-1).astype(np.float64)
    wsum = 0.0
    for v in fw.tolist():  # the kernel's serial sum, same order
        wsum += v
    if fc == "shared":
        return np.concatenate([fw, fw]), 2.0 * wsum, 2.0 * _p(head, "fc.bias")
    return fw, wsum, _p(head, "fc.bias")


@dataclass
class ShardedHeadCache:
    x: np.ndarray  # [M_r, 2S] float64 local pair inputs
    dot: np.ndarray  # [M_r] float64
    z: np.ndarray  # [M_r] float64 fc output
    w: np.ndarray  # [2S] float64
    fc: str
    wsum: float
    M: int  # global number of pairs
    stats: tuple[float, float, float, float]  # mean1, var1, mean2, var2
    params: tuple[float, float, float, float]  # g1, b1, g2, b2
    v: np.ndarray | None = None  # [M_r] float64 statistics weights of the local pairs (None: all 1)
    W: float = 0.0  # their global sum (M when unweighted)

    def share(self) -> np.ndarray | float:
        """Each local pair's share of the logit statistics, v[m] / W (1 / M unweighted)."""
        return 1.0 / self.M if self.v is None else self.v / self.W


def _update_running(head: dict, name: str, mean: float, var: float, n: int, momentum: float) -> None:
    """PyTorch BatchNorm1d running update (unbiased variance), as qaconv_gs.head does it."""
    unbiased = var * n / (n - 1)
    rm, rv = _p(head, f"{name}.running_mean"), _p(head, f"{name}.running_var")
    head[f"{name}.running_mean"][...] = (1.0 - momentum) * rm + momentum * mean
    head[f"{name}.running_var"][...] = (1.0 - momentum) * rv + momentum * unbiased
    cnt = f"{name}.num_batches_tracked"
    head[cnt][...] = int(np.asarray(head[cnt]).reshape(-1)[0]) + 1


def sharded_head_forward(
    mp: np.ndarray,
    mg: np.ndarray,
    head: dict,
    fc: str,
    comm: Communicator,
    *,
    update_running: bool = True,
    momentum: float = 0.1,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, ShardedHeadCache]:
    """mp, mg [M_r, S] (this rank's pairs) -> (logits [M_r] float32, cache). Collective.

    Batch statistics are over the pairs of all ranks (weighted by `weights` [M_r], this rank's pairs'
    statistics weights, when given: every rank passes weights or none does); running statistics (identical
    on every rank) are updated in place when update_running. Raises ValueError when fewer than 2 pairs
    exist in total."""
    mp = np.asarray(mp, dtype=np.float32)
    S = mp.shape[-1]
    x = np.concatenate([mp.reshape(-1, S), np.asarray(mg, dtype=np.float32).reshape(-1, S)], axis=1)
    x = x.astype(np.float64)
    Mr = x.shape[0]
    w, wsum, cb = _weights(head, S, fc)
    dot = x @ w
    v = None if weights is None else np.asarray(weights, np.float32).reshape(-1).astype(np.float64)
    if v is None:
        tot = comm.allreduce_sum(np.array([x.sum(), dot.sum(), Mr, Mr], dtype=np.float64))
    else:
        tot = comm.allreduce_sum(np.array([v @ x.sum(axis=1), v @ dot, Mr, v.sum()], dtype=np.float64))
    M = int(round(tot[2]))
    if M < 2:
        raise ValueError(
            f"mp: expected more than 1 value per channel when training (M >= 2 pairs), got M = {M}"
        )
    W = float(M) if v is None else float(tot[3])
    n1 = float(M) * 2.0 * S  # the running update's count: every value, unweighted
    n1w = n1 if v is None else W * 2.0 * S
    mean1, mean_dot = tot[0] / n1w, tot[1] / W
    if v is None:
        m2 = comm.allreduce_sum(np.array([((x - mean1) ** 2).sum(), ((dot - mean_dot) ** 2).sum()]))
    else:
        m2 = comm.allreduce_sum(np.array([v @ ((x - mean1) ** 2).sum(axis=1), v @ (dot - mean_dot) ** 2]))
    var1 = m2[0] / n1w
    g1, b1, g2, b2 = (_p(head, k) for k in ("bn.weight", "bn.bias", "logit_bn.weight", "logit_bn.bias"))
    a1 = g1 / math.sqrt(var1 + _EPS)
    zoff = b1 * wsum + cb - a1 * mean1 * wsum
    z = a1 * dot + zoff
    mean2 = a1 * mean_dot + zoff
    var2 = a1 * a1 * (m2[1] / W)
    if not all(math.isfinite(v) for v in (mean1, var1, mean2, var2)):
        raise FloatingPointError("sharded head: non-finite batch statistics")
    a2 = g2 / math.sqrt(var2 + _EPS)
    out = (a2 * (z - mean2) + b2).astype(np.float32)
    if update_running:
        _update_running(head, "bn", mean1, var1, int(n1), momentum)
        _update_running(head, "logit_bn", mean2, var2, M, momentum)
    cache = ShardedHeadCache(x, dot, z, w, fc, wsum, M, (mean1, var1, mean2, var2), (g1, b1, g2, b2), v, W)
    return out, cache


def sharded_head_backward(
    grad_logits: np.ndarray, cache: ShardedHeadCache, comm: Communicator
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """grad_logits [M_r] -> (grad_mp [M_r, S], grad_mg [M_r, S] float32, grads: dict of the head's parameter
    gradients summed over all ranks, float32, identical on every rank). Collective."""
    c = cache
    mean1, var1, mean2, var2 = c.stats
    g1, b1, g2, _ = c.params
    S = c.x.shape[1] // 2
    g = np.asarray(grad_logits, dtype=np.float32).reshape(-1).astype(np.float64)
    inv1, inv2 = 1.0 / math.sqrt(var1 + _EPS), 1.0 / math.sqrt(var2 + _EPS)
    a1 = g1 * inv1
    zhat = (c.z - mean2) * inv2
    s1 = comm.allreduce_sum(np.array([g.sum(), (g * zhat).sum()]))
    s_g, s_gz = float(s1[0]), float(s1[1])
    share = c.share()
    dz = g2 * inv2 * (g - share * s_g - zhat * (share * s_gz))
    xw = inv1 * (c.dot - mean1 * c.wsum)
    col = dz @ c.x  # [2S]
    s2 = comm.allreduce_sum(np.concatenate([[dz.sum(), (dz * xw).sum()], col]))
    s_dz, s_dzxw, col = float(s2[0]), float(s2[1]), s2[2:]
    share1 = share / (2.0 * S)  # each of a pair's 2S values' share of the first statistics
    A = g1 * s_dz * c.wsum * share1
    Bc = g1 * s_dzxw * share1
    if c.v is not None:
        A, Bc = A[:, None], Bc[:, None]
    gx = inv1 * (dz[:, None] * g1 * c.w[None, :] - A - (c.x - mean1) * inv1 * Bc)
    gx32 = gx.astype(np.float32)
    shared = c.fc == "shared"
    if shared:
        colw = col[:S] + col[S:]
        gfw = a1 * (colw - 2.0 * mean1 * s_dz) + 2.0 * b1 * s_dz
    else:
        gfw = a1 * (col - mean1 * s_dz) + b1 * s_dz
    grads = {
        "bn.weight": np.array([s_dzxw], np.float32),
        "bn.bias": np.array([s_dz * c.wsum], np.float32),
        "fc.weight": gfw.astype(np.float32).reshape(1, -1),
        "fc.bias": np.array([2.0 * s_dz if shared else s_dz], np.float32),
        "logit_bn.weight": np.array([s_gz], np.float32),
        "logit_bn.bias": np.array([s_g], np.float32),
    }
    return np.ascontiguousarray(gx32[:, :S]), np.ascontiguousarray(gx32[:, S:]), grads
