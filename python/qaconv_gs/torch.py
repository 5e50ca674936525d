"""Optional PyTorch front end: a loss module whose forward and backward run on the qaconv-gs C kernels.

    from qaconv_gs.torch import QAConvGSLoss, NeighborRefresh
    criterion = QAConvGSLoss(num_classes=N, channels=C, height=H, width=W, k_nearest=32)
    opt = torch.optim.SGD(list(backbone.parameters()) + list(criterion.parameters()), lr=0.005)
    loss = criterion(backbone(images), labels)   # features [B, C, H, W] float CPU tensor
    loss.backward(); opt.step()
    ...; criterion.on_epoch_start()              # every epoch (or NeighborRefresh() with Lightning)

Importing this module does not import torch; using QAConvGSLoss without torch installed raises an
ImportError that says so. NeighborRefresh needs neither torch nor Lightning (it duck-types the hook,
and becomes a real Lightning Callback subclass when Lightning is already imported).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["NeighborRefresh", "QAConvGSLoss"]  # noqa: F822 - QAConvGSLoss is built lazily

_cache: dict[str, Any] = {}


def _require_torch():
    try:
        import torch
    except ImportError as exc:
        raise ImportError(
            "qaconv_gs.torch.QAConvGSLoss needs PyTorch, which is not installed "
            "(pip install torch); the NumPy API (qaconv_gs.QAConvGS) works without it"
        ) from exc
    return torch


def _build() -> dict[str, Any]:
    """Define the torch classes on first use (so importing this module never imports torch)."""
    if _cache:
        return _cache
    torch = _require_torch()
    import numpy as np
    from torch import nn
    from torch.autograd.function import once_differentiable

    from .distributed import ShardedQAConvGS
    from .model import _HEAD_PARAM_KEYS, QAConvGS

    def _sharded(core) -> bool:
        return isinstance(core, ShardedQAConvGS)

    class _QAConvGSStep(torch.autograd.Function):
        """loss = QAConvGS step(features, params); backward returns the gradients the C kernels computed."""

        @staticmethod
        def forward(ctx, features, class_embed, bn_w, bn_b, fc_w, fc_b, lbn_w, lbn_b, module, labels):
            core = module._sync()
            x = features.detach()
            if x.device.type != "cpu" or x.dtype != torch.float32:
                x = x.to(device="cpu", dtype=torch.float32)
            lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
            res = core.forward_backward(x.numpy(), lab)
            module._after_step(core, res)
            ctx.res = res
            # autograd frees saved tensors after a backward without retain_graph: reading them then
            # raises torch's own "backward through the graph a second time" error, and a retained
            # graph can run backward again (res stays with ctx for as long as the graph lives)
            ctx.save_for_backward(torch.empty(0))
            ctx.embed_shape = tuple(class_embed.shape)
            ctx.feature_meta = (features.device, features.dtype)
            ctx.param_meta = [(p.device, p.dtype) for p in (bn_w, bn_b, fc_w, fc_b, lbn_w, lbn_b)]
            dtype = features.dtype if features.is_floating_point() else torch.float32
            return torch.tensor(res.loss, dtype=dtype, device=features.device)

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_out):
            ctx.saved_tensors  # noqa: B018 - raises once the graph was freed
            res = ctx.res
            g64 = grad_out.detach().to("cpu", torch.float64)
            # loss.backward() seeds 1.0: then scaling in float64 and rounding back to float32 returns the
            # float32 gradients unchanged, so the copies and casts are skipped (same bits, less time)
            unit = bool(g64 == 1.0)
            need = ctx.needs_input_grad
            grads: list[Any] = [None] * 10
            if need[0]:
                dev, dt = ctx.feature_meta
                gf = torch.from_numpy(res.grad_features)
                # never a view of res: autograd may keep the tensor as .grad and add a second backward's
                # gradient (of the same res, with retain_graph) into it in place
                grads[0] = (gf.clone() if unit else gf.to(torch.float64) * g64).to(dev, dt)
            if need[1]:
                # rows scattered in NumPy: torch's indexed assignment costs ~1 ms a step at N = 2,000
                ge = np.zeros(ctx.embed_shape, dtype=np.float32)
                rows = res.grad_embed_rows
                ge[res.grad_embed_ids] = (
                    rows if unit else (rows.astype(np.float64) * float(g64)).astype(np.float32)
                )
                grads[1] = torch.from_numpy(ge)
            for i, key in enumerate(_HEAD_PARAM_KEYS):
                if need[2 + i]:
                    dev, dt = ctx.param_meta[i]
                    gk = torch.from_numpy(np.asarray(res.grad_head[key], dtype=np.float64))
                    # a copy either way: a float64 parameter's .to() would alias res (see the features)
                    grads[2 + i] = (gk.clone() if unit else gk * g64).to(dev, dt)
            return tuple(grads)

    class QAConvGSLoss(nn.Module):
        """QAConv-GS loss as an nn.Module: features [B, C, H, W] + labels [B] -> scalar loss tensor.

        Same arguments as qaconv_gs.QAConvGS (init="imprint" by default, sharded too: the forward writes
        imprinted rows into class_embed in place, outside autograd, before scoring).
        Parameters: class_embed [N, C, H, W] and the head
        (bn, fc, logit_bn as nn.BatchNorm1d(1) / nn.Linear submodules, so state_dict keys equal
        QAConvGS.state_dict()'s and the running statistics are buffers). Forward and backward call
        the C kernels; parameters must stay float32 CPU tensors, features may be any float dtype or
        device (they are copied to the CPU for the kernels and the gradient goes back).
        `last_result` holds the StepResult of the last forward (accuracies, scores, candidates).
        Training mode updates the running statistics; eval mode computes the same batch-statistics
        loss without updating them (see QAConvGS.eval).

        Sharded (`comm=` a qaconv_gs.distributed communicator, e.g. init_communicator("torch") under
        torchrun; or from_model(a ShardedQAConvGS)): every rank builds the module and calls it with its
        part of the global batch, in the same order (forward is collective). The loss is the global
        batch's (the same value on every rank); `features.grad` is the gradient of that loss for this
        rank's samples; `class_embed` holds this rank's rows only (its gradient likewise); the head's
        gradients are already summed over ranks, so the same optimiser on every rank keeps the head
        identical. Do not wrap this module in DistributedDataParallel. A backbone under DDP gets the
        average over ranks of the per-rank gradients, i.e. 1 / world_size of the global-batch gradient
        (scale its learning rate by world_size to match a one-process run).
        """

        def __init__(
            self,
            num_classes,
            channels,
            height,
            width,
            k_nearest=32,
            fc="separate",
            triplet="class",
            triplet_weight=0.5,
            margin=1.0,
            seed=None,
            n_threads=None,
            *,
            comm=None,
            init="imprint",
            imprint_samples=64,
            k_mined=0,
            k_batch=0,
            weighted_extras=False,
            neighbors_by="cosine",
        ):
            super().__init__()
            kwargs = dict(
                k_nearest=k_nearest,
                fc=fc,
                triplet=triplet,
                triplet_weight=triplet_weight,
                margin=margin,
                seed=seed,
                n_threads=n_threads,
                # keyword-only options both models take (the sharded one refuses what it cannot do yet)
                imprint_samples=imprint_samples,
                k_mined=k_mined,
                k_batch=k_batch,
                weighted_extras=weighted_extras,
                neighbors_by=neighbors_by,
            )
            if comm is None:
                core = QAConvGS(num_classes, channels, height, width, **kwargs, init=init)
            else:
                core = ShardedQAConvGS(num_classes, channels, height, width, **kwargs, init=init, comm=comm)
            self._init_from(core)

        def _init_from(self, core: QAConvGS) -> None:
            self._core = core
            fan = 2 * core.S if core.fc == "separate" else core.S
            self.class_embed = nn.Parameter(torch.empty(core.class_embed.shape, dtype=torch.float32))
            self.bn = nn.BatchNorm1d(1)
            # skip_init: the weights are overwritten below, and torch's global RNG stays untouched
            self.fc = torch.nn.utils.skip_init(nn.Linear, fan, 1)
            self.logit_bn = nn.BatchNorm1d(1)
            state = {k: torch.from_numpy(np.array(v)) for k, v in core.state_dict().items()}
            nn.Module.load_state_dict(self, state, strict=True)
            self.last_result = None

        @classmethod
        def from_model(cls, model: QAConvGS | ShardedQAConvGS) -> QAConvGSLoss:
            """A loss module with `model`'s config and a copy of its weights and running statistics (a
            ShardedQAConvGS gives a sharded module on the model's communicator: this rank's rows)."""
            if not isinstance(model, (QAConvGS, ShardedQAConvGS)):
                raise TypeError(
                    f"model: expected a qaconv_gs.QAConvGS or ShardedQAConvGS, got {type(model).__name__}"
                )
            obj = cls.__new__(cls)
            nn.Module.__init__(obj)
            if _sharded(model):
                core = model.copy()
            else:
                core = QAConvGS.from_config(model.config)
                core.load_state_dict(model.state_dict())
                core._imprinted = model._imprinted.copy()
                core.training = model.training
            obj._init_from(core)
            obj.train(model.training)
            return obj

        def to_model(self) -> QAConvGS | ShardedQAConvGS:
            """A standalone NumPy model (QAConvGS, or this rank's ShardedQAConvGS) with this module's
            config and a copy of its current state."""
            if _sharded(self._core):
                m = self._core.copy()
                state = {k: np.array(v.detach().numpy(), copy=True) for k, v in self.state_dict().items()}
                m._embed = state.pop("class_embed")
                m._head = state
                return m.train(self.training)
            m = QAConvGS.from_config(self._core.config)
            m.load_state_dict(self.state_dict())
            return m.train(self.training)

        @property
        def config(self) -> dict:
            return self._core.config

        # The NumPy model computes on views of this module's tensors, bound afresh every call, so
        # optimizer updates, load_state_dict and .to() in between are all seen.
        def _tensor_view(self, t, name):
            if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.int64):
                raise TypeError(
                    f"QAConvGSLoss.{name}: kernels need float32 CPU parameters, got {t.dtype} on {t.device}; "
                    f"keep the loss module on the CPU in float32 (features may live elsewhere)"
                )
            if not t.is_contiguous():
                raise ValueError(f"QAConvGSLoss.{name}: expected a contiguous tensor")
            return t.detach().numpy()

        def _tensors(self) -> dict:
            out = {"class_embed": self.class_embed}
            for pre in ("bn", "logit_bn"):
                mod = getattr(self, pre)
                out.update(
                    {
                        f"{pre}.weight": mod.weight,
                        f"{pre}.bias": mod.bias,
                        f"{pre}.running_mean": mod.running_mean,
                        f"{pre}.running_var": mod.running_var,
                        f"{pre}.num_batches_tracked": mod.num_batches_tracked,
                    }
                )
            out.update({"fc.weight": self.fc.weight, "fc.bias": self.fc.bias})
            return out

        def _sync(self) -> QAConvGS:
            core = self._core
            views = {k: self._tensor_view(t, k) for k, t in self._tensors().items()}
            emb = views.pop("class_embed")
            if emb.shape != core.class_embed.shape:
                raise ValueError(
                    f"QAConvGSLoss.class_embed: expected shape {core.class_embed.shape}, got {emb.shape}"
                )
            core._embed = emb
            core._head.update(views)
            core.training = self.training
            self._views = views
            return core

        def _after_step(self, core: QAConvGS, res) -> None:
            # Running statistics are updated in place in the views; copy back any the head replaced.
            for k, v in self._views.items():
                cur = core._head[k]
                if cur is not v:
                    np.copyto(v, np.asarray(cur, dtype=v.dtype).reshape(v.shape))
                    core._head[k] = v
            self.last_result = res

        def forward(self, features, labels):
            """features [B, C, H, W] float tensor (any device), labels [B] ints -> loss (0-d tensor)."""
            err: BaseException | None = None
            try:
                if not isinstance(features, torch.Tensor):
                    raise TypeError(f"features: expected a torch.Tensor, got {type(features).__name__}")
                if not features.is_floating_point():
                    raise TypeError(f"features: expected a floating-point tensor, got {features.dtype}")
                self._sync()  # the parameters' dtype, device, layout and shape
            except (TypeError, ValueError) as exc:
                err = exc
            if _sharded(self._core):  # forward is collective: one rank's bad input raises on every rank
                self._core.comm.agree(err)
            elif err is not None:
                raise err
            return _QAConvGSStep.apply(
                features,
                self.class_embed,
                self.bn.weight,
                self.bn.bias,
                self.fc.weight,
                self.fc.bias,
                self.logit_bn.weight,
                self.logit_bn.bias,
                self,
                labels,
            )

        # ---- neighbours (delegated to the NumPy model)
        @property
        def class_neighbors(self):
            """[N, k] neighbour table (sharded: the whole table gathered, collective)."""
            self._sync()
            if _sharded(self._core):
                return self._core.gather_neighbors()
            return self._core.class_neighbors

        def on_epoch_start(self) -> None:
            """Mark the neighbour table stale; the next forward recomputes it from class_embed."""
            self._core.on_epoch_start()

        def refresh_neighbors(self):
            self._sync()
            return self._core.refresh_neighbors()

        @property
        def neighbor_refreshes(self) -> int:
            return self._core.neighbor_refreshes

        @property
        def neighbor_change(self) -> float:
            return self._core.neighbor_change

        def load_state_dict(self, state_dict, strict=True, assign=False):
            out = super().load_state_dict(state_dict, strict=strict, assign=assign)
            self._core.on_epoch_start()  # new embeddings: neighbours must follow
            self._sync()
            self._core._counts_from_rows()  # loaded rows count as imprinted, zero rows as unset
            return out

        # ---- evaluation helpers (eval-mode head, running statistics)
        def match(self, probe, gallery):
            """Eval-mode scores [P, G] as a float32 tensor (no gradient)."""
            return torch.from_numpy(self._sync().match(probe, gallery))

        def identify(self, features, top=5):
            """Eval-mode top classes: (ids [B, top] int64, scores [B, top] float32) tensors, best first.

            Sharded: collective, ShardedQAConvGS.identify (no rank assembles the table): every rank
            passes its own probes (B_r = 0 allowed) and the same top, and gets its own probes' results."""
            ids, sc = self._sync().identify(features, top=top)
            return torch.from_numpy(ids), torch.from_numpy(sc)

        def extra_repr(self) -> str:
            c = self._core
            where = f"rank {c.comm.rank}/{c.comm.size}, rows [{c.lo}, {c.hi}), " if _sharded(c) else ""
            return where + (
                f"num_classes={c.num_classes}, channels={c.channels}, height={c.height}, width={c.width}, "
                f"k_nearest={c.k_nearest}, fc={c.fc!r}, triplet={c.triplet!r}, "
                f"triplet_weight={c.triplet_weight:g}, margin={c.margin:g}"
            )

    # built inside this function, but pickled by reference to this module's lazy attributes
    for cls in (QAConvGSLoss, _QAConvGSStep):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    _cache.update(QAConvGSLoss=QAConvGSLoss, _QAConvGSStep=_QAConvGSStep)
    return _cache


def __getattr__(name: str):
    if name in ("QAConvGSLoss", "_QAConvGSStep"):
        return _build()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------ Lightning-style callback

_mixed_types: dict[type, type] = {}


def _lightning_callback_base() -> type | None:
    """Lightning's Callback class if Lightning is already imported (never imports it ourselves)."""
    for mod in ("lightning.pytorch", "pytorch_lightning"):
        m = sys.modules.get(mod)
        base = getattr(m, "Callback", None) if m is not None else None
        if isinstance(base, type):
            return base
    return None


def _targets(pl_module: Any) -> list:
    """Objects below pl_module that own a neighbour table (QAConvGSLoss modules or QAConvGS models)."""

    def owns(obj: Any) -> bool:
        return callable(getattr(obj, "refresh_neighbors", None)) and callable(
            getattr(obj, "on_epoch_start", None)
        )

    found: list = []
    seen: set[int] = set()

    def add(obj: Any) -> None:
        if id(obj) not in seen and owns(obj):
            seen.add(id(obj))
            found.append(obj)

    add(pl_module)
    modules = getattr(pl_module, "modules", None)
    if callable(modules):
        try:
            for m in modules():
                add(m)
        except TypeError:
            pass
    for v in list(getattr(pl_module, "__dict__", {}).values()):
        add(v)
    return found


class NeighborRefresh:
    """Callback that marks the QAConv-GS neighbour table stale at every training epoch start.

    Works with Lightning (`Trainer(callbacks=[NeighborRefresh()])`; an instance is a real
    `Callback` subclass when Lightning is imported before it is created) and with any loop that
    calls `on_train_epoch_start(trainer, pl_module)`.

    Args:
        target: the QAConvGSLoss (or QAConvGS) to refresh; None finds every such object among
            pl_module, its submodules and its attributes at each epoch start (error if none).
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        base = _lightning_callback_base()
        if base is not None and not issubclass(cls, base):
            mixed = _mixed_types.get(cls)
            if mixed is None:
                mixed = type(
                    cls.__name__,
                    (cls, base),
                    {"__module__": cls.__module__, "__qualname__": cls.__qualname__},
                )
                _mixed_types[cls] = mixed
            cls = mixed
        return object.__new__(cls)

    def __init__(self, target: Any = None) -> None:
        self.target = target
        self.calls = 0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        targets = [self.target] if self.target is not None else _targets(pl_module)
        if not targets:
            raise RuntimeError(
                "NeighborRefresh: found no QAConvGSLoss / QAConvGS in the module; pass it explicitly, "
                "NeighborRefresh(target=loss_module)"
            )
        for t in targets:
            t.on_epoch_start()
        self.calls += 1

    def __repr__(self) -> str:
        return f"NeighborRefresh(target={type(self.target).__name__ if self.target is not None else None})"
