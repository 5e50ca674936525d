"""Trainer: SGD (PyTorch semantics) with a lazily updated class-embedding table, schedules, clipping,
an epoch loop that refreshes the model's class neighbours, a training history and exact resume."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np

from ._validate import as_float32, as_labels, check_int, check_real

__all__ = ["History", "Trainer", "lr_schedule"]

ScheduleSpec = Union[None, str, Mapping[str, Any], Callable[[int], float]]

_INT_COLUMNS = ("step", "epoch", "batch_size")
_STEP_KEYS = ("loss", "loss_cls", "loss_triplet", "acc_cls", "acc_triplet")
_CHECKPOINT_FORMAT = "qaconv_gs.trainer"
_CHECKPOINT_VERSION = 1
_EXTRA_PREFIX = "trainer/"  # the trainer's arrays inside a model checkpoint's extra arrays
_EMBED_BUF = _EXTRA_PREFIX + "buffer/class_embed"
_ROW_KEYS = (_EMBED_BUF, _EXTRA_PREFIX + "row_step")  # one row per class: sharded with the class table


# --------------------------------------------------------------------------------------------------------
# learning-rate schedules
# --------------------------------------------------------------------------------------------------------


def lr_schedule(spec: ScheduleSpec) -> Callable[[int], float]:
    """Turn a schedule spec into a function ``epoch (0-based) -> factor`` applied to the base learning rate.

    Accepted specs (factors as in the matching ``torch.optim.lr_scheduler`` class, stepped once per epoch):

    * ``None``: constant 1.
    * ``"step:S"`` / ``"step:S:G"`` or ``{"name": "step", "step_size": S, "gamma": G=0.1}``:
      ``G ** (epoch // S)`` (StepLR).
    * ``"multistep:M1,M2,..."`` / ``"multistep:M1,M2:G"`` or ``{"name": "multistep", "milestones": [...],
      "gamma": G=0.1}``: ``G ** (number of milestones <= epoch)`` (MultiStepLR).
    * ``"cosine:T"`` / ``"cosine:T:F"`` or ``{"name": "cosine", "epochs": T, "min_factor": F=0.0}``:
      ``F + (1 - F) * (1 + cos(pi * epoch / T)) / 2`` for epoch < T, then ``F`` (CosineAnnealingLR with
      ``eta_min = F * lr``, without its restart after T).
    * a callable ``epoch -> factor`` (must return a finite number >= 0).
    """
    if spec is None:
        return lambda epoch: 1.0
    if callable(spec):
        return spec
    if isinstance(spec, str):
        name, _, rest = spec.strip().partition(":")
        args = rest.split(":") if rest else []
        try:
            if name == "step" and 1 <= len(args) <= 2:
                cfg: dict[str, Any] = {"name": "step", "step_size": int(args[0])}
                if len(args) == 2:
                    cfg["gamma"] = float(args[1])
            elif name == "multistep" and 1 <= len(args) <= 2:
                cfg = {"name": "multistep", "milestones": [int(m) for m in args[0].split(",") if m.strip()]}
                if len(args) == 2:
                    cfg["gamma"] = float(args[1])
            elif name == "cosine" and 1 <= len(args) <= 2:
                cfg = {"name": "cosine", "epochs": int(args[0])}
                if len(args) == 2:
                    cfg["min_factor"] = float(args[1])
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"schedule: expected 'step:S[:G]', 'multistep:M1,M2,...[:G]' or 'cosine:T[:F]', got {spec!r}"
            ) from None
        spec = cfg
    if not isinstance(spec, Mapping):
        raise TypeError(f"schedule: expected None, a string, a dict or a callable, got {type(spec).__name__}")
    name = spec.get("name")
    extra = set(spec) - {"name", "step_size", "gamma", "milestones", "epochs", "min_factor"}
    if extra:
        raise ValueError(f"schedule: unknown key(s) {sorted(extra)}")
    if name == "step":
        size = check_int(spec.get("step_size"), "schedule step_size", lo=1)
        gamma = check_real(spec.get("gamma", 0.1), "schedule gamma", lo=0.0)
        return lambda epoch: gamma ** (epoch // size)
    if name == "multistep":
        raw = spec.get("milestones")
        if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
            raise ValueError(f"schedule milestones: expected a non-empty list of epochs, got {raw!r}")
        miles = sorted(check_int(m, "schedule milestones", lo=0) for m in raw)
        gamma = check_real(spec.get("gamma", 0.1), "schedule gamma", lo=0.0)
        return lambda epoch: gamma ** sum(1 for m in miles if m <= epoch)
    if name == "cosine":
        total = check_int(spec.get("epochs"), "schedule epochs", lo=1)
        floor = check_real(spec.get("min_factor", 0.0), "schedule min_factor", lo=0.0, hi=1.0)

        def cosine(epoch: int) -> float:
            if epoch >= total:
                return floor
            return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * epoch / total)) / 2.0

        return cosine
    raise ValueError(f"schedule: unknown name {name!r}; expected 'step', 'multistep' or 'cosine'")


# --------------------------------------------------------------------------------------------------------
# history
# --------------------------------------------------------------------------------------------------------


class History:
    """What happened during training.

    ``steps``: dict of equally long lists, one entry per optimizer step: ``step`` (1-based global step),
    ``epoch``, ``batch_size``, ``loss``, ``loss_cls``, ``loss_triplet``, ``acc_cls``, ``acc_triplet``, ``lr``,
    ``grad_norm`` (before clipping) and ``time`` (seconds for the step).

    ``epochs``: one dict per finished epoch: ``epoch``, ``steps``, ``samples``, the sample-weighted means of
    the five step metrics, ``lr``, ``neighbor_change`` (the model's fraction of neighbour-table entries that
    changed at this epoch's refresh; NaN when unknown) and ``time`` (seconds), plus whatever ``on_epoch_end``
    callbacks added to the ``stats`` dict they receive (e.g. a held-out ``rank1``).
    """

    def __init__(self) -> None:
        self.steps: dict[str, list[float]] = {
            k: [] for k in ("step", "epoch", "batch_size", *_STEP_KEYS, "lr", "grad_norm", "time")
        }
        self.epochs: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.epochs)

    def epoch_values(self, key: str) -> np.ndarray:
        """Per-epoch values of ``key`` as a float64 array (NaN where an epoch lacks it)."""
        return np.array([_as_float(e.get(key)) for e in self.epochs], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        steps = {k: list(v) for k, v in self.steps.items()}
        return {"steps": steps, "epochs": [dict(e) for e in self.epochs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> History:
        h = cls()
        for k, v in d.get("steps", {}).items():
            h.steps[k] = list(v)
        h.epochs = [dict(e) for e in d.get("epochs", [])]
        return h

    def __repr__(self) -> str:
        if not self.epochs:
            return f"History(epochs=0, steps={len(self.steps['step'])})"
        last = self.epochs[-1]
        return (
            f"History(epochs={len(self.epochs)}, steps={len(self.steps['step'])}, "
            f"last: loss={last['loss']:.4f}, acc_cls={last['acc_cls']:.3f})"
        )

    def plot(self, path: str | os.PathLike, title: str | None = None) -> str:
        """Write a PNG with the loss curves (left) and the accuracy curves (right) to ``path``.

        Per-step values are drawn faintly, per-epoch means as lines with markers, at x = epoch (steps at
        fractional epochs). Extra per-epoch metrics added by callbacks whose values lie in [0, 1] (such as
        a held-out ``rank1``) join the accuracy panel. Uses matplotlib's Agg canvas directly, so the global
        pyplot backend is left alone. Returns the path.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4.2), dpi=110)
        FigureCanvasAgg(fig)
        ax_loss, ax_acc = fig.subplots(1, 2)
        step_epoch = np.asarray(self.steps["epoch"], dtype=np.float64)
        x_steps = np.zeros_like(step_epoch)
        for e in np.unique(step_epoch):
            sel = np.flatnonzero(step_epoch == e)
            x_steps[sel] = e + (np.arange(sel.size) + 1) / sel.size
        x_epochs = self.epoch_values("epoch") + 1.0
        colors = {"loss": "C0", "loss_cls": "C1", "loss_triplet": "C2", "acc_cls": "C1", "acc_triplet": "C2"}
        panels = ((ax_loss, ("loss", "loss_cls", "loss_triplet")), (ax_acc, ("acc_cls", "acc_triplet")))
        for ax, keys in panels:
            for k in keys:
                if x_steps.size:
                    ax.plot(x_steps, self.steps[k], color=colors[k], alpha=0.25, linewidth=0.8)
                if x_epochs.size:
                    style = "^--" if k.endswith("triplet") else "o-"  # acc_triplet often equals acc_cls
                    ax.plot(x_epochs, self.epoch_values(k), style, color=colors[k], label=k)
        known = {"epoch", "steps", "samples", "lr", "neighbor_change", "time", *_STEP_KEYS}
        extras = sorted({k for e in self.epochs for k in e} - known)
        for i, k in enumerate(extras):
            vals = self.epoch_values(k)
            finite = vals[np.isfinite(vals)]
            if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
                ax_acc.plot(x_epochs, vals, "s--", color=f"C{3 + i}", label=k)
        losses = np.asarray(self.steps["loss"], dtype=np.float64)
        if losses.size and losses.min() > 0 and losses.max() / losses.min() > 100:
            ax_loss.set_yscale("log")  # losses fall by orders of magnitude; keep the tail readable
        ax_loss.set_title("loss")
        ax_acc.set_title("accuracy")
        ax_acc.set_ylim(-0.02, 1.02)
        for ax in (ax_loss, ax_acc):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best", fontsize=8)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path = os.fspath(path)
        fig.savefig(path, format="png")
        return path


# --------------------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------------------


class Trainer:
    """SGD training loop for a :class:`~qaconv_gs.QAConvGS` model (or anything with the same interface).

    The update is PyTorch's ``torch.optim.SGD`` (dampening 0): for every parameter ``p`` with gradient ``g``
    (after optional clipping)::

        d = g + weight_decay * p
        buf = d                            (first step)      buf = momentum * buf + d   (later steps)
        d = d + momentum * buf  if nesterov else  buf
        p -= lr * d

    Head parameters (``bn.*``, ``fc.*``, ``logit_bn.*``) are always updated this way, densely.

    The class-embedding table ``class_embed`` [N, C, H, W]:

    * ``sparse_embed=False``: the sparse gradient rows from ``forward_backward`` are scattered into a dense
      zero gradient and the update above runs on the whole table: the arithmetic of ``torch.optim.SGD``
      in float32, operation by operation (O(N) work per step); torch fuses its multiply-adds (one rounding
      where NumPy rounds the product and the sum), so values can differ in the last bit (the tests bound
      them at 1e-6 relative).
    * ``sparse_embed=True`` (default): only rows that are read or written in a step are touched (O(rows)
      work). Each row remembers the step at which it was last brought up to date (a per-row step counter).
      On steps where a row gets no loss gradient, dense SGD would still move it: weight decay shrinks it and
      its momentum buffer keeps pushing it. Those pending steps are applied *lazily*, in closed form, when
      the row is next needed: the zero-gradient update is linear in ``(p, buf)``, so the missed steps are
      the product of their 2 x 2 update matrices (computed in float64 with each step's own learning rate)
      applied to the row once. Rows are brought up to date (a) before a step's forward pass, for the rows
      the forward will read (the step's labels and their ``model.class_neighbors``), (b) before their
      gradient update, (c) for the whole table by :meth:`flush`, which ``fit`` calls at the end of every
      epoch (so neighbour tables, evaluation and checkpoints at epoch boundaries see up-to-date rows).
      In exact arithmetic this *is* dense SGD. How it differs in practice:

      1. rounding: the pending steps' matrices are multiplied out in float64 and applied to the row as one
         float32 linear map (coefficients rounded once), instead of step-by-step float32 updates, so values
         differ from the dense path at the float32 rounding level (about 1e-7 relative per catch-up; the
         tests bound sparse-vs-dense at 1e-5 relative after many steps), not bit-for-bit;
      2. between flushes, rows that were idle since their last use hold stale values in
         ``model.parameters()["class_embed"]``; call :meth:`flush` before reading the table yourself in the
         middle of an epoch (or after manual :meth:`step` calls). A step that finds the model's neighbour
         table stale (``on_epoch_start()`` was called) flushes first, so the table is rebuilt from
         up-to-date rows in hand-written loops too;
      3. if a model reads embedding rows that neither its labels nor ``model.class_neighbors`` predict, the
         forward pass sees those rows stale (their pending decay and momentum are still applied, at their
         next update).

    Sharded models (:class:`~qaconv_gs.distributed.ShardedQAConvGS`, or anything with ``comm`` and
    ``rows_for_step(labels)``): every rank builds its own Trainer and calls :meth:`step` / :meth:`fit` with
    its part of the global batch, in the same order. ``class_embed`` is then this rank's rows (their
    momentum and row counters stay on the rank); the head's gradients are already summed over ranks by the
    model, so the replicated head parameters stay identical; the rows a sparse step catches up come from
    ``model.rows_for_step(labels)``; gradient clipping uses the global norm (the head's plus the model's
    ``grad_embed_sqnorm``); a non-finite step is refused on every rank together; the history holds
    global-batch values (``batch_size`` is the global batch), identical on every rank except ``time``;
    the progress bar shows on rank 0 only. :meth:`save_checkpoint` writes a sharded checkpoint directory
    (momentum rows and row counters re-sharded on load), which :meth:`load_checkpoint` resumes on any
    number of ranks, or in one process with a plain QAConvGS.

    Args:
        model: the model (``parameters()``, ``forward_backward()``, ``on_epoch_start()``, ...).
        lr: base learning rate (> 0); the epoch's rate is ``lr * schedule(epoch)``.
        momentum: momentum factor in [0, 1).
        nesterov: Nesterov momentum (needs momentum > 0).
        weight_decay: L2 penalty added to the gradient (all parameters, as a single torch param group).
        sparse_embed: lazy row-wise updates of the class-embedding table (see above).
        schedule: learning-rate schedule, see :func:`lr_schedule` (None, "step:S[:G]", "multistep:M1,M2[:G]",
            "cosine:T[:F]", a dict, or a callable epoch -> factor).
        clip_grad_norm: if set, scale all gradients so that their global L2 norm is at most this value, as
            ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``, capped at 1).
        seed: seed of the shuffled batches when ``fit`` gets ``(features, labels, batch_size)``; None draws
            one.

    Attributes:
        epoch: number of finished epochs; ``global_step``: number of optimizer steps; ``lr``: the current
        learning rate; ``history``: a :class:`History`; ``stop_training``: set it to True from a callback to
        stop after the current step.
    """

    def __init__(
        self,
        model: Any,
        lr: float = 0.005,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        sparse_embed: bool = True,
        schedule: ScheduleSpec = None,
        clip_grad_norm: float | None = None,
        seed: int | None = None,
    ) -> None:
        for attr in ("parameters", "forward_backward"):
            if not callable(getattr(model, attr, None)):
                raise TypeError(
                    f"model: expected an object with a {attr}() method, got {type(model).__name__}"
                )
        self.model = model
        self._comm = _sharded_comm(model)
        self.base_lr = check_real(lr, "lr", lo=0.0)
        if self.base_lr <= 0.0:
            raise ValueError(f"lr: expected a number > 0, got {lr}")
        self.momentum = check_real(momentum, "momentum", lo=0.0)
        if self.momentum >= 1.0:
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum}")
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov: expected a bool, got {type(nesterov).__name__}")
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov: Nesterov momentum requires momentum > 0 (as in torch.optim.SGD)")
        self.weight_decay = check_real(weight_decay, "weight_decay", lo=0.0)
        if not isinstance(sparse_embed, (bool, np.bool_)):
            raise TypeError(f"sparse_embed: expected a bool, got {type(sparse_embed).__name__}")
        self.sparse_embed = bool(sparse_embed)
        self.schedule_spec = schedule
        self._schedule = lr_schedule(schedule)
        self.clip_grad_norm = None if clip_grad_norm is None else check_real(clip_grad_norm, "clip_grad_norm")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0.0:
            raise ValueError(f"clip_grad_norm: expected a number > 0 or None, got {clip_grad_norm}")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        self.seed = check_int(seed, "seed", lo=0)

        self.epoch = 0
        self.global_step = 0
        self.history = History()
        self.stop_training = False
        self.lr = self.base_lr * self.lr_factor(0)
        self.last_grad_norm = float("nan")
        # optimizer state
        self._buffers: dict[str, np.ndarray] = {}
        self._lr_runs: list[tuple[int, float]] = []  # (first step, lr) of every run of equal learning rates
        embed = self._params().get("class_embed")
        self._row_step = np.zeros(0 if embed is None else embed.shape[0], dtype=np.int64)

    # ---------------------------------------------------------------------------------------------- misc

    def __repr__(self) -> str:
        return (
            f"Trainer(lr={self.base_lr:g}, momentum={self.momentum:g}, nesterov={self.nesterov}, "
            f"weight_decay={self.weight_decay:g}, sparse_embed={self.sparse_embed}, "
            f"schedule={self.schedule_spec!r}, clip_grad_norm={self.clip_grad_norm}, epoch={self.epoch}, "
            f"step={self.global_step})"
        )

    @property
    def rank(self) -> int:
        """This process's rank for a sharded model (0 otherwise): print, plot and write files on rank 0."""
        return 0 if self._comm is None else int(self._comm.rank)

    def _params(self) -> dict[str, np.ndarray]:
        params = self.model.parameters()
        for name, p in params.items():
            if not isinstance(p, np.ndarray) or p.dtype != np.float32 or not p.flags.writeable:
                raise TypeError(f"model.parameters()[{name!r}]: expected a writeable float32 NumPy array")
        return params

    def lr_factor(self, epoch: int) -> float:
        """The schedule's factor for ``epoch`` (0-based), validated."""
        f = self._schedule(int(epoch))
        if not isinstance(f, (int, float, np.floating, np.integer)) or not math.isfinite(f) or f < 0:
            raise ValueError(
                f"schedule: the factor for epoch {epoch} must be a finite number >= 0, got {f!r}"
            )
        return float(f)

    # ---------------------------------------------------------------------------------------- optimizer

    def _lr_at(self, steps: np.ndarray) -> np.ndarray:
        starts = np.array([s for s, _ in self._lr_runs], dtype=np.int64)
        rates = np.array([r for _, r in self._lr_runs], dtype=np.float64)
        return rates[np.searchsorted(starts, steps, side="right") - 1]

    def _idle_matrix(self, lr: float) -> np.ndarray:
        """The linear map of one zero-gradient SGD step on (p, buf)."""
        m, wd = self.momentum, self.weight_decay
        # buf' = m buf + wd p;  d = wd p + m buf' (nesterov) or buf';  p' = p - lr d
        if self.nesterov:
            d = (wd * (1.0 + m), m * m)
        else:
            d = (wd, m)
        return np.array([[1.0 - lr * d[0], -lr * d[1]], [wd, m]], dtype=np.float64)

    def _catch_up_matrix(self, start: int, stop: int) -> np.ndarray:
        """Product of the idle-step maps of steps start+1 .. stop (later steps on the left)."""
        out = np.eye(2)
        s = start + 1
        for i, (first, rate) in enumerate(self._lr_runs):
            end = self._lr_runs[i + 1][0] - 1 if i + 1 < len(self._lr_runs) else stop
            lo, hi = max(s, first), min(stop, end)
            if hi >= lo:
                out = np.linalg.matrix_power(self._idle_matrix(rate), hi - lo + 1) @ out
        return out

    def _catch_up(self, rows: np.ndarray, to_step: int) -> None:
        """Apply the pending zero-gradient steps of ``rows`` (unique ids) up to step ``to_step``."""
        if rows.size == 0 or to_step <= 0:
            return
        last = self._row_step[rows]
        stale = last < to_step
        if not stale.any():
            return
        rows, last = rows[stale], last[stale]
        E = self._params()["class_embed"]
        buf = self._buffers.get("class_embed")
        starts, inv = np.unique(last, return_inverse=True)
        mats = np.stack([self._catch_up_matrix(int(s), to_step) for s in starts])[inv]  # [R, 2, 2]
        # the maps are multiplied out in float64; applying them to the rows in float32 (coefficients rounded
        # once) halves the memory traffic of this O(rows) pass and matches the precision of dense stepping
        coef = mats.astype(np.float32).reshape((-1, 2, 2) + (1,) * (E.ndim - 1))
        p = E[rows]
        if buf is None and self.momentum != 0.0:
            buf = self._buffers["class_embed"] = np.zeros_like(E)
        if buf is not None:
            b = buf[rows]
            new_p = coef[:, 0, 0] * p
            new_p += coef[:, 0, 1] * b
            new_b = coef[:, 1, 0] * p
            new_b += coef[:, 1, 1] * b
            E[rows] = new_p
            buf[rows] = new_b
        else:  # momentum 0: no buffer, p' = (1 - lr wd)^d p
            E[rows] = coef[:, 0, 0] * p
        self._row_step[rows] = to_step

    def flush(self) -> None:
        """Bring every class-embedding row up to date (sparse_embed mode; a no-op otherwise)."""
        if self.sparse_embed and self._row_step.size:
            self._catch_up(np.arange(self._row_step.size, dtype=np.int64), self.global_step)

    def _sgd(
        self, name: str, p: np.ndarray, g: np.ndarray, lr: float, rows: np.ndarray | None = None
    ) -> None:
        """One torch-SGD update of ``p`` (or of ``p[rows]``) in place, float32 arithmetic as torch does it."""
        m = np.float32(self.momentum)
        target = p if rows is None else p[rows]
        d = g + np.float32(self.weight_decay) * target if self.weight_decay != 0.0 else g
        if self.momentum != 0.0:
            buf = self._buffers.get(name)
            if rows is None:
                if buf is None:
                    buf = self._buffers[name] = d.copy()
                else:
                    buf *= m
                    buf += d
                b = buf
            else:
                if buf is None:
                    buf = self._buffers[name] = np.zeros_like(p)
                b = m * buf[rows] + d
                buf[rows] = b
            d = d + m * b if self.nesterov else b
        step = np.float32(-lr) * d
        if rows is None:
            p += step
        else:
            p[rows] = target + step

    def _predicted_rows(self, labels: object) -> np.ndarray | None:
        """Embedding rows the model's forward will read: the labels and their neighbours (a sharded
        model says which of its rows itself, collectively)."""
        if self._comm is not None:
            return np.asarray(self.model.rows_for_step(labels), dtype=np.int64)
        try:
            nbrs = self.model.class_neighbors
        except AttributeError:
            return None
        if nbrs is None:
            return None
        y = as_labels(labels, "labels", num_classes=self._row_step.size)
        nbrs = np.asarray(nbrs)
        return np.unique(np.concatenate([y, nbrs[y].ravel().astype(np.int64)]))

    def step(self, features: object, labels: object) -> Any:
        """One training step: ``model.forward_backward(features, labels)`` and the SGD update.

        Uses the current ``self.lr`` and returns the model's result object (loss, accuracies, gradients).
        With ``sparse_embed=True``, call :meth:`flush` before reading the class-embedding table after manual
        steps (``fit`` does it at every epoch end).
        """
        params = self._params()
        t = self.global_step + 1
        lr = float(self.lr)
        if self.sparse_embed and "class_embed" in params:
            if getattr(self.model, "neighbors_stale", False):
                # this step rebuilds the neighbour table from the whole class table (lazily, on its
                # first read below): every row must hold its dense-SGD value by then, not only the rows
                # the step reads (a hand-written loop calls on_epoch_start() without flush(); fit has
                # flushed already, and up-to-date rows cost nothing here)
                self.flush()
            rows = self._predicted_rows(labels)
            if rows is not None:
                self._catch_up(rows, t - 1)
        # rows the forward reads beyond the predicted ones (per-sample mined classes) are brought up to date
        # when the model knows them, through its row hook
        set_hook = getattr(self.model, "set_row_hook", None) if self.sparse_embed else None
        if set_hook is not None:
            set_hook(lambda ids: self._catch_up(np.asarray(ids, dtype=np.int64), t - 1))
        try:
            result = self.model.forward_backward(features, labels)
        finally:
            if set_hook is not None:
                set_hook(None)

        grads: dict[str, np.ndarray] = {}
        grad_head = getattr(result, "grad_head", None) or {}
        for name, p in params.items():
            if name != "class_embed" and name in grad_head:
                grads[name] = np.asarray(grad_head[name], dtype=np.float32).reshape(p.shape)
        ids = rows_g = None
        if "class_embed" in params:
            E = params["class_embed"]
            ids = np.asarray(result.grad_embed_ids, dtype=np.int64).reshape(-1)
            rows_g = np.asarray(result.grad_embed_rows, dtype=np.float32).reshape((ids.size,) + E.shape[1:])

        sq = sum(_sqnorm(g) for g in grads.values())
        if self._comm is not None:
            # head gradients are global already; the rows' part is the model's sum over all ranks
            sq += float(result.grad_embed_sqnorm)
        elif rows_g is not None:
            sq += _sqnorm(rows_g)
        err = None
        if not (math.isfinite(sq) and math.isfinite(float(result.loss))):
            # A diverged step must not write NaN/Inf into the parameters (the next step and the next
            # checkpoint would fail far from the cause): refuse it with the parameters as they were.
            err = FloatingPointError(
                f"Trainer.step: non-finite loss ({float(result.loss)}) or gradient norm at step {t} "
                f"(lr={lr:g}); the update was skipped (the parameters are as the step left them: "
                "unchanged, except class rows it imprinted). "
                "Lower the learning rate or set clip_grad_norm."
            )
        if self._comm is not None:
            # loss and norm are the same bits on every rank, so every rank decides alike; agreeing
            # explicitly keeps ranks in step even if that ever stopped being true (one updating, one not)
            self._comm.agree(err)
        elif err is not None:
            raise err
        self.last_grad_norm = math.sqrt(sq)
        if self.clip_grad_norm is not None:
            coef = self.clip_grad_norm / (self.last_grad_norm + 1e-6)
            if coef < 1.0:
                c32 = np.float32(coef)
                grads = {k: g * c32 for k, g in grads.items()}
                if rows_g is not None:
                    rows_g = rows_g * c32

        if not self._lr_runs or self._lr_runs[-1][1] != lr:
            self._lr_runs.append((t, lr))
        for name, g in grads.items():
            self._sgd(name, params[name], g, lr)
        if rows_g is not None:
            E = params["class_embed"]
            if self.sparse_embed:
                self._catch_up(ids, t - 1)
                self._sgd("class_embed", E, rows_g, lr, rows=ids)
                self._row_step[ids] = t
            else:
                dense = np.zeros_like(E)
                dense[ids] = rows_g
                self._sgd("class_embed", E, dense, lr)
                self._row_step[:] = t
        self.global_step = t
        return result

    # ------------------------------------------------------------------------------------------ fitting

    def _epoch_batches(self, data: Any, epochs: int) -> Callable[[int], tuple[Iterable, int | None]]:
        """Normalise ``data`` into ``epoch -> (iterable of (features, labels), length or None)``."""
        if isinstance(data, tuple) and len(data) == 3 and not _looks_like_batch(data[2]):
            features = as_float32(data[0], "features", 4)
            labels = as_labels(data[1], "labels", n=features.shape[0])
            sampler = data[2]
            if isinstance(sampler, (int, np.integer)) and not isinstance(sampler, bool):
                batch_size = check_int(sampler, "batch_size", lo=1)
                n = features.shape[0]

                def shuffled(epoch: int) -> tuple[Iterable, int]:
                    order = np.random.default_rng([self.seed, epoch]).permutation(n)
                    chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
                    return ((features[c], labels[c]) for c in chunks), len(chunks)

                return shuffled
            if not hasattr(sampler, "__iter__"):
                raise TypeError(
                    "data: expected (features, labels, sampler) with a sampler yielding index arrays "
                    f"(e.g. GraphSampler) or an int batch size, got {type(sampler).__name__}"
                )

            def sampled(epoch: int) -> tuple[Iterable, int | None]:
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                size = len(sampler) if hasattr(sampler, "__len__") else None
                return ((features[idx], labels[idx]) for idx in (np.asarray(i) for i in sampler)), size

            return sampled
        if callable(data):

            def called(epoch: int) -> tuple[Iterable, int | None]:
                batches = data(epoch)
                return batches, (len(batches) if hasattr(batches, "__len__") else None)

            return called
        if not hasattr(data, "__iter__"):
            raise TypeError(
                "data: expected an iterable of (features, labels) batches, a callable epoch -> iterable, or "
                f"(features, labels, sampler), got {type(data).__name__}"
            )
        if iter(data) is data and epochs > 1:
            raise TypeError(
                "data: a one-shot iterator (e.g. a generator) cannot be re-iterated for several epochs; pass "
                "a list, a callable epoch -> iterable, or (features, labels, sampler)"
            )
        return lambda epoch: (data, len(data) if hasattr(data, "__len__") else None)

    def fit(
        self,
        data: Any,
        epochs: int = 1,
        callbacks: Sequence[Any] | None = None,
        progress: bool = True,
    ) -> History:
        """Train for ``epochs`` more epochs (continuing from ``self.epoch``, so a loaded checkpoint resumes).

        Args:
            data: one of
                * an iterable of ``(features [B, C, H, W], labels [B])`` batches that can be iterated again
                  every epoch (a list, a DataLoader-like object);
                * a callable ``epoch -> iterable of batches``;
                * ``(features [n, C, H, W], labels [n], sampler)``, where ``sampler`` yields index arrays
                  (e.g. :class:`~qaconv_gs.GraphSampler`; its ``set_epoch(epoch)`` is called when present),
                  or an int batch size for shuffled mini-batches seeded by ``(seed, epoch)``.
            epochs: number of epochs to run now (>= 0).
            callbacks: objects with any of ``on_epoch_start(trainer, epoch)``,
                ``on_step_end(trainer, step, result)``, ``on_epoch_end(trainer, epoch, stats)`` (missing ones
                are skipped); ``stats`` is the epoch's history dict, callbacks may add entries to it.
            progress: show a tqdm progress bar (on stderr; a widget in Jupyter, via ``tqdm.auto``) with the
                running loss and accuracy.

        Every epoch: set ``lr`` from the schedule, ``model.train()``, ``model.on_epoch_start()`` (marks the
        class-neighbour table stale so it is rebuilt from the current embeddings), the callbacks'
        ``on_epoch_start``, the steps (each followed by ``on_step_end``), :meth:`flush`, the epoch's stats,
        then ``on_epoch_end``. Returns ``self.history``.
        """
        epochs = check_int(epochs, "epochs", lo=0)
        callbacks = list(callbacks or [])
        source = self._epoch_batches(data, epochs)
        self.stop_training = False
        for _ in range(epochs):
            epoch = self.epoch
            t_epoch = time.perf_counter()
            self.lr = self.base_lr * self.lr_factor(epoch)
            if callable(getattr(self.model, "train", None)):
                self.model.train()
            if callable(getattr(self.model, "on_epoch_start", None)):
                self.model.on_epoch_start()
            _call(callbacks, "on_epoch_start", self, epoch)
            batches, total = source(epoch)
            sums = dict.fromkeys(_STEP_KEYS, 0.0)
            n_steps = n_samples = 0
            bar = _progress_bar(progress and self.rank == 0, total, f"epoch {epoch + 1}")
            try:
                for batch in batches:
                    features, labels = _unpack(batch)
                    t0 = time.perf_counter()
                    result = self.step(features, labels)
                    dt = time.perf_counter() - t0
                    bsz = int(np.shape(labels)[0]) if np.ndim(labels) else 1
                    # a sharded step's loss averages the global batch: weight the epoch means by it
                    bsz = int(getattr(result, "global_batch_size", bsz))
                    self._record_step(epoch, bsz, result, dt)
                    n_steps += 1
                    n_samples += bsz
                    for k in _STEP_KEYS:
                        sums[k] += float(getattr(result, k)) * bsz
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(
                            loss=f"{sums['loss'] / n_samples:.4f}",
                            acc=f"{sums['acc_cls'] / n_samples:.3f}",
                            lr=f"{self.lr:.3g}",
                            refresh=False,
                        )
                    _call(callbacks, "on_step_end", self, self.global_step, result)
                    if self.stop_training:
                        break
            finally:
                if bar is not None:
                    bar.close()
            self.flush()
            change = getattr(self.model, "neighbor_change", None)
            stats: dict[str, Any] = {
                "epoch": epoch,
                "steps": n_steps,
                "samples": n_samples,
                **{k: (sums[k] / n_samples if n_samples else float("nan")) for k in _STEP_KEYS},
                "lr": self.lr,
                "neighbor_change": float("nan") if change is None else float(change),
                "time": time.perf_counter() - t_epoch,
            }
            self.epoch += 1
            self.history.epochs.append(stats)
            _call(callbacks, "on_epoch_end", self, epoch, stats)
            if self.stop_training:
                break
        return self.history

    def _record_step(self, epoch: int, bsz: int, result: Any, dt: float) -> None:
        s = self.history.steps
        s["step"].append(self.global_step)
        s["epoch"].append(epoch)
        s["batch_size"].append(bsz)
        for k in _STEP_KEYS:
            s[k].append(float(getattr(result, k)))
        s["lr"].append(self.lr)
        s["grad_norm"].append(self.last_grad_norm)
        s["time"].append(dt)

    # -------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and loop state (no model weights): JSON-able ``meta`` plus NumPy arrays."""
        meta = {
            "format": _CHECKPOINT_FORMAT,
            "version": _CHECKPOINT_VERSION,
            "hyper": {
                "lr": self.base_lr,
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "weight_decay": self.weight_decay,
                "sparse_embed": self.sparse_embed,
                "clip_grad_norm": self.clip_grad_norm,
            },
            "schedule": self.schedule_spec if isinstance(self.schedule_spec, (str, Mapping)) else None,
            "seed": self.seed,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "lr_now": self.lr,
            "lr_runs": [[int(s), float(r)] for s, r in self._lr_runs],
            "history_epochs": [dict(e) for e in self.history.epochs],
        }
        arrays = {f"buffer/{k}": v.copy() for k, v in self._buffers.items()}
        for k, v in self.history.steps.items():  # per-step columns as arrays (compact, exact)
            arrays[f"history/{k}"] = np.asarray(v, dtype=np.int64 if k in _INT_COLUMNS else np.float64)
        arrays["row_step"] = self._row_step.copy()
        return {"meta": meta, "arrays": arrays}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (everything is validated before anything changes)."""
        self._commit(self._parse_state(state))

    def _parse_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        try:
            meta, arrays = state["meta"], state["arrays"]
            if meta.get("format") != _CHECKPOINT_FORMAT or meta.get("version") != _CHECKPOINT_VERSION:
                raise ValueError(
                    f"checkpoint: expected trainer state format {_CHECKPOINT_FORMAT} v{_CHECKPOINT_VERSION}, "
                    f"got {meta.get('format')} v{meta.get('version')}"
                )
            params = self._params()
            buffers = {}
            for key, arr in arrays.items():
                if not key.startswith("buffer/"):
                    continue
                name = key[len("buffer/") :]
                if name not in params or arr.shape != params[name].shape:
                    want = None if name not in params else params[name].shape
                    raise ValueError(
                        f"checkpoint: momentum buffer {name!r} has shape {arr.shape}, expected {want}"
                    )
                buffers[name] = np.array(arr, dtype=np.float32)
            row_step = np.array(arrays["row_step"], dtype=np.int64)
            if row_step.shape != self._row_step.shape:
                raise ValueError(
                    f"checkpoint: row counters of shape {row_step.shape}, "
                    f"the model's class table needs {self._row_step.shape}"
                )
            hyper = meta["hyper"]
            if bool(hyper["sparse_embed"]) != self.sparse_embed:
                raise ValueError(
                    f"checkpoint: saved with sparse_embed={hyper['sparse_embed']}, this trainer has "
                    f"sparse_embed={self.sparse_embed}"
                )
            return {
                "buffers": buffers,
                "row_step": row_step,
                "seed": int(meta["seed"]),
                "epoch": int(meta["epoch"]),
                "global_step": int(meta["global_step"]),
                "lr": float(meta["lr_now"]),
                "lr_runs": [(int(a), float(b)) for a, b in meta["lr_runs"]],
                "history": History.from_dict(
                    {
                        "epochs": meta["history_epochs"],
                        "steps": {
                            k[len("history/") :]: np.asarray(v).tolist()
                            for k, v in arrays.items()
                            if k.startswith("history/")
                        },
                    }
                ),
            }
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"checkpoint: malformed trainer state ({type(exc).__name__}: {exc})") from None

    def _commit(self, parsed: Mapping[str, Any]) -> None:
        self._buffers = parsed["buffers"]
        self._row_step = parsed["row_step"]
        self.seed = parsed["seed"]
        self.epoch = parsed["epoch"]
        self.global_step = parsed["global_step"]
        self.lr = parsed["lr"]
        self._lr_runs = parsed["lr_runs"]
        self.history = parsed["history"]

    def _extra_arrays(self) -> dict[str, np.ndarray]:
        tstate = self.state_dict()
        extra = {_EXTRA_PREFIX + "meta": _json_bytes(tstate["meta"])}
        for k, v in tstate["arrays"].items():
            extra[_EXTRA_PREFIX + k] = v
        return extra

    def save_checkpoint(self, path: str | os.PathLike) -> str:
        """Write model config + weights + optimizer state + epoch + history to one ``.npz`` file, atomically.

        The file is an ordinary model checkpoint (``qaconv_gs.checkpoint`` format; ``QAConvGS.load(path)``
        reads the model from it) whose extra arrays hold the trainer state. The model's own ``save(path,
        extra=...)`` writes it when it has one (so its current neighbour table is kept too). Rows are saved as
        they are (not flushed), so :meth:`load_checkpoint` continues bit-for-bit; at epoch boundaries (e.g.
        from ``on_epoch_end``) every row is up to date anyway. Returns the path.

        With a sharded model ``path`` is a directory (``distributed.checkpoint`` layout; collective, every
        rank calls it): the momentum rows and row counters of ``class_embed`` go with each rank's shard, the
        rest of the trainer state (identical on every rank) with the head.
        """
        extra = self._extra_arrays()
        if self._comm is not None:
            rows = {k: extra.pop(k) for k in _ROW_KEYS if k in extra}
            # every rank must pass the same keys: a rank whose momentum buffer was never created (it
            # owned no row of any step yet) saves zeros, which is what that buffer holds in effect
            have = bool(self._comm.allreduce_max(np.array([_EMBED_BUF in rows], np.int8))[0])
            if have and _EMBED_BUF not in rows:
                rows[_EMBED_BUF] = np.zeros_like(self._params()["class_embed"])
            self.model.save(path, row_extra=rows, extra=extra)
        elif callable(getattr(self.model, "save", None)):
            self.model.save(path, extra=extra)
        else:
            from .checkpoint import save_checkpoint

            config = _jsonable(dict(getattr(self.model, "config", {}) or {}))
            save_checkpoint(path, config, self.model.state_dict(), extra=extra)
        return os.fspath(path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a :meth:`save_checkpoint` file (or sharded directory) into this trainer and its model.

        The model must have the saved architecture. The file and the trainer state in it are checked first;
        on any error (missing file: FileNotFoundError; truncated, corrupt, not a trainer checkpoint,
        mismatched shapes: ValueError) the trainer and the model are left unchanged. A sharded model loads
        a sharded directory saved with any number of ranks, or a one-process trainer checkpoint (collective:
        a failure on one rank raises on every rank). A one-process model loads a sharded directory too.
        """
        if self._comm is not None:
            self._load_sharded(path)
            return
        if os.path.isdir(os.fspath(path)):
            model, state, extra = _read_sharded_whole(path)
            parsed = self._parse_state(_trainer_state(extra, path))
            for key in ("num_classes", "channels", "height", "width", "fc"):
                mine = getattr(self.model, key, None)
                if mine is not None and mine != model.config[key]:
                    raise ValueError(
                        f"{os.fspath(path)}: checkpoint {key}={model.config[key]!r} does not match this "
                        f"model's {key}={mine!r}"
                    )
            self.model.load_state_dict(state)
            adopt = getattr(self.model, "_adopt_saved_neighbors", None)
            if callable(adopt) and not model.neighbors_stale:
                from .model import _NBR_EXTRA_KEY

                adopt({_NBR_EXTRA_KEY: model.local_neighbors})
            self._commit(parsed)
            return
        config, state, extra = _read_checkpoint(path)
        parsed = self._parse_state(_trainer_state(extra, path))
        if callable(getattr(self.model, "load_checkpoint", None)):
            self.model.load_checkpoint(path)
        else:
            self.model.load_state_dict(state)
        self._commit(parsed)

    def _load_sharded(self, path: str | os.PathLike) -> None:
        """load_checkpoint for a sharded model: read and check everything, agree, then commit."""
        model, comm = self.model, self._comm
        err: BaseException | None = None
        try:
            loaded, rows, extra = model._read_checkpoint(path)
            extra = dict(extra)
            lo, hi = model.lo, model.hi
            for k in _ROW_KEYS:  # a one-process trainer checkpoint holds whole-table rows: keep ours
                if k not in rows and k in extra and np.ndim(extra[k]) and len(extra[k]) == model.num_classes:
                    rows[k] = np.asarray(extra.pop(k))[lo:hi]
            parsed = self._parse_state(_trainer_state({**extra, **rows}, path))
        except (OSError, TypeError, ValueError) as exc:
            err = exc
        comm.agree(err)
        model._assign(loaded)
        self._commit(parsed)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        schedule: ScheduleSpec = None,
        model_cls: Any = None,
        **model_overrides: Any,
    ) -> Trainer:
        """Rebuild model and trainer from a :meth:`save_checkpoint` file or sharded directory.

        ``schedule`` defaults to the saved one when that was a string or dict (a callable schedule is not
        saved: pass it again). ``model_cls`` defaults to QAConvGS, or to ShardedQAConvGS when a ``comm=``
        (a ``qaconv_gs.distributed`` communicator) is given (collective then: every rank calls it);
        ``model_overrides`` (e.g. ``n_threads=4``) replace saved constructor arguments.
        """
        comm = model_overrides.pop("comm", None)
        if os.path.isdir(os.fspath(path)):
            config, extra = _sharded_head_extra(path)
        else:
            config, _, extra = _read_checkpoint(path)
        meta = _trainer_state(extra, path, need_rows=False)["meta"]
        if model_cls is None:
            if comm is None:
                from .model import QAConvGS as model_cls
            else:
                from .distributed import ShardedQAConvGS as model_cls
        if comm is not None:
            model_overrides["comm"] = comm
            from .distributed.model import ShardedQAConvGS, _sharded_config

            if isinstance(model_cls, type) and issubclass(model_cls, ShardedQAConvGS):
                # a one-process init="imprint" model's trained rows go on as they are (init="random")
                config = _sharded_config(config)
        model = model_cls(**{**config, **model_overrides})
        hyper = meta["hyper"]
        if schedule is None:
            schedule = meta.get("schedule")
        trainer = cls(model, seed=int(meta["seed"]), schedule=schedule, **hyper)
        trainer.load_checkpoint(path)
        return trainer


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


def _sqnorm(g: np.ndarray) -> float:
    v = g.ravel().astype(np.float64)
    return float(np.sum(v * v))  # no BLAS call: its thread pool fights the OpenMP kernels


def _as_float(v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def _looks_like_batch(x: object) -> bool:
    """True for a (features, labels) pair or an array (so a 3-tuple of batches is not a sampler tuple)."""
    return isinstance(x, (tuple, list, np.ndarray)) or (hasattr(x, "shape") and hasattr(x, "dtype"))


def _unpack(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, Mapping):
        return batch["features"], batch["labels"]
    try:
        features, labels = batch
    except (TypeError, ValueError):
        raise TypeError(
            f"data: each batch must be a (features, labels) pair, got {type(batch).__name__}"
        ) from None
    return features, labels


def _call(callbacks: Sequence[Any], method: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, method, None)
        if callable(fn):
            fn(*args)


def _progress_bar(progress: bool, total: int | None, desc: str) -> Any:
    if not progress:
        return None
    # tqdm.auto: a text bar on stderr in a terminal (exactly tqdm.tqdm), a widget in Jupyter (ipywidgets)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, unit="batch", dynamic_ncols=True, leave=True)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return repr(o)  # e.g. an object a callback put into the epoch stats


def _json_bytes(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, default=_json_default).encode("utf-8"), dtype=np.uint8)


def _read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    from .checkpoint import load_checkpoint

    return load_checkpoint(path)


def _sharded_comm(model: Any) -> Any:
    """The communicator of a sharded model (one with ``comm`` and ``rows_for_step``), else None."""
    comm = getattr(model, "comm", None)
    if comm is None or not callable(getattr(model, "rows_for_step", None)):
        return None
    for attr in ("agree", "allreduce_max"):
        if not callable(getattr(comm, attr, None)):
            raise TypeError(
                f"model.comm: expected a qaconv_gs.distributed.Communicator, got {type(comm).__name__}"
            )
    return comm


def _read_sharded_whole(path: str | os.PathLike) -> tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A sharded checkpoint directory read by one process: (one-rank ShardedQAConvGS, its state dict,
    extra arrays with the row arrays (whole table) merged in)."""
    from .distributed.checkpoint import load_sharded

    model, rows, extra = load_sharded(path, return_extra=True)
    return model, model.state_dict(), {**extra, **rows}


def _sharded_head_extra(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, replicated extra arrays) of a sharded checkpoint directory, reading only the manifest and
    the head file (not the class rows)."""
    from .distributed.checkpoint import _GEN_KEY, _load_file, _read_manifest

    path = os.fspath(path)
    m = _read_manifest(path)
    _, extra = _load_file(path, m["head"], m["generation"])
    return dict(m["config"]), {k: v for k, v in extra.items() if k != _GEN_KEY}


def _trainer_state(
    extra: Mapping[str, np.ndarray], path: str | os.PathLike, need_rows: bool = True
) -> dict[str, Any]:
    """The trainer part of a checkpoint's extra arrays, as state_dict() returns it."""
    key = _EXTRA_PREFIX + "meta"
    if key not in extra:
        raise ValueError(
            f"checkpoint: {os.fspath(path)!r} holds no trainer state (a plain model checkpoint? "
            "use QAConvGS.load for those)"
        )
    try:
        meta = json.loads(np.asarray(extra[key], dtype=np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"checkpoint: corrupt trainer metadata in {os.fspath(path)!r} ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint: corrupt trainer metadata in {os.fspath(path)!r}")
    arrays = {
        k[len(_EXTRA_PREFIX) :]: v for k, v in extra.items() if k.startswith(_EXTRA_PREFIX) and k != key
    }
    if need_rows and "row_step" not in arrays:
        raise ValueError(f"checkpoint: {os.fspath(path)!r} lacks the optimizer's row counters")
    return {"meta": meta, "arrays": arrays}
