"""PyTorch CPU implementation of one QAConvGS training step (SPEC section 1), with autograd.

The baseline of benchmarks/bench_train.py and a test oracle (tests/test_bench.py). It is the code a
PyTorch user would write for neighbour-restricted scoring:

    normalise the candidate class rows -> gather them per sample ([B, K, C, S]) -> einsum correlation
    ([B, K, S, S]) -> the two max-poolings -> BN / fc / BN head -> CE over the K candidates + margin
    ranking -> loss.backward().

Only the candidate rows of the class table are leaves (`embed_grad="rows"`, the sparse gradient a
careful user gets from `E[ids].requires_grad_()`); `embed_grad="dense"` makes the whole table the leaf,
as `nn.Parameter(E)` does, and allocates a dense [N, C, H, W] gradient.

    out = torch_step(torch, features, labels, class_embed, head, nbr)   # NumPy (or tensor) inputs
    out["loss"], out["grad_features"], out["grad_embed_ids"], out["grad_embed_rows"], out["grad_head"]
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS_NORM = 1e-12
BN_EPS = 1e-5
MOMENTUM = 0.1
HEAD_PARAM_KEYS = ("bn.weight", "bn.bias", "fc.weight", "fc.bias", "logit_bn.weight", "logit_bn.bias")
RUNNING_KEYS = ("bn.running_mean", "bn.running_var", "logit_bn.running_mean", "logit_bn.running_var")


def _tensor(torch, x: Any, dtype) -> Any:
    """Zero-copy for C-contiguous arrays of the right dtype (torch.from_numpy), a copy otherwise."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    a = np.asarray(x)
    if a.dtype != np.dtype(str(dtype).replace("torch.", "")) or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=str(dtype).replace("torch.", ""))
    return torch.from_numpy(a)


def torch_step(
    torch,
    features,
    labels,
    class_embed,
    head: dict,
    nbr,
    *,
    fc: str = "separate",
    triplet: str = "class",
    triplet_weight: float = 0.5,
    margin: float = 1.0,
    dtype=None,
    embed_grad: str = "rows",
) -> dict:
    """One training step (forward + backward) with torch autograd.

    Args:
        torch: the torch module (passed in so that importing this file never imports torch).
        features [B, C, H, W], labels [B], class_embed [N, C, H, W], nbr [N, k] int: NumPy or tensors.
        head: head state keyed like the state_dict (read only; the new running statistics are returned).
        dtype: torch.float32 (default) or torch.float64.
        embed_grad: "rows" (leaf = the candidate rows only) or "dense" (leaf = the whole table).

    Returns a dict: loss, loss_cls, loss_triplet, acc_cls, acc_triplet (floats), scores [B, K],
    candidates [B, K], grad_features [B, C, H, W], grad_embed_ids [R], grad_embed_rows [R, C, H, W],
    grad_head (dict), running (new running statistics, dict), all NumPy.
    """
    F = torch.nn.functional
    dtype = torch.float32 if dtype is None else dtype
    if embed_grad not in ("rows", "dense"):
        raise ValueError(f"embed_grad: expected 'rows' or 'dense', got {embed_grad!r}")
    X = _tensor(torch, features, dtype).detach().requires_grad_(True)
    E_all = _tensor(torch, class_embed, dtype)
    lab = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    nb = torch.as_tensor(np.array(nbr, dtype=np.int64))  # a copy: the model's table is read-only
    B, C, H, W = X.shape
    S = H * W
    t = {
        k: torch.tensor(np.asarray(head[k], dtype=np.float64), dtype=dtype, requires_grad=True)
        for k in HEAD_PARAM_KEYS
    }
    run = {
        k: torch.tensor(np.asarray(head[k], dtype=np.float64).reshape(1), dtype=dtype) for k in RUNNING_KEYS
    }

    cand = torch.cat([lab[:, None], nb[lab]], dim=1)  # [B, K], target first
    ids, local = torch.unique(cand, sorted=True, return_inverse=True)
    if embed_grad == "rows":
        E_leaf = E_all[ids].detach().requires_grad_(True)
        E_rows = E_leaf
    else:
        E_leaf = E_all.detach().requires_grad_(True)
        E_rows = E_leaf[ids]

    def norm(v):
        return v / v.norm(dim=1, keepdim=True).clamp_min(EPS_NORM)

    Xn = norm(X.reshape(B, C, S))
    En = norm(E_rows.reshape(-1, C, S))

    def head_fn(Z):
        """Z [..., S, S] correlations -> logits [...] (training-mode head over all of them)."""
        lead = Z.shape[:-2]
        x = torch.cat([Z.max(dim=-1).values, Z.max(dim=-2).values], dim=-1).reshape(-1, 2 * S)
        M = x.shape[0]
        yv = F.batch_norm(
            x.reshape(-1, 1),
            run["bn.running_mean"],
            run["bn.running_var"],
            t["bn.weight"],
            t["bn.bias"],
            training=True,
            momentum=MOMENTUM,
            eps=BN_EPS,
        ).reshape(M, 2 * S)
        w = t["fc.weight"].reshape(-1)
        if fc == "separate":
            z = yv @ w + t["fc.bias"]
        else:
            z = yv[:, :S] @ w + yv[:, S:] @ w + 2 * t["fc.bias"]
        return F.batch_norm(
            z.reshape(-1, 1),
            run["logit_bn.running_mean"],
            run["logit_bn.running_var"],
            t["logit_bn.weight"],
            t["logit_bn.bias"],
            training=True,
            momentum=MOMENTUM,
            eps=BN_EPS,
        ).reshape(lead)

    Z = torch.einsum("bcs,bkcr->bksr", Xn, En[local])  # [B, K, S, S]
    s = head_fn(Z)
    del Z
    loss_cls = F.cross_entropy(s, torch.zeros(B, dtype=torch.long))
    if triplet == "class":
        neg = s[:, 1:].max(dim=1).values
        loss_t = F.relu(margin - s[:, 0] + neg).mean()
        acc_t = (s[:, 0] > neg).to(torch.float64).mean()
    elif B >= 2:
        sb = head_fn(torch.einsum("pcs,gcr->pgsr", Xn, Xn))
        same = lab[:, None] == lab[None, :]
        posm = same & ~torch.eye(B, dtype=torch.bool)
        negm = ~same
        valid = posm.any(dim=1) & negm.any(dim=1)
        pos = torch.where(posm, sb, torch.full_like(sb, np.inf)).min(dim=1).values
        neg = torch.where(negm, sb, torch.full_like(sb, -np.inf)).max(dim=1).values
        nv = int(valid.sum())
        loss_t = F.relu(margin - pos[valid] + neg[valid]).mean() if nv else sb.sum() * 0.0
        acc_t = (pos[valid] > neg[valid]).to(torch.float64).mean() if nv else torch.tensor(0.0)
    else:
        loss_t = X.sum() * 0.0
        acc_t = torch.tensor(0.0)
    loss = loss_cls + triplet_weight * loss_t
    loss.backward()

    grad_e = E_leaf.grad
    if embed_grad == "dense":
        grad_e = grad_e[ids]
    sd = s.detach()
    return {
        "loss": float(loss.detach()),
        "loss_cls": float(loss_cls.detach()),
        "loss_triplet": float(loss_t.detach()),
        "acc_cls": float((sd.argmax(dim=1) == 0).to(torch.float64).mean()),
        "acc_triplet": float(acc_t),
        "scores": sd.numpy(),
        "candidates": cand.numpy(),
        "grad_features": X.grad.numpy(),
        "grad_embed_ids": ids.numpy(),
        "grad_embed_rows": grad_e.numpy(),
        "grad_head": {k: t[k].grad.numpy() for k in HEAD_PARAM_KEYS},
        "running": {k: v.numpy() for k, v in run.items()},
    }
