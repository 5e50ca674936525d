"""The model contract: what the training loop (``qaconv_gs.Trainer``) may ask of a model, and the code that
``QAConvGS`` (one process) and ``distributed.ShardedQAConvGS`` (class rows sharded over ranks) share.

* :class:`ModelConfig`: the constructor arguments (the ``config`` dict of both models), held once, frozen.
* :class:`TrainableModel`: the protocol the trainer uses, and nothing else: parameters, one training step,
  the rows a step will read, epoch and mode hooks, the trainer-checkpoint hooks and a communicator
  (``distributed.SingleProcessCommunicator`` for a one-process model, so the loop has one code path).
* :class:`ModelBase`: the shared half of both models (config attributes, parameters, train/eval, feature
  validation, the row hook).
* :func:`as_trainable`: a model that is not a ``ModelBase`` (any object with ``parameters()`` and
  ``forward_backward()``, e.g. a test double) wrapped so that it satisfies the protocol.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from . import losses as _losses
from ._validate import as_float32, as_labels, check_int, check_real, resolve_threads, shape_str
from .head import head_eval_affine

MAX_LOCATIONS = 65535  # QG_MAX_LOCATIONS: argmax indices are uint16
FC_MODES = ("separate", "shared")
TRIPLET_MODES = ("class", "batch")
INIT_MODES = ("imprint", "random")
NEIGHBOR_MODES = ("cosine", "aligned")
HEAD_PARAM_KEYS = ("bn.weight", "bn.bias", "fc.weight", "fc.bias", "logit_bn.weight", "logit_bn.bias")
PARAM_KEYS = ("class_embed",) + HEAD_PARAM_KEYS
ARCH_KEYS = ("num_classes", "channels", "height", "width", "fc")  # a checkpoint must match these to load
# Keys under which a model checkpoint stores the current neighbour table, the imprint counts and the
# number of imprinted classes when that table was built in its extra arrays (a loaded model then refreshes
# mid-epoch exactly when the saved one would have).
NBR_EXTRA_KEY = "_qaconv_gs.class_neighbors"
IMPRINT_EXTRA_KEY = "_qaconv_gs.imprint_counts"
IMPRINT_AT_EXTRA_KEY = "_qaconv_gs.imprinted_at_refresh"


def saved_refresh_count(at: object, num_classes: int) -> int | None:
    """The IMPRINT_AT_EXTRA_KEY value of a checkpoint as an int, or None when absent (older files) or not
    a count in [0, num_classes]."""
    if at is None:
        return None
    a = np.asarray(at)
    return int(a) if a.shape == () and a.dtype.kind in "iu" and 0 <= int(a) <= num_classes else None


# --------------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The constructor arguments of QAConvGS and ShardedQAConvGS (validated; ``as_dict()`` is ``config``)."""

    num_classes: int
    channels: int
    height: int
    width: int
    k_nearest: int = 32
    fc: str = "separate"
    triplet: str = "class"
    triplet_weight: float = 0.5
    margin: float = 1.0
    seed: int | None = None
    n_threads: int | None = None
    init: str = "imprint"
    imprint_samples: int = 64
    k_mined: int = 0
    k_batch: int = 0
    weighted_extras: bool = False
    neighbors_by: str = "cosine"

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able ``config`` dict (keys in declaration order)."""
        return {k: getattr(self, k) for k in CONFIG_KEYS}

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def choice(value: object, name: str, options: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {options}, got {type(value).__name__}")
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")
    return value


def check_config(
    num_classes: object,
    channels: object,
    height: object,
    width: object,
    k_nearest: object = 32,
    fc: object = "separate",
    triplet: object = "class",
    triplet_weight: object = 0.5,
    margin: object = 1.0,
    seed: object = None,
    n_threads: object = None,
) -> dict[str, Any]:
    """Validate QAConvGS constructor arguments -> the normalised config dict (the keys of `config`).

    Shared by QAConvGS and distributed.ShardedQAConvGS, so both refuse the same inputs with the same
    messages (TypeError / ValueError naming the argument)."""
    N = check_int(num_classes, "num_classes")
    if N < 2:
        raise ValueError(f"num_classes: expected >= 2 (every class needs at least one neighbour), got {N}")
    C = check_int(channels, "channels", lo=1)
    H = check_int(height, "height", lo=1)
    W = check_int(width, "width", lo=1)
    if H * W > MAX_LOCATIONS:
        raise ValueError(f"height * width: expected at most {MAX_LOCATIONS} locations, got {H * W}")
    k = check_int(k_nearest, "k_nearest")
    if not 1 <= k <= N - 1:
        raise ValueError(f"k_nearest: expected 1 <= k_nearest <= num_classes - 1 = {N - 1}, got {k}")
    fc_mode = choice(fc, "fc", FC_MODES)
    triplet_mode = choice(triplet, "triplet", TRIPLET_MODES)
    f32_max = float(np.finfo(np.float32).max)  # the loss kernels take these as float32
    tw = check_real(triplet_weight, "triplet_weight", lo=0.0, hi=f32_max)
    mg = check_real(margin, "margin", lo=0.0, hi=f32_max)
    sd = None if seed is None else check_int(seed, "seed", lo=0)
    if n_threads is not None:
        resolve_threads(n_threads)
    return {
        "num_classes": N,
        "channels": C,
        "height": H,
        "width": W,
        "k_nearest": k,
        "fc": fc_mode,
        "triplet": triplet_mode,
        "triplet_weight": tw,
        "margin": mg,
        "seed": sd,
        "n_threads": n_threads,
    }


def check_options(
    cfg: dict[str, Any],
    init: object,
    imprint_samples: object,
    k_mined: object,
    k_batch: object,
    weighted_extras: object,
    neighbors_by: object,
) -> dict[str, Any]:
    """The keyword-only options of QAConvGS / ShardedQAConvGS, validated (given check_config's `cfg`); the
    defaults are the constructors' (and ModelConfig's)."""
    init = choice(init, "init", INIT_MODES)
    neighbors_by = choice(neighbors_by, "neighbors_by", NEIGHBOR_MODES)
    imprint_samples = check_int(imprint_samples, "imprint_samples", lo=1)
    k_mined = check_int(k_mined, "k_mined", lo=0)
    k_batch = check_int(k_batch, "k_batch", lo=0)
    if not isinstance(weighted_extras, (bool, np.bool_)):
        raise TypeError(f"weighted_extras: expected a bool, got {type(weighted_extras).__name__}")
    weighted_extras = bool(weighted_extras)
    if weighted_extras and cfg["triplet"] == "class" and cfg["triplet_weight"] > 0:
        # the class ranking term takes the hardest negative of the raw scores; the corrected logits
        # are for the softmax only, and one kernel call computes both
        raise ValueError(
            "weighted_extras: needs triplet='batch' or triplet_weight=0 (the class triplet's hardest "
            f"negative would be taken over the corrected logits), got triplet='class', "
            f"triplet_weight={cfg['triplet_weight']}"
        )
    return {
        "init": init,
        "imprint_samples": imprint_samples,
        "k_mined": k_mined,
        "k_batch": k_batch,
        "weighted_extras": weighted_extras,
        "neighbors_by": neighbors_by,
    }


def kept_entries(old: np.ndarray, new: np.ndarray, num_classes: int) -> int:
    """How many entries of the neighbour rows ``new`` [n, k] were neighbours of the same class in ``old``
    (same shape; order inside a row ignored): the count behind both models' ``neighbor_change``."""
    off = np.arange(new.shape[0], dtype=np.int64)[:, None] * (num_classes + 1)  # row-specific ids
    return int(np.count_nonzero(np.isin(new + off, old + off)))


def eval_affine(head: Mapping[str, np.ndarray], S: int, fc: str) -> tuple[np.ndarray, float]:
    """The eval-mode head as one affine map of the maxima: (w [2S] float32, bias), as match_scores takes."""
    w, b = head_eval_affine(head, S, fc)
    return np.ascontiguousarray(w, dtype=np.float32), float(b)


def sqnorm(g: np.ndarray) -> float:
    """Sum of squares in float64 (no BLAS call: its thread pool fights the OpenMP kernels)."""
    v = g.ravel().astype(np.float64)
    return float(np.sum(v * v))


# --------------------------------------------------------------------------------------------------------
# the protocol the trainer uses
# --------------------------------------------------------------------------------------------------------


@runtime_checkable
class TrainableModel(Protocol):
    """What ``qaconv_gs.Trainer`` asks of a model (and nothing more).

    ``comm``: a ``qaconv_gs.distributed.Communicator`` (``rank``, ``agree(error)``, ...); world size 1 for
    a one-process model. Collective methods below are called by every rank in the same order.
    """

    comm: Any
    neighbor_change: float | None

    def parameters(self) -> dict[str, np.ndarray]:
        """name -> live float32 array; ``class_embed`` [rows, ...] is the row-sparse table."""

    def forward_backward(self, features: object, labels: object) -> Any:
        """One step's loss and gradients (``loss``, accuracies, ``grad_head``, ``grad_embed_ids`` (row
        indices into ``class_embed``), ``grad_embed_rows``); parameters unchanged. Collective."""

    def rows_for_step(self, labels: object) -> np.ndarray | None:
        """Row indices of ``class_embed`` the next ``forward_backward(.., labels)`` will read (None: not
        known). Collective."""

    def set_row_hook(self, hook: Callable[[np.ndarray], Any] | None) -> None:
        """``hook(row ids)`` is called inside each step before rows are read (None removes it)."""

    @property
    def neighbors_stale(self) -> bool:
        """True when the next step rebuilds the neighbour table from the whole class table."""

    def on_epoch_start(self) -> None: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def embed_grad_sqnorm(self, result: Any) -> float:
        """Squared L2 norm of a step's whole class-embedding gradient (all ranks). Collective-free."""

    def save_training_checkpoint(self, path: str | os.PathLike, extra: dict[str, np.ndarray]) -> None:
        """Write the model with the trainer's arrays ``extra`` (``checkpoint.pack_trainer_state``)."""

    def load_training_checkpoint(self, path: str | os.PathLike, parse: Callable[[dict], Any]) -> Any:
        """Read a trainer checkpoint: ``parse(trainer state)`` validates the trainer's part; then (and only
        if nothing raised) the model is loaded. Returns what ``parse`` returned."""


# --------------------------------------------------------------------------------------------------------
# the shared half of QAConvGS and ShardedQAConvGS
# --------------------------------------------------------------------------------------------------------


def _config_attribute(name: str) -> property:
    def get(self: ModelBase) -> Any:
        return getattr(self._cfg, name)

    def set_(self: ModelBase, value: Any) -> None:
        self._cfg = self._cfg.replace(**{name: value})

    return property(get, set_, doc=f"config[{name!r}] (the constructor argument)")


class ModelBase:
    """Shared by QAConvGS and ShardedQAConvGS: the config held once (``_cfg``, a :class:`ModelConfig`,
    its fields readable and settable as attributes), parameters, modes, feature validation, the row hook
    and the norm of the embedding gradient. Subclasses set ``_cfg``, ``_embed``, ``_head``, ``comm``,
    ``training`` and ``_row_hook`` in their constructor."""

    _cfg: ModelConfig
    _embed: np.ndarray
    _head: dict
    _row_hook: Callable[[np.ndarray], Any] | None = None
    _EMPTY_BATCH_OK = False  # may a forward_backward batch be empty (a rank without samples)?
    training: bool
    # imprinting: the samples averaged into each of this model's rows, and the imprinted classes (of all
    # ranks) when the neighbour table was built; _TABLE_STATE is what a rebuild of that table changes
    _imprinted: np.ndarray
    _imprinted_at_refresh: int
    _TABLE_STATE: tuple[str, ...] = (
        "_nbr",
        "_nbr_stale",
        "_imprinted_at_refresh",
        "neighbor_refreshes",
        "neighbor_change",
    )

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable); ``type(model)(**model.config)`` rebuilds it."""
        return self._cfg.as_dict()

    @property
    def S(self) -> int:
        """Locations per map, H * W."""
        return self.height * self.width

    @property
    def class_embed(self) -> np.ndarray:
        """The live class-embedding rows [rows, C, H, W] float32 (updated in place by optimisers)."""
        return self._embed

    @property
    def head_state(self) -> dict[str, np.ndarray]:
        """The live head state (parameters and running statistics), keyed like the state_dict."""
        return self._head

    def parameters(self) -> dict[str, np.ndarray]:
        """Learnable parameters: name -> the LIVE float32 array (write into it in place to update).

        Keys: class_embed, bn.weight, bn.bias, fc.weight, fc.bias, logit_bn.weight, logit_bn.bias;
        they match the keys of `StepResult.grad_head` (plus class_embed, whose gradient is sparse).
        """
        out = {"class_embed": self._embed}
        for k in HEAD_PARAM_KEYS:
            out[k] = self._head[k]
        return out

    def train(self, mode: bool = True) -> Any:
        """Training mode (default): batch-statistics computations also update the running statistics."""
        self.training = bool(mode)
        return self

    def eval(self) -> Any:
        """Eval mode: forward_backward / scores still use batch statistics but no longer update the
        running statistics (match, match_pairs, identify always use the running statistics)."""
        return self.train(False)

    def set_row_hook(self, hook: Callable[[np.ndarray], Any] | None) -> None:
        """`hook(ids)` (int64 sorted row ids) is called in every training step before the class rows
        `ids` are read for scoring (after the candidates, mined ones included, are known); None removes it.
        qaconv_gs.Trainer uses it to bring lazily updated rows up to date."""
        self._row_hook = hook

    def embed_grad_sqnorm(self, result: Any) -> float:
        """Squared L2 norm of ``result``'s class-embedding gradient (a one-process step: its rows)."""
        return sqnorm(np.asarray(result.grad_embed_rows, dtype=np.float32))

    # imprinting's bookkeeping (the arithmetic is model.imprint_rows)

    def _counts_from_rows(self, counts: object = None) -> None:
        """After new rows were loaded: the saved imprint counts of this model's rows when they fit, else a
        loaded non-zero row counts as fully imprinted and a zero row as unset."""
        n = self._embed.shape[0]
        c = None if counts is None else np.asarray(counts)
        if c is not None and c.shape == (n,) and c.dtype.kind in "iu" and (c >= 0).all():
            self._imprinted = c.astype(np.int64)
        else:
            nonzero = self._embed.reshape(n, -1).any(axis=1)
            self._imprinted = np.where(nonzero, self.imprint_samples, 0).astype(np.int64)
        self._imprinted_at_refresh = 0

    def _snapshot_rows(self, rows: np.ndarray) -> tuple:
        """What imprinting `rows` (row indices) and the table rebuild it may cause change, for
        _restore_imprint: a step that raises leaves them as they were."""
        table = {a: getattr(self, a) for a in self._TABLE_STATE}
        return rows, self._embed[rows].copy(), self._imprinted[rows].copy(), table

    def _restore_imprint(self, undo: tuple) -> None:
        rows, embed, counts, table = undo
        self._embed[rows] = embed
        self._imprinted[rows] = counts
        for a, v in table.items():
            setattr(self, a, v)

    # the candidate set of a training step (how the candidates are found is the subclass's)

    @property
    def batch_per_sample(self) -> int:
        """Extra in-batch / random candidates per sample: k_batch, capped at N - 1 - k_nearest."""
        return min(self.k_batch, self.num_classes - 1 - self.k_nearest)

    @property
    def mined_per_sample(self) -> int:
        """Classes mined per sample: k_mined, capped at the classes left after the target, the k_nearest
        neighbours and the batch_per_sample extras."""
        return min(self.k_mined, self.num_classes - 1 - self.k_nearest - self.batch_per_sample)

    @property
    def extra_weight(self) -> float:
        """With weighted_extras: the unscored classes each k_batch extra stands for, (N - 1 - k_nearest -
        mined_per_sample) / batch_per_sample; 1.0 otherwise."""
        r = self.batch_per_sample
        if not self.weighted_extras or r == 0:
            return 1.0
        return (self.num_classes - 1 - self.k_nearest - self.mined_per_sample) / r

    def _extra_columns(self) -> slice:
        """The k_batch extras' columns of a step's [B, K] candidates (after the target and neighbours)."""
        k0 = 1 + self.k_nearest
        return slice(k0, k0 + self.batch_per_sample)

    def _pair_weights(self, B: int) -> np.ndarray | None:
        """[B, K] float32 head-statistics weights of the candidates (None when unweighted)."""
        w = self.extra_weight
        if w == 1.0:
            return None
        out = np.ones((B, self.num_candidates), dtype=np.float32)
        out[:, self._extra_columns()] = np.float32(w)
        return out

    def _corrected_logits(self, scores: np.ndarray) -> np.ndarray:
        """The class loss's logits: with weighted_extras, log(extra_weight) added to the extras' columns
        (sampled softmax's log-count correction), so the restricted softmax estimates the full one."""
        w = self.extra_weight
        if w == 1.0:
            return scores
        out = np.array(scores, dtype=np.float32, copy=True).reshape(-1, self.num_candidates)
        out[:, self._extra_columns()] += np.float32(math.log(w))
        return out

    @property
    def num_candidates(self) -> int:
        """K = 1 + k_nearest + batch_per_sample + mined_per_sample classes scored per training sample."""
        return 1 + self.k_nearest + self.batch_per_sample + self.mined_per_sample

    # the loss terms of a training step (the scores, and the in-batch pairs of triplet="batch", are the
    # subclass's: a sharded model scores its own pairs and gathers them)

    def _class_loss(self, scores: np.ndarray, nt: int) -> tuple[Any, float, float]:
        """The restricted class loss of scores [B, K]: (ClassLoss, loss_triplet, acc_triplet). With
        triplet="batch" its ranking term is off (weight 0) and the triplet values are 0 until
        :meth:`_batch_triplet` gives them."""
        if self.triplet == "class":
            cl = _losses.class_loss(scores, self.margin, self.triplet_weight, n_threads=nt)
            return cl, float(cl.loss_triplet), float(cl.acc_triplet)
        return _losses.class_loss(scores, self.margin, 0.0, n_threads=nt), 0.0, 0.0

    def _batch_triplet(
        self, scores: np.ndarray, labels: np.ndarray, nt: int
    ) -> tuple[float, float, np.ndarray]:
        """The in-batch batch-hard triplet of square scores [B, B]: (loss, acc, gradient [B, B] float32,
        already times triplet_weight)."""
        tl, tgrad, tacc = _losses.batch_triplet(
            scores, labels, self.margin, return_accuracy=True, n_threads=nt
        )
        return float(tl), float(tacc), np.asarray(tgrad, dtype=np.float32) * np.float32(self.triplet_weight)

    def _loss_fields(self, cl: Any, loss_t: float, acc_t: float) -> dict[str, float]:
        """The loss and accuracy fields of a StepResult."""
        loss_cls = float(cl.loss_cls)
        return {
            "loss": loss_cls + self.triplet_weight * loss_t,
            "loss_cls": loss_cls,
            "loss_triplet": loss_t,
            "acc_cls": float(cl.acc_cls),
            "acc_triplet": acc_t,
        }

    def _eval_affine(self) -> tuple[np.ndarray, float]:
        return eval_affine(self._head, self.S, self.fc)

    def _features(self, x: object, name: str) -> np.ndarray:
        a = as_float32(x, name, ndim=4, allow_empty=self._EMPTY_BATCH_OK)
        want = (self.channels, self.height, self.width)
        if a.shape[1:] != want:
            raise ValueError(
                f"{name}: expected shape (B, {self.channels}, {self.height}, {self.width}) (model C, H, W), "
                f"got {shape_str(a.shape)}"
            )
        return a


for _name in CONFIG_KEYS:
    setattr(ModelBase, _name, _config_attribute(_name))
del _name


# --------------------------------------------------------------------------------------------------------
# any other model
# --------------------------------------------------------------------------------------------------------


def as_trainable(model: Any) -> TrainableModel:
    """``model`` itself when it is a :class:`ModelBase`, else ``model`` wrapped so that it satisfies
    :class:`TrainableModel` (needs ``parameters()`` and ``forward_backward()``; every other method is
    used when present: ``train``, ``on_epoch_start``, ``class_neighbors``, ``neighbors_stale``,
    ``neighbor_change``, ``set_row_hook``, ``save(path, extra=)``, ``load_checkpoint(path)``, ``config``;
    a model with ``comm`` and ``rows_for_step`` is taken as sharded)."""
    if isinstance(model, ModelBase):
        return model
    for attr in ("parameters", "forward_backward"):
        if not callable(getattr(model, attr, None)):
            raise TypeError(f"model: expected an object with a {attr}() method, got {type(model).__name__}")
    return _Duck(model)


def _optional(model: Any, name: str) -> Callable[..., Any] | None:
    fn = getattr(model, name, None)
    return fn if callable(fn) else None


class _Duck:
    """TrainableModel over an object that has only part of the interface (see :func:`as_trainable`)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        comm = getattr(model, "comm", None)
        self._sharded = comm is not None and _optional(model, "rows_for_step") is not None
        if self._sharded:
            for attr in ("agree", "allreduce_max"):
                if _optional(comm, attr) is None:
                    raise TypeError(
                        "model.comm: expected a qaconv_gs.distributed.Communicator, "
                        f"got {type(comm).__name__}"
                    )
        else:
            from .distributed.comm import SingleProcessCommunicator

            comm = SingleProcessCommunicator()
        self.comm = comm

    def parameters(self) -> dict[str, np.ndarray]:
        return self.model.parameters()

    def forward_backward(self, features: object, labels: object) -> Any:
        return self.model.forward_backward(features, labels)

    @property
    def neighbor_change(self) -> float | None:
        return getattr(self.model, "neighbor_change", None)

    @property
    def neighbors_stale(self) -> bool:
        return bool(getattr(self.model, "neighbors_stale", False))

    def rows_for_step(self, labels: object) -> np.ndarray | None:
        if self._sharded:
            return self.model.rows_for_step(labels)
        try:
            nbrs = self.model.class_neighbors
        except AttributeError:
            return None
        if nbrs is None:
            return None
        rows = len(self.model.parameters()["class_embed"])
        y = as_labels(labels, "labels", num_classes=rows)
        nbrs = np.asarray(nbrs)
        return np.unique(np.concatenate([y, nbrs[y].ravel().astype(np.int64)]))

    def set_row_hook(self, hook: Callable[[np.ndarray], Any] | None) -> None:
        fn = _optional(self.model, "set_row_hook")
        if fn is not None:
            fn(hook)

    def on_epoch_start(self) -> None:
        fn = _optional(self.model, "on_epoch_start")
        if fn is not None:
            fn()

    def train(self, mode: bool = True) -> Any:
        fn = _optional(self.model, "train")
        if fn is not None:
            fn()  # the interface's train() takes no argument
        return self

    def eval(self) -> Any:
        fn = _optional(self.model, "eval")
        if fn is not None:
            fn()
        return self

    def embed_grad_sqnorm(self, result: Any) -> float:
        if self._sharded:
            return float(result.grad_embed_sqnorm)
        return sqnorm(np.asarray(result.grad_embed_rows, dtype=np.float32))

    def save_training_checkpoint(self, path: str | os.PathLike, extra: dict[str, np.ndarray]) -> None:
        if self._sharded:
            from .distributed.checkpoint import save_trainer_sharded

            save_trainer_sharded(self.model, path, extra)
            return
        save = _optional(self.model, "save")
        if save is not None:
            save(path, extra=extra)
            return
        from .checkpoint import save_model_checkpoint

        save_model_checkpoint(self.model, path, extra)

    def load_training_checkpoint(self, path: str | os.PathLike, parse: Callable[[dict], Any]) -> Any:
        if self._sharded:
            from .distributed.checkpoint import load_trainer_sharded

            return load_trainer_sharded(self.model, path, parse)
        from .checkpoint import load_trainer_checkpoint

        model = self.model
        load = _optional(model, "load_checkpoint")
        if load is not None:
            load_file = lambda p, state: load(p)  # noqa: E731
        else:
            load_file = lambda p, state: model.load_state_dict(state)  # noqa: E731
        return load_trainer_checkpoint(model, path, parse, load_file)
