"""Trainer: the training loop around :class:`qaconv_gs.optim.SGD`: learning-rate schedules, clipping, an
epoch loop that refreshes the model's class neighbours, callbacks, a training history and exact resume.

The optimiser lives in ``optim.py``, the data shapes ``fit`` accepts in ``_data_sources.py``, the
:class:`History` it records in ``history.py`` (re-exported here), the checkpoint layouts in ``checkpoint.py``
and ``distributed/checkpoint.py``, what the loop may ask of a model in ``_contract.py``."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import checkpoint as _ckpt
from ._contract import TrainableModel, as_trainable, sqnorm
from ._data_sources import epoch_batches, unpack
from ._validate import check_int, check_real
from .history import STEP_KEYS, History
from .optim import SGD, ScheduleSpec, lr_schedule

__all__ = ["History", "Trainer", "lr_schedule"]

_EMBED = "class_embed"  # the row-sparse parameter


class Trainer:
    """SGD training loop for a :class:`~qaconv_gs.QAConvGS` model (or anything with the same interface).

    The update is :class:`qaconv_gs.optim.SGD`: PyTorch's ``torch.optim.SGD`` (dampening 0) on every
    parameter, after optional clipping. Head parameters (``bn.*``, ``fc.*``, ``logit_bn.*``) are updated
    densely. The class-embedding table ``class_embed`` [N, C, H, W] gets gradient rows:

    * ``sparse_embed=False``: dense SGD on the whole table (O(N) work per step).
    * ``sparse_embed=True`` (default): only rows that are read or written in a step are touched (O(rows)
      work); the pending zero-gradient steps of idle rows are applied lazily, in closed form (see
      :class:`~qaconv_gs.optim.SGD`). The loop brings rows up to date (a) before a step's forward pass,
      for the rows the forward will read (the model's ``rows_for_step(labels)``: the step's labels and
      their ``class_neighbors``), (b) before their gradient update, (c) for the whole table by
      :meth:`flush`, which ``fit`` calls at the end of every epoch (so neighbour tables, evaluation and
      checkpoints at epoch boundaries see up-to-date rows). In exact arithmetic this *is* dense SGD; in
      float32 it differs at the rounding level (tests bound sparse-vs-dense at 1e-5 relative). Between
      flushes, rows that were idle since their last use hold stale values in
      ``model.parameters()["class_embed"]``: call :meth:`flush` before reading the table yourself in the
      middle of an epoch (or after manual :meth:`step` calls). A step that finds the model's neighbour
      table stale (``on_epoch_start()`` was called) flushes first, so the table is rebuilt from
      up-to-date rows in hand-written loops too. If a model reads embedding rows that neither its labels
      nor ``model.class_neighbors`` predict, and it has no row hook to say so, the forward pass sees those
      rows stale (their pending decay and momentum are still applied, at their next update).

    Sharded models (:class:`~qaconv_gs.distributed.ShardedQAConvGS`): every rank builds its own Trainer
    and calls :meth:`step` / :meth:`fit` with its part of the global batch, in the same order.
    ``class_embed`` is then this rank's rows (their momentum and row counters stay on the rank); the
    head's gradients are already summed over ranks by the model, so the replicated head parameters stay
    identical; gradient clipping uses the global norm (the head's plus the model's
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
        stop after the current step; ``optimizer``: the :class:`~qaconv_gs.optim.SGD`.
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
        self._model: TrainableModel = as_trainable(model)  # the contract: all the loop uses of the model
        self.model = model
        self.base_lr = check_real(lr, "lr", lo=0.0)
        if self.base_lr <= 0.0:
            raise ValueError(f"lr: expected a number > 0, got {lr}")
        self.optimizer = SGD(
            self._params, momentum, nesterov, weight_decay, lazy=sparse_embed, row_param=_EMBED
        )
        self.schedule_spec = schedule
        self._schedule = lr_schedule(schedule)
        self.clip_grad_norm = None if clip_grad_norm is None else check_real(clip_grad_norm, "clip_grad_norm")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0.0:
            raise ValueError(f"clip_grad_norm: expected a number > 0 or None, got {clip_grad_norm}")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        self.seed = check_int(seed, "seed", lo=0)

        self.epoch = 0
        self.history = History()
        self.stop_training = False
        self.lr = self.base_lr * self.lr_factor(0)
        self.last_grad_norm = float("nan")

    # ---------------------------------------------------------------------------------------------- misc

    def __repr__(self) -> str:
        return (
            f"Trainer(lr={self.base_lr:g}, momentum={self.momentum:g}, nesterov={self.nesterov}, "
            f"weight_decay={self.weight_decay:g}, sparse_embed={self.sparse_embed}, "
            f"schedule={self.schedule_spec!r}, clip_grad_norm={self.clip_grad_norm}, epoch={self.epoch}, "
            f"step={self.global_step})"
        )

    momentum = property(lambda self: self.optimizer.momentum, doc="Momentum factor (the optimizer's).")
    nesterov = property(lambda self: self.optimizer.nesterov, doc="Nesterov momentum (the optimizer's).")
    weight_decay = property(lambda self: self.optimizer.weight_decay, doc="L2 penalty (the optimizer's).")
    sparse_embed = property(lambda self: self.optimizer.lazy, doc="Lazy class-embedding rows.")
    # the optimizer's state under the names it had when it lived here (tests and benchmarks read them)
    _buffers = property(lambda self: self.optimizer.buffers)
    _row_step = property(lambda self: self.optimizer.row_step)
    _lr_runs = property(lambda self: self.optimizer.lr_runs)

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (the optimizer's step counter)."""
        return self.optimizer.steps

    @global_step.setter
    def global_step(self, value: int) -> None:
        self.optimizer.steps = int(value)

    @property
    def rank(self) -> int:
        """This process's rank for a sharded model (0 otherwise): print, plot and write files on rank 0."""
        return int(self._model.comm.rank)

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

    # ------------------------------------------------------------------------------------------ steps

    def flush(self) -> None:
        """Bring every class-embedding row up to date (sparse_embed mode; a no-op otherwise)."""
        self.optimizer.flush()

    def step(self, features: object, labels: object) -> Any:
        """One training step: ``model.forward_backward(features, labels)`` and the SGD update.

        Uses the current ``self.lr`` and returns the model's result object (loss, accuracies, gradients).
        With ``sparse_embed=True``, call :meth:`flush` before reading the class-embedding table after manual
        steps (``fit`` does it at every epoch end).
        """
        opt, model = self.optimizer, self._model
        params = self._params()
        t = self.global_step + 1
        lr = float(self.lr)
        if self.sparse_embed and _EMBED in params:
            if model.neighbors_stale:
                # this step rebuilds the neighbour table from the whole class table (lazily, on its
                # first read below): every row must hold its dense-SGD value by then, not only the rows
                # the step reads (a hand-written loop calls on_epoch_start() without flush(); fit has
                # flushed already, and up-to-date rows cost nothing here)
                self.flush()
            rows = model.rows_for_step(labels)  # the labels and their neighbours (collective if sharded)
            if rows is not None:
                opt.catch_up(np.asarray(rows, dtype=np.int64), t - 1)
        # rows the forward reads beyond the predicted ones (per-sample mined classes) are brought up to date
        # when the model knows them, through its row hook
        if self.sparse_embed:
            model.set_row_hook(lambda ids: opt.catch_up(np.asarray(ids, dtype=np.int64), t - 1))
        try:
            result = model.forward_backward(features, labels)
        finally:
            if self.sparse_embed:
                model.set_row_hook(None)

        grads: dict[str, np.ndarray] = {}
        grad_head = getattr(result, "grad_head", None) or {}
        for name, p in params.items():
            if name != _EMBED and name in grad_head:
                grads[name] = np.asarray(grad_head[name], dtype=np.float32).reshape(p.shape)
        ids = rows_g = None
        if _EMBED in params:
            E = params[_EMBED]
            ids = np.asarray(result.grad_embed_ids, dtype=np.int64).reshape(-1)
            rows_g = np.asarray(result.grad_embed_rows, dtype=np.float32).reshape((ids.size,) + E.shape[1:])

        sq = sum(sqnorm(g) for g in grads.values())
        if rows_g is not None:
            # head gradients are global already; a sharded model's rows' part is its sum over all ranks
            sq += model.embed_grad_sqnorm(result)
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
        # loss and norm are the same bits on every rank, so every rank decides alike; agreeing explicitly
        # keeps ranks in step even if that ever stopped being true (one updating, one not)
        model.comm.agree(err)
        self.last_grad_norm = math.sqrt(sq)
        if self.clip_grad_norm is not None:
            coef = self.clip_grad_norm / (self.last_grad_norm + 1e-6)
            if coef < 1.0:
                c32 = np.float32(coef)
                grads = {k: g * c32 for k, g in grads.items()}
                if rows_g is not None:
                    rows_g = rows_g * c32
        opt.step(grads, lr, None if rows_g is None else (ids, rows_g))
        return result

    # ------------------------------------------------------------------------------------------ fitting

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
        source = epoch_batches(data, epochs, lambda: self.seed)
        self.stop_training = False
        for _ in range(epochs):
            epoch = self.epoch
            t_epoch = time.perf_counter()
            self.lr = self.base_lr * self.lr_factor(epoch)
            self._model.train()
            self._model.on_epoch_start()
            _call(callbacks, "on_epoch_start", self, epoch)
            batches, total = source(epoch)
            sums = dict.fromkeys(STEP_KEYS, 0.0)
            n_steps = n_samples = 0
            bar = _progress_bar(progress and self.rank == 0, total, f"epoch {epoch + 1}")
            try:
                for batch in batches:
                    features, labels = unpack(batch)
                    t0 = time.perf_counter()
                    result = self.step(features, labels)
                    dt = time.perf_counter() - t0
                    bsz = int(np.shape(labels)[0]) if np.ndim(labels) else 1
                    # a sharded step's loss averages the global batch: weight the epoch means by it
                    bsz = int(getattr(result, "global_batch_size", bsz))
                    self._record_step(epoch, bsz, result, dt)
                    n_steps += 1
                    n_samples += bsz
                    for k in STEP_KEYS:
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
            change = self._model.neighbor_change
            stats: dict[str, Any] = {
                "epoch": epoch,
                "steps": n_steps,
                "samples": n_samples,
                **{k: (sums[k] / n_samples if n_samples else float("nan")) for k in STEP_KEYS},
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
        for k in STEP_KEYS:
            s[k].append(float(getattr(result, k)))
        s["lr"].append(self.lr)
        s["grad_norm"].append(self.last_grad_norm)
        s["time"].append(dt)

    # -------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and loop state (no model weights): JSON-able ``meta`` plus NumPy arrays (the layout is
        ``qaconv_gs.checkpoint.encode_trainer_state``)."""
        hyper = {
            "lr": self.base_lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
            "sparse_embed": self.sparse_embed,
            "clip_grad_norm": self.clip_grad_norm,
        }
        schedule = self.schedule_spec if isinstance(self.schedule_spec, (str, Mapping)) else None
        loop = {"seed": self.seed, "epoch": self.epoch, "lr_now": self.lr}
        order = list(self.optimizer.buffers)  # momentum buffers in creation order
        return _ckpt.encode_trainer_state(
            hyper, schedule, loop, self.optimizer.state_dict(), order, self.history
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (everything is validated before anything changes)."""
        self._commit(self._parse_state(state))

    def _parse_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        try:
            d = _ckpt.decode_trainer_state(state)
            opt = self.optimizer.check_state_dict(d["optimizer"])
            if bool(d["hyper"]["sparse_embed"]) != self.sparse_embed:
                raise ValueError(
                    f"checkpoint: saved with sparse_embed={d['hyper']['sparse_embed']}, this trainer has "
                    f"sparse_embed={self.sparse_embed}"
                )
            loop = d["loop"]
            return {
                "optimizer": opt,
                "seed": int(loop["seed"]),
                "epoch": int(loop["epoch"]),
                "lr": float(loop["lr_now"]),
                "history": History.from_dict(d["history"]),
            }
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"checkpoint: malformed trainer state ({type(exc).__name__}: {exc})") from None

    def _commit(self, parsed: Mapping[str, Any]) -> None:
        self.optimizer._commit(parsed["optimizer"])
        self.seed = parsed["seed"]
        self.epoch = parsed["epoch"]
        self.lr = parsed["lr"]
        self.history = parsed["history"]

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
        self._model.save_training_checkpoint(path, _ckpt.pack_trainer_state(self.state_dict()))
        return os.fspath(path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a :meth:`save_checkpoint` file (or sharded directory) into this trainer and its model.

        The model must have the saved architecture. The file and the trainer state in it are checked first;
        on any error (missing file: FileNotFoundError; truncated, corrupt, not a trainer checkpoint,
        mismatched shapes: ValueError) the trainer and the model are left unchanged. A sharded model loads
        a sharded directory saved with any number of ranks, or a one-process trainer checkpoint (collective:
        a failure on one rank raises on every rank). A one-process model loads a sharded directory too.
        """
        parsed = self._model.load_training_checkpoint(path, self._parse_state)
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
        config, state = _ckpt.read_trainer_header(path)
        meta = state["meta"]
        if model_cls is None:
            if comm is None:
                from .model import QAConvGS as model_cls
            else:
                from .distributed import ShardedQAConvGS as model_cls
        if comm is not None:
            model_overrides["comm"] = comm
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
