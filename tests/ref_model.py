"""Pure NumPy float64 reference of one QAConvGS training step (SPEC section 1), plus a PyTorch twin.

Everything is vectorised over aligned pairs: a pair m is (P[m], G[m]) with maps [C, S]. Nothing here
mutates its inputs; running statistics are returned, not written.

    step = ref_step(features, labels, class_embed, head, nbr, fc="separate", triplet="class", ...)
    step["loss"], step["scores"], step["grad_features"], step["grad_embed"] (dense [N, C, H, W]), ...
"""

from __future__ import annotations

import numpy as np

EPS_NORM = 1e-12
BN_EPS = 1e-5
MOMENTUM = 0.1

HEAD_PARAM_KEYS = ("bn.weight", "bn.bias", "fc.weight", "fc.bias", "logit_bn.weight", "logit_bn.bias")


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def sc(x) -> float:
    """A one-element parameter (shape (1,) or ()) as a Python float."""
    return float(np.asarray(x, dtype=np.float64).reshape(-1)[0])


# ----------------------------------------------------------------------------- normalisation


def ref_normalize(x):
    """x [M, C, ...] -> (y, norms [M, ...]); y = x / max(||x||_C, eps)."""
    x = f64(x)
    norms = np.sqrt((x * x).sum(axis=1))
    return x / np.maximum(norms, EPS_NORM)[:, None], norms


def ref_normalize_backward(gy, y, norms):
    gy, y, norms = f64(gy), f64(y), f64(norms)
    dot = (y * gy).sum(axis=1, keepdims=True)
    n = norms[:, None]
    return np.where(n >= EPS_NORM, (gy - y * dot) / np.maximum(n, EPS_NORM), gy / EPS_NORM)


# ----------------------------------------------------------------------------- pair maxima


def ref_pair_maxima(P, G):
    """Aligned pairs P, G [M, C, S] -> mp, mg [M, S] and first-index argmax ap, ag [M, S]."""
    Z = np.einsum("mcs,mcr->msr", f64(P), f64(G))
    return Z.max(axis=2), Z.max(axis=1), Z.argmax(axis=2), Z.argmax(axis=1)


def ref_pair_maxima_gaps(P, G):
    """Smallest gap between the maximum and the runner-up over every row/column (argmax stability)."""
    Z = np.einsum("mcs,mcr->msr", f64(P), f64(G))
    a = np.sort(Z, axis=2)
    b = np.sort(Z, axis=1)
    return min(float((a[..., -1] - a[..., -2]).min()), float((b[:, -1, :] - b[:, -2, :]).min()))


def ref_pair_maxima_backward(gmp, gmg, ap, ag, P, G):
    """Gradient only through the recorded argmax: dZ[m, s, r] = gmp[m, s][r == ap] + gmg[m, r][s == ag]."""
    P, G = f64(P), f64(G)
    S = P.shape[2]
    ar = np.arange(S)
    dZ = f64(gmp)[:, :, None] * (ap[:, :, None] == ar[None, None, :])
    dZ = dZ + f64(gmg)[:, None, :] * (ag[:, None, :] == ar[None, :, None])
    return np.einsum("msr,mcr->mcs", dZ, G), np.einsum("msr,mcs->mcr", dZ, P)


# ----------------------------------------------------------------------------- head


def ref_head_forward(mp, mg, head, fc="separate", eps=BN_EPS, momentum=MOMENTUM):
    """Training-mode head over M pairs: mp, mg [M, S] -> (out [M], cache, new running stats dict)."""
    mp, mg = f64(mp), f64(mg)
    M, S = mp.shape
    x = np.concatenate([mp, mg], axis=1)
    w1, b1 = sc(head["bn.weight"]), sc(head["bn.bias"])
    fw, fb = f64(head["fc.weight"]).reshape(-1), sc(head["fc.bias"])
    w2, b2 = sc(head["logit_bn.weight"]), sc(head["logit_bn.bias"])
    mean1, var1 = x.mean(), x.var()
    inv1 = 1.0 / np.sqrt(var1 + eps)
    xh = (x - mean1) * inv1
    y = w1 * xh + b1
    if fc == "separate":
        z = y @ fw + fb
    else:
        z = (y[:, :S] + y[:, S:]) @ fw + 2.0 * fb
    mean2, var2 = z.mean(), z.var()
    inv2 = 1.0 / np.sqrt(var2 + eps)
    zh = (z - mean2) * inv2
    out = w2 * zh + b2
    n1, n2 = x.size, z.size
    running = {}
    for pre, mean, var, n in (("bn", mean1, var1, n1), ("logit_bn", mean2, var2, n2)):
        rm = sc(head[pre + ".running_mean"])
        rv = sc(head[pre + ".running_var"])
        running[pre + ".running_mean"] = (1 - momentum) * rm + momentum * mean
        running[pre + ".running_var"] = (1 - momentum) * rv + momentum * var * n / (n - 1)
        running[pre + ".num_batches_tracked"] = int(np.asarray(head[pre + ".num_batches_tracked"])) + 1
    cache = dict(S=S, fc=fc, xh=xh, y=y, zh=zh, inv1=inv1, inv2=inv2, w1=w1, w2=w2, fw=fw)
    return out, cache, running


def _bn_backward(dy, xh, inv, w):
    dxh = dy * w
    return inv * (dxh - dxh.mean() - xh * (dxh * xh).mean()), float((dy * xh).sum()), float(dy.sum())


def ref_head_backward(gout, c):
    """gout [M] -> (gmp [M, S], gmg [M, S], grads dict keyed like the state)."""
    gout = f64(gout)
    S = c["S"]
    gz, g_w2, g_b2 = _bn_backward(gout, c["zh"], c["inv2"], c["w2"])
    y = c["y"]
    if c["fc"] == "separate":
        dy = gz[:, None] * c["fw"][None, :]
        g_fw = gz @ y
        g_fb = gz.sum()
    else:
        half = gz[:, None] * c["fw"][None, :]
        dy = np.concatenate([half, half], axis=1)
        g_fw = gz @ (y[:, :S] + y[:, S:])
        g_fb = 2.0 * gz.sum()
    dx, g_w1, g_b1 = _bn_backward(dy, c["xh"], c["inv1"], c["w1"])
    grads = {
        "bn.weight": np.array([g_w1]),
        "bn.bias": np.array([g_b1]),
        "fc.weight": g_fw[None, :],
        "fc.bias": np.array([g_fb]),
        "logit_bn.weight": np.array([g_w2]),
        "logit_bn.bias": np.array([g_b2]),
    }
    return dx[:, :S], dx[:, S:], grads


# ----------------------------------------------------------------------------- losses


def ref_class_loss(s, margin=1.0, triplet_weight=0.5):
    """Restricted scores [B, K], target column 0 -> dict(loss, loss_cls, loss_triplet, accuracies, grad)."""
    s = f64(s)
    B, K = s.shape
    mx = s.max(axis=1, keepdims=True)
    e = np.exp(s - mx)
    lse = np.log(e.sum(axis=1)) + mx[:, 0]
    loss_cls = float((lse - s[:, 0]).mean())
    grad = e / e.sum(axis=1, keepdims=True)
    grad[:, 0] -= 1.0
    grad /= B
    jn = 1 + s[:, 1:].argmax(axis=1)
    neg = s[np.arange(B), jn]
    pos = s[:, 0]
    h = margin - pos + neg
    loss_t = float(np.maximum(h, 0.0).mean())
    act = (h > 0).astype(np.float64) * triplet_weight / B
    grad[:, 0] -= act
    grad[np.arange(B), jn] += act
    return dict(
        loss=loss_cls + triplet_weight * loss_t,
        loss_cls=loss_cls,
        loss_triplet=loss_t,
        acc_cls=float((s.argmax(axis=1) == 0).mean()),
        acc_triplet=float((pos > neg).mean()),
        grad=grad,
        hinge=h,
    )


def ref_batch_triplet(s, labels, margin):
    """Batch-hard triplet over square scores [B, B] -> dict(loss, acc, grad, hinge, n_valid)."""
    s = f64(s)
    B = s.shape[0]
    labels = np.asarray(labels)
    same = labels[:, None] == labels[None, :]
    posm = same & ~np.eye(B, dtype=bool)
    negm = ~same
    valid = posm.any(axis=1) & negm.any(axis=1)
    grad = np.zeros_like(s)
    hinge = np.full(B, np.nan)
    n_valid = int(valid.sum())
    loss = acc = 0.0
    for b in np.flatnonzero(valid):
        jp = int(np.argmin(np.where(posm[b], s[b], np.inf)))
        jn = int(np.argmax(np.where(negm[b], s[b], -np.inf)))
        h = margin - s[b, jp] + s[b, jn]
        hinge[b] = h
        loss += max(h, 0.0)
        acc += float(s[b, jp] > s[b, jn])
        if h > 0:
            grad[b, jp] -= 1.0 / n_valid
            grad[b, jn] += 1.0 / n_valid
    if n_valid:
        loss /= n_valid
        acc /= n_valid
    return dict(loss=loss, acc=acc, grad=grad, hinge=hinge, n_valid=n_valid)


# ----------------------------------------------------------------------------- one step


def ref_candidates(labels, nbr):
    labels = np.asarray(labels, dtype=np.int64)
    return np.concatenate([labels[:, None], np.asarray(nbr, dtype=np.int64)[labels]], axis=1)


def ref_step(
    features,
    labels,
    class_embed,
    head,
    nbr,
    fc="separate",
    triplet="class",
    triplet_weight=0.5,
    margin=1.0,
    cand=None,
):
    """One training step in float64 (candidates [B, K]: the target and its neighbours in `nbr`, unless
    `cand` gives them, target first). Returns a dict with loss terms, accuracies, scores, candidates,
    grad_features [B, C, H, W], grad_embed (dense [N, C, H, W]), grad_head, running (new running stats),
    and diagnostics (argmax gap, hinge values) to keep finite differences away from switches and kinks."""
    X = f64(features)
    E = f64(class_embed)
    B, C, H, W = X.shape
    S = H * W
    labels = np.asarray(labels, dtype=np.int64)
    cand = ref_candidates(labels, nbr) if cand is None else np.asarray(cand, dtype=np.int64)
    K = cand.shape[1]
    Xn, xnorm = ref_normalize(X.reshape(B, C, S))
    En, enorm = ref_normalize(E.reshape(E.shape[0], C, S))
    P = np.repeat(Xn, K, axis=0)  # pair (b, j) -> row b*K + j
    G = En[cand.reshape(-1)]
    mp, mg, ap, ag = ref_pair_maxima(P, G)
    gap = ref_pair_maxima_gaps(P, G)
    out, cache, running = ref_head_forward(mp, mg, head, fc)
    scores = out.reshape(B, K)
    gXn = np.zeros_like(Xn)
    hinges = []
    if triplet == "class":
        cl = ref_class_loss(scores, margin, triplet_weight)
        loss_t, acc_t = cl["loss_triplet"], cl["acc_triplet"]
        hinges.append(cl["hinge"])
        grad_head = None
    else:
        cl = ref_class_loss(scores, margin, 0.0)
        loss_t = acc_t = 0.0
        grad_head = None
        if B >= 2:
            head2 = dict(head)
            head2.update(running)
            Pb = np.repeat(Xn, B, axis=0)  # pair (i, j) -> row i*B + j
            Gb = np.tile(Xn, (B, 1, 1))
            bmp, bmg, bap, bag = ref_pair_maxima(Pb, Gb)
            gap = min(gap, ref_pair_maxima_gaps(Pb, Gb))
            bout, bcache, running = ref_head_forward(bmp, bmg, head2, fc)
            bt = ref_batch_triplet(bout.reshape(B, B), labels, margin)
            loss_t, acc_t = bt["loss"], bt["acc"]
            hinges.append(bt["hinge"][np.isfinite(bt["hinge"])])
            gb = triplet_weight * bt["grad"].reshape(-1)
            gbmp, gbmg, grad_head = ref_head_backward(gb, bcache)
            gP, gG = ref_pair_maxima_backward(gbmp, gbmg, bap, bag, Pb, Gb)
            gXn += gP.reshape(B, B, C, S).sum(axis=1) + gG.reshape(B, B, C, S).sum(axis=0)
    gmp, gmg, gh = ref_head_backward(cl["grad"].reshape(-1), cache)
    if grad_head is not None:
        gh = {k: gh[k] + grad_head[k] for k in gh}
    gP, gG = ref_pair_maxima_backward(gmp, gmg, ap, ag, P, G)
    gXn += gP.reshape(B, K, C, S).sum(axis=1)
    gEn = np.zeros_like(En)
    np.add.at(gEn, cand.reshape(-1), gG)
    gX = ref_normalize_backward(gXn, Xn, xnorm)
    gE = ref_normalize_backward(gEn, En, enorm)
    return dict(
        loss=cl["loss_cls"] + triplet_weight * loss_t,
        loss_cls=cl["loss_cls"],
        loss_triplet=loss_t,
        acc_cls=cl["acc_cls"],
        acc_triplet=acc_t,
        scores=scores,
        candidates=cand,
        grad_features=gX.reshape(B, C, H, W),
        grad_embed=gE.reshape(E.shape),
        grad_head=gh,
        running=running,
        argmax_gap=gap,
        hinges=np.concatenate(hinges) if hinges else np.zeros(0),
    )


def ref_eval_scores(probe, gallery, head, fc="separate", eps=BN_EPS):
    """Eval-mode scores of all pairs [P, G] with running statistics, float64."""
    Pn, _ = ref_normalize(f64(probe).reshape(len(probe), probe.shape[1], -1))
    Gn, _ = ref_normalize(f64(gallery).reshape(len(gallery), gallery.shape[1], -1))
    nP, nG = len(Pn), len(Gn)
    Pr = np.repeat(Pn, nG, axis=0)
    Gr = np.tile(Gn, (nP, 1, 1))
    mp, mg, _, _ = ref_pair_maxima(Pr, Gr)
    S = mp.shape[1]
    x = np.concatenate([mp, mg], axis=1)

    def bn(v, pre):
        rm = sc(head[pre + ".running_mean"])
        rv = sc(head[pre + ".running_var"])
        return sc(head[pre + ".weight"]) * (v - rm) / np.sqrt(rv + eps) + sc(head[pre + ".bias"])

    y = bn(x, "bn")
    fw, fb = f64(head["fc.weight"]).reshape(-1), sc(head["fc.bias"])
    z = y @ fw + fb if fc == "separate" else (y[:, :S] + y[:, S:]) @ fw + 2.0 * fb
    return bn(z, "logit_bn").reshape(nP, nG)


# ----------------------------------------------------------------------------- PyTorch twin


def torch_step(
    torch,
    features,
    labels,
    class_embed,
    head,
    nbr,
    fc="separate",
    triplet="class",
    triplet_weight=0.5,
    margin=1.0,
):
    """The same step with torch autograd in float64. Returns (loss tensor, dict of leaf tensors, aux dict)."""
    F = torch.nn.functional
    t = {k: torch.tensor(f64(v), requires_grad=True) for k, v in head.items() if k in HEAD_PARAM_KEYS}
    run = {k: torch.tensor(f64(v).reshape(1)) for k, v in head.items() if "running" in k}
    X = torch.tensor(f64(features), requires_grad=True)
    E = torch.tensor(f64(class_embed), requires_grad=True)
    B, C, H, W = X.shape
    S = H * W
    lab = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    cand = torch.as_tensor(ref_candidates(labels, nbr))
    K = cand.shape[1]

    def norm(v):
        return v / v.norm(dim=1, keepdim=True).clamp_min(EPS_NORM)

    Xn = norm(X.reshape(B, C, S))
    En = norm(E.reshape(E.shape[0], C, S))

    def head_fn(P, G):
        Z = torch.einsum("mcs,mcr->msr", P, G)
        x = torch.cat([Z.max(dim=2).values, Z.max(dim=1).values], dim=1)
        M = x.shape[0]
        y = F.batch_norm(
            x.reshape(-1, 1),
            run["bn.running_mean"],
            run["bn.running_var"],
            t["bn.weight"],
            t["bn.bias"],
            training=True,
            momentum=MOMENTUM,
            eps=BN_EPS,
        ).reshape(M, 2 * S)
        if fc == "separate":
            z = y @ t["fc.weight"].reshape(-1) + t["fc.bias"]
        else:
            w = t["fc.weight"].reshape(-1)
            z = y[:, :S] @ w + y[:, S:] @ w + 2 * t["fc.bias"]
        return F.batch_norm(
            z.reshape(-1, 1),
            run["logit_bn.running_mean"],
            run["logit_bn.running_var"],
            t["logit_bn.weight"],
            t["logit_bn.bias"],
            training=True,
            momentum=MOMENTUM,
            eps=BN_EPS,
        ).reshape(M)

    s = head_fn(Xn.repeat_interleave(K, dim=0), En[cand.reshape(-1)]).reshape(B, K)
    loss_cls = F.cross_entropy(s, torch.zeros(B, dtype=torch.long))
    if triplet == "class":
        loss_t = F.relu(margin - s[:, 0] + s[:, 1:].max(dim=1).values).mean()
    elif B >= 2:
        sb = head_fn(Xn.repeat_interleave(B, dim=0), Xn.repeat(B, 1, 1)).reshape(B, B)
        same = lab[:, None] == lab[None, :]
        posm = same & ~torch.eye(B, dtype=torch.bool)
        negm = ~same
        valid = posm.any(dim=1) & negm.any(dim=1)
        pos = torch.where(posm, sb, torch.full_like(sb, np.inf)).min(dim=1).values
        neg = torch.where(negm, sb, torch.full_like(sb, -np.inf)).max(dim=1).values
        h = F.relu(margin - pos[valid] + neg[valid])
        loss_t = h.mean() if int(valid.sum()) else sb.sum() * 0.0
    else:
        loss_t = X.sum() * 0.0
    loss = loss_cls + triplet_weight * loss_t
    loss.backward()
    leaves = dict(t, features=X, class_embed=E)
    return loss, leaves, {"scores": s.detach().numpy(), "running": {k: v.numpy() for k, v in run.items()}}
