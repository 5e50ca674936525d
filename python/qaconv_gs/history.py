"""History: what happened during training (per step and per epoch), as :class:`~qaconv_gs.Trainer` records it;
JSON-able (``to_dict`` / ``from_dict``, kept in trainer checkpoints) and plotted by ``plot``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["STEP_KEYS", "History"]

STEP_KEYS = ("loss", "loss_cls", "loss_triplet", "acc_cls", "acc_triplet")  # a step result's metrics


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
            k: [] for k in ("step", "epoch", "batch_size", *STEP_KEYS, "lr", "grad_norm", "time")
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
        known = {"epoch", "steps", "samples", "lr", "neighbor_change", "time", *STEP_KEYS}
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


def _as_float(v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")
