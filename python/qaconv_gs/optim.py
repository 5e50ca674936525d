"""Optimisers over NumPy parameters: ``SGD`` with PyTorch semantics and lazily updated table rows, and
``lr_schedule`` (per-epoch learning-rate factors, as ``torch.optim.lr_scheduler``).

The optimiser is separate from the training loop (``qaconv_gs.Trainer``), as ``torch.optim`` is from a
PyTorch loop: it owns the momentum buffers, the per-row step counters and the history of learning rates,
and updates a model's live float32 arrays in place. It knows nothing of models, data or files; its
:meth:`SGD.state_dict` says which part of the state is replicated (identical on every rank of a sharded
model) and which is per row of the class table (sharded with the rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np

from ._validate import check_int, check_real

__all__ = ["SGD", "lr_schedule"]

Params = Union[Mapping[str, np.ndarray], Callable[[], Mapping[str, np.ndarray]]]
ScheduleSpec = Union[None, str, Mapping[str, Any], Callable[[int], float]]


class SGD:
    """``torch.optim.SGD`` (dampening 0, one parameter group) over a dict of live float32 NumPy arrays.

    For every parameter ``p`` with gradient ``g``::

        d = g + weight_decay * p
        buf = d                            (first step)      buf = momentum * buf + d   (later steps)
        d = d + momentum * buf  if nesterov else  buf
        p -= lr * d

    in float32, operation by operation, as torch computes it (torch fuses some multiply-adds, so values
    can differ in the last bit: the tests bound them at 1e-6 relative). Dampening is not supported.

    One parameter, ``row_param`` (default ``"class_embed"``, shape [N, ...]), gets a gradient on a few rows
    per step (``row_grad=(ids [R], rows [R, ...])`` in :meth:`step`):

    * ``lazy=False``: the rows are scattered into a dense zero gradient and the update above runs on the
      whole table (O(N) work per step).
    * ``lazy=True``: only the rows with a gradient are updated (O(R) work). Each row remembers the step at
      which it was last brought up to date (``row_step`` [N] int64). On steps where a row gets no gradient,
      dense SGD would still move it (weight decay shrinks it, its momentum buffer keeps pushing it); those
      pending steps are applied in closed form when the row is next needed (:meth:`catch_up`, called by
      :meth:`step` for the rows it updates, and by the caller for rows it is about to read; :meth:`flush`
      for the whole table). The zero-gradient update is linear in ``(p, buf)``, so the missed steps are
      the product of their 2 x 2 update matrices, multiplied out in float64 with each step's own learning
      rate, rounded once to float32 and applied to the row. In exact arithmetic this is dense SGD; in
      float32 it differs at the rounding level (about 1e-7 relative per catch-up; the tests bound lazy
      against dense at 1e-5 relative after many steps). Between flushes, idle rows of the live table hold
      stale values.

    Args:
        params: ``name -> live float32 array`` (updated in place), or a callable returning that dict (read
            again at every call, for models that replace their arrays when loading a checkpoint).
        momentum: momentum factor in [0, 1).
        nesterov: Nesterov momentum (needs momentum > 0).
        weight_decay: L2 penalty added to every gradient (>= 0).
        lazy: lazy updates of ``row_param``'s rows (see above).
        row_param: the name of the row-sparse table (absent from ``params``: every parameter is dense).

    Attributes:
        steps: optimizer steps taken (the step number of the last update; a row's ``row_step`` counts in
            the same units). ``buffers``: name -> momentum buffer (created on first use). ``row_step``:
            [N] int64, per row the step it is up to date with. ``lr_runs``: ``[(first step, lr)]``, one
            entry per run of steps with an equal learning rate (what :meth:`catch_up` needs of the past).
    """

    def __init__(
        self,
        params: Params,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        lazy: bool = True,
        row_param: str = "class_embed",
    ) -> None:
        self._get = params if callable(params) else (lambda: params)
        self.momentum = check_real(momentum, "momentum", lo=0.0)
        if self.momentum >= 1.0:
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum}")
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov: expected a bool, got {type(nesterov).__name__}")
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov: Nesterov momentum requires momentum > 0 (as in torch.optim.SGD)")
        self.weight_decay = check_real(weight_decay, "weight_decay", lo=0.0)
        if not isinstance(lazy, (bool, np.bool_)):
            raise TypeError(f"sparse_embed: expected a bool, got {type(lazy).__name__}")
        self.lazy = bool(lazy)
        self.row_param = row_param
        self.steps = 0
        self.buffers: dict[str, np.ndarray] = {}
        self.lr_runs: list[tuple[int, float]] = []
        table = self._get().get(row_param)
        self.row_step = np.zeros(0 if table is None else table.shape[0], dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"SGD(momentum={self.momentum:g}, nesterov={self.nesterov}, weight_decay={self.weight_decay:g}, "
            f"lazy={self.lazy}, row_param={self.row_param!r}, steps={self.steps})"
        )

    # ------------------------------------------------------------------------------------------ updates

    def step(
        self,
        grads: Mapping[str, np.ndarray],
        lr: float,
        row_grad: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """One SGD step with learning rate ``lr``: ``steps`` becomes ``steps + 1``.

        Args:
            grads: name -> float32 gradient of the dense parameters (same shape as the parameter);
                parameters without an entry are left alone this step.
            lr: the learning rate of this step (> 0).
            row_grad: ``(ids [R] int64 unique row ids, rows [R, ...] float32)``: the gradient of
                ``row_param`` on those rows (every other row's gradient is 0), or None.
        """
        params = self._get()
        t = self.steps + 1
        lr = float(lr)
        if not self.lr_runs or self.lr_runs[-1][1] != lr:
            self.lr_runs.append((t, lr))
        for name, g in grads.items():
            self._update(name, params[name], g, lr)
        if row_grad is not None:
            ids, rows_g = row_grad
            E = params[self.row_param]
            if self.lazy:
                self.catch_up(ids, t - 1)
                self._update(self.row_param, E, rows_g, lr, rows=ids)
                self.row_step[ids] = t
            else:
                dense = np.zeros_like(E)
                dense[ids] = rows_g
                self._update(self.row_param, E, dense, lr)
                self.row_step[:] = t
        self.steps = t

    def _update(
        self, name: str, p: np.ndarray, g: np.ndarray, lr: float, rows: np.ndarray | None = None
    ) -> None:
        """One torch-SGD update of ``p`` (or of ``p[rows]``) in place, float32 arithmetic as torch does it."""
        m = np.float32(self.momentum)
        target = p if rows is None else p[rows]
        d = g + np.float32(self.weight_decay) * target if self.weight_decay != 0.0 else g
        if self.momentum != 0.0:
            buf = self.buffers.get(name)
            if rows is None:
                if buf is None:
                    buf = self.buffers[name] = d.copy()
                else:
                    buf *= m
                    buf += d
                b = buf
            else:
                if buf is None:
                    buf = self.buffers[name] = np.zeros_like(p)
                b = m * buf[rows] + d
                buf[rows] = b
            d = d + m * b if self.nesterov else b
        step = np.float32(-lr) * d
        if rows is None:
            p += step
        else:
            p[rows] = target + step

    # ------------------------------------------------------------------------------------- lazy rows

    def _idle_matrix(self, lr: float) -> np.ndarray:
        """The linear map of one zero-gradient SGD step on (p, buf): [2, 2] float64."""
        m, wd = self.momentum, self.weight_decay
        # buf' = m buf + wd p;  d = wd p + m buf' (nesterov) or buf';  p' = p - lr d
        if self.nesterov:
            d = (wd * (1.0 + m), m * m)
        else:
            d = (wd, m)
        return np.array([[1.0 - lr * d[0], -lr * d[1]], [wd, m]], dtype=np.float64)

    def _catch_up_matrix(self, start: int, stop: int) -> np.ndarray:
        """Product of the idle-step maps of steps start+1 .. stop (later steps on the left): [2, 2]."""
        out = np.eye(2)
        s = start + 1
        for i, (first, rate) in enumerate(self.lr_runs):
            end = self.lr_runs[i + 1][0] - 1 if i + 1 < len(self.lr_runs) else stop
            lo, hi = max(s, first), min(stop, end)
            if hi >= lo:
                out = np.linalg.matrix_power(self._idle_matrix(rate), hi - lo + 1) @ out
        return out

    def catch_up(self, rows: np.ndarray, to_step: int | None = None) -> None:
        """Apply the pending zero-gradient steps of ``rows`` ([R] unique int64 row ids) up to step
        ``to_step`` (default: ``steps``, i.e. make them what dense SGD would hold now)."""
        to_step = self.steps if to_step is None else int(to_step)
        if rows.size == 0 or to_step <= 0:
            return
        last = self.row_step[rows]
        stale = last < to_step
        if not stale.any():
            return
        rows, last = rows[stale], last[stale]
        E = self._get()[self.row_param]
        buf = self.buffers.get(self.row_param)
        starts, inv = np.unique(last, return_inverse=True)
        mats = np.stack([self._catch_up_matrix(int(s), to_step) for s in starts])[inv]  # [R, 2, 2]
        # the maps are multiplied out in float64; applying them to the rows in float32 (coefficients rounded
        # once) halves the memory traffic of this O(rows) pass and matches the precision of dense stepping
        coef = mats.astype(np.float32).reshape((-1, 2, 2) + (1,) * (E.ndim - 1))
        p = E[rows]
        if buf is None and self.momentum != 0.0:
            buf = self.buffers[self.row_param] = np.zeros_like(E)
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
        self.row_step[rows] = to_step

    def flush(self) -> None:
        """Bring every row of the table up to date (``lazy=True``; a no-op otherwise)."""
        if self.lazy and self.row_step.size:
            self.catch_up(np.arange(self.row_step.size, dtype=np.int64), self.steps)

    # ----------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Copies of the state, in two parts:

        * ``"replicated"``: ``steps`` (int), ``lr_runs`` (list of ``[first step, lr]``) and ``buffers``
          (name -> momentum buffer of the dense parameters): identical on every rank of a sharded model;
        * ``"rows"``: ``row_step`` [N] int64 and, once it exists, ``buffer`` (the momentum buffer of
          ``row_param``, [N, ...] float32): aligned with the table's rows (a sharded model's rank holds its
          rows of them).
        """
        rows: dict[str, np.ndarray] = {"row_step": self.row_step.copy()}
        if self.row_param in self.buffers:
            rows["buffer"] = self.buffers[self.row_param].copy()
        return {
            "replicated": {
                "steps": int(self.steps),
                "lr_runs": [[int(s), float(r)] for s, r in self.lr_runs],
                "buffers": {k: v.copy() for k, v in self.buffers.items() if k != self.row_param},
            },
            "rows": rows,
        }

    def check_state_dict(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a :meth:`state_dict` against the parameters (shapes) -> the normalised state, which
        :meth:`load_state_dict` commits; nothing changes here (ValueError on a mismatch)."""
        params = self._get()
        rep, rows = state["replicated"], state["rows"]
        buffers = dict(rep["buffers"])
        if "buffer" in rows:
            buffers[self.row_param] = rows["buffer"]
        checked = {}
        for name, arr in buffers.items():
            if name not in params or arr.shape != params[name].shape:
                want = None if name not in params else params[name].shape
                raise ValueError(
                    f"checkpoint: momentum buffer {name!r} has shape {arr.shape}, expected {want}"
                )
            checked[name] = np.array(arr, dtype=np.float32)
        row_step = np.array(rows["row_step"], dtype=np.int64)
        if row_step.shape != self.row_step.shape:
            raise ValueError(
                f"checkpoint: row counters of shape {row_step.shape}, "
                f"the model's class table needs {self.row_step.shape}"
            )
        return {
            "steps": int(rep["steps"]),
            "lr_runs": [(int(a), float(b)) for a, b in rep["lr_runs"]],
            "buffers": checked,
            "row_step": row_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (validated first: on ValueError nothing changes)."""
        self._commit(self.check_state_dict(state))

    def _commit(self, checked: Mapping[str, Any]) -> None:
        self.steps = checked["steps"]
        self.lr_runs = checked["lr_runs"]
        self.buffers = checked["buffers"]
        self.row_step = checked["row_step"]


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
