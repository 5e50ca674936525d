"""A small stand-in with QAConvGS's training interface, for optimizer and training-loop tests.

Its maths is made up but smooth and non-linear in every parameter, so a wrong optimizer update changes the
parameter trajectory: sample b scores its candidate classes (target first, then the target's neighbours) as
x[b, j] = <f_b, E[c_bj]> / D and s[b, j] = sum_i fc.weight[i] * phi_i(x) + fc.bias with
phi = (tanh(bn.weight * x + bn.bias), x, x^2 * logit_bn.weight, x * logit_bn.bias), loss = CE(s[b], 0).
Gradients are computed in float64 and returned in float32, as sparse class-embedding rows.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


class FakeModel:
    def __init__(
        self, num_classes=12, channels=3, height=2, width=2, k_nearest=3, seed=0, fixed_neighbors=None
    ):
        rng = np.random.default_rng(seed)
        self.config = dict(
            num_classes=num_classes,
            channels=channels,
            height=height,
            width=width,
            k_nearest=k_nearest,
            seed=seed,
        )
        self.k = k_nearest
        self._p = {
            "class_embed": rng.standard_normal((num_classes, channels, height, width)).astype(np.float32),
            "bn.weight": np.ones(1, np.float32),
            "bn.bias": np.zeros(1, np.float32),
            "fc.weight": (0.5 + rng.random(4)).astype(np.float32),
            "fc.bias": np.zeros(1, np.float32),
            "logit_bn.weight": np.full(1, 0.3, np.float32),
            "logit_bn.bias": np.full(1, 0.2, np.float32),
        }
        self.running = np.zeros(1, np.float32)  # a non-parameter buffer, like BN running stats
        self.fixed = None if fixed_neighbors is None else np.asarray(fixed_neighbors, np.int64)
        self._nbrs = None
        self.neighbor_change = None
        self.epoch_starts = 0
        self.log = None  # optional list shared with a callback, to check call order
        self.training = True

    def parameters(self):
        return self._p

    def train(self):
        self.training = True

    def eval(self):
        self.training = False

    def on_epoch_start(self):
        self.epoch_starts += 1
        self._stale = True
        if self.log is not None:
            self.log.append(("model.on_epoch_start",))

    @property
    def class_neighbors(self):
        if self.fixed is not None:
            return self.fixed
        if self._nbrs is None or getattr(self, "_stale", False):
            E = self._p["class_embed"].reshape(len(self._p["class_embed"]), -1).astype(np.float64)
            E = E / np.linalg.norm(E, axis=1, keepdims=True)
            sim = E @ E.T
            np.fill_diagonal(sim, -np.inf)
            new = np.argsort(-sim, axis=1, kind="stable")[:, : self.k]
            if self._nbrs is not None:
                self.neighbor_change = float(np.mean(new != self._nbrs))
            self._nbrs = new
            self._stale = False
        return self._nbrs

    def forward_backward(self, features, labels):
        p = {k: v.astype(np.float64) for k, v in self._p.items()}
        f = np.asarray(features, np.float64)
        y = np.asarray(labels, np.int64)
        B = f.shape[0]
        E = p["class_embed"]
        D = E[0].size
        cand = np.concatenate([y[:, None], self.class_neighbors[y]], axis=1)  # [B, K]
        fb = f.reshape(B, -1)
        Ec = E[cand].reshape(B, cand.shape[1], -1)
        x = np.einsum("bd,bkd->bk", fb, Ec) / D
        bw, bb = p["bn.weight"][0], p["bn.bias"][0]
        lw, lb = p["logit_bn.weight"][0], p["logit_bn.bias"][0]
        w = p["fc.weight"]
        t = np.tanh(bw * x + bb)
        phi = np.stack([t, x, x * x * lw, x * lb], axis=-1)
        s = phi @ w + p["fc.bias"][0]
        s0 = s - s.max(1, keepdims=True)
        prob = np.exp(s0) / np.exp(s0).sum(1, keepdims=True)
        loss_cls = float(np.mean(-np.log(prob[:, 0])))
        gs = prob.copy()
        gs[:, 0] -= 1.0
        gs /= B
        g = {
            "fc.weight": np.einsum("bk,bki->i", gs, phi),
            "fc.bias": np.array([gs.sum()]),
            "logit_bn.weight": np.array([np.sum(gs * w[2] * x * x)]),
            "logit_bn.bias": np.array([np.sum(gs * w[3] * x)]),
        }
        dt = gs * w[0] * (1.0 - t * t)
        g["bn.weight"] = np.array([np.sum(dt * x)])
        g["bn.bias"] = np.array([np.sum(dt)])
        gx = dt * bw + gs * (w[1] + 2.0 * x * lw * w[2] + lb * w[3])
        grad_f = np.einsum("bk,bkd->bd", gx, Ec) / D
        ids, inv = np.unique(cand, return_inverse=True)
        rows = np.zeros((ids.size, D))
        np.add.at(rows, inv.reshape(-1), (gx[:, :, None] * fb[:, None, :]).reshape(-1, D) / D)
        self.running += 1.0
        return SimpleNamespace(
            loss=loss_cls,
            loss_cls=loss_cls,
            loss_triplet=0.0,
            acc_cls=float(np.mean(s.argmax(1) == 0)),
            acc_triplet=float(np.mean(s[:, 0] > s[:, 1:].max(1))),
            grad_features=grad_f.reshape(f.shape).astype(np.float32),
            grad_embed_ids=ids.astype(np.int64),
            grad_embed_rows=rows.reshape((ids.size,) + E.shape[1:]).astype(np.float32),
            grad_head={k: v.astype(np.float32) for k, v in g.items()},
            candidates=cand,
        )

    def state_dict(self):
        d = {k: v.copy() for k, v in self._p.items()}
        d["running"] = self.running.copy()
        return d

    def load_state_dict(self, state):
        for k in self._p:
            if k not in state or np.shape(state[k]) != self._p[k].shape:
                raise ValueError(f"state_dict: bad or missing {k!r}")
        for k in self._p:
            self._p[k][...] = state[k]
        self.running[...] = state["running"]
        self._nbrs = None
