"""Sharded checkpoints: a directory with one file per rank plus a manifest; loadable with any world size.

Layout of `path/` (a directory; a shared file system when the ranks run on several machines):
    manifest.json                 {"format", "version", "generation", "config", "world_size", "bounds",
                                   "shards": [{"file", "lo", "hi"}], "head": file, "neighbors": bool}
    head-<gen>.npz                the replicated head state (qaconv_gs.checkpoint format)
    shard-<gen>-<r>-of-<R>.npz    class_embed rows [lo, hi) (+ their neighbour rows and imprint counts),
                                  checkpoint format

Every file is written atomically by qaconv_gs.checkpoint (SHA-256 checked on load). The files of one save
carry a random generation id in their names and contents; the manifest is written last (atomically), so
it is the commit point: a crash during a save leaves the previous manifest and its files intact, and the
previous generation's files are deleted only after the new manifest is in place.

Loading on R' ranks (any R', including 1) reads only the shards overlapping the rank's new range, one
at a time (memory O(own rows + one shard)). A single-process checkpoint (a .npz written by
QAConvGS.save) also loads into a sharded model (each rank reads the file and keeps its rows).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np

from .._contract import IMPRINT_AT_EXTRA_KEY as _IMPRINT_AT_EXTRA_KEY
from .._contract import IMPRINT_EXTRA_KEY as _IMPRINT_EXTRA_KEY
from .._contract import NBR_EXTRA_KEY as _NBR_EXTRA_KEY
from .._contract import saved_refresh_count
from ..checkpoint import (
    _HOST,
    TRAINER_ROW_KEYS,
    _atomic_write,
    _sweep_orphans,
    load_checkpoint,
    save_checkpoint,
    unpack_trainer_state,
)
from ..model import QAConvGS
from .comm import Communicator, SingleProcessCommunicator
from .layout import ShardLayout

__all__ = ["load_sharded", "load_sharded_model", "save_sharded", "shard_checkpoint"]

MANIFEST = "manifest.json"
FORMAT = "qaconv-gs-sharded"
FORMAT_VERSION = 1
_SHARD_KEY = "_qaconv_gs.shard"  # extra: int64 [lo, hi, rank, world_size]
_GEN_KEY = "_qaconv_gs.generation"  # extra: uint8 bytes of the generation id


def _gen_array(gen: str) -> np.ndarray:
    return np.frombuffer(gen.encode(), dtype=np.uint8).copy()


_ROW_PREFIX = "rows/"  # extra arrays aligned with the shard's class rows (re-sharded on load)


def _check_extra(extra, what: str, rows: int | None = None) -> dict[str, np.ndarray]:
    if extra is None:
        return {}
    if not hasattr(extra, "items"):
        raise TypeError(f"{what}: expected a mapping of name -> array, got {type(extra).__name__}")
    out = {}
    for k, v in extra.items():
        if not isinstance(k, str) or not k or k.startswith("_qaconv_gs."):
            raise ValueError(
                f"{what}: keys must be non-empty strings not starting with '_qaconv_gs.', got {k!r}"
            )
        a = np.asarray(v)
        if rows is not None and (a.ndim == 0 or a.shape[0] != rows):
            raise ValueError(
                f"{what}[{k!r}]: expected {rows} rows (this rank's classes), got shape {a.shape}"
            )
        out[k] = a
    return out


def _write_shard(
    path: str, gen: str, config: dict, r: int, R: int, lo: int, hi: int, rows, nbr, counts, row_extra=None
) -> str:
    name = f"shard-{gen}-{r:05d}-of-{R:05d}.npz"
    extra = {_SHARD_KEY: np.array([lo, hi, r, R], np.int64), _GEN_KEY: _gen_array(gen)}
    if counts is not None:  # init="imprint" only, as QAConvGS.save: other files count loaded rows as set
        extra[_IMPRINT_EXTRA_KEY] = np.asarray(counts, np.int64)
    if nbr is not None:
        extra[_NBR_EXTRA_KEY] = np.asarray(nbr, np.int64)
    for k, v in (row_extra or {}).items():
        extra[_ROW_PREFIX + k] = v
    save_checkpoint(os.path.join(path, name), config, {"class_embed": rows}, extra=extra)
    return name


def _write_head(path: str, gen: str, config: dict, head: dict, extra=None) -> str:
    name = f"head-{gen}.npz"
    save_checkpoint(
        os.path.join(path, name), config, dict(head), extra={**(extra or {}), _GEN_KEY: _gen_array(gen)}
    )
    return name


def _write_manifest(
    path: str, gen: str, config: dict, bounds, files: list[str], head: str, nbr: bool, row_keys=()
) -> None:
    R = len(files)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "generation": gen,
        "config": config,
        "world_size": R,
        "bounds": [int(b) for b in bounds],
        "shards": [{"file": f, "lo": int(bounds[r]), "hi": int(bounds[r + 1])} for r, f in enumerate(files)],
        "head": head,
        "neighbors": bool(nbr),
        "row_extra": sorted(row_keys),
    }
    text = json.dumps(manifest, indent=1).encode()
    _atomic_write(os.path.join(path, MANIFEST), lambda f: f.write(text))
    # the new generation is committed: drop files of older saves, and the temporaries that killed saves
    # of older generations left (their names carry the generation, so no later save to them sweeps them)
    keep = set(files) | {head, MANIFEST}
    stale_tmp = set()
    for f in os.listdir(path):
        if (f.startswith("shard-") or f.startswith("head-")) and f.endswith(".npz") and f not in keep:
            try:
                os.unlink(os.path.join(path, f))
            except OSError:
                pass
        elif f.startswith((".shard-", ".head-")) and f.endswith(".tmp") and f".{_HOST}." in f:
            stale_tmp.add(f[1:].split(f".{_HOST}.", 1)[0])
    for name in stale_tmp:
        _sweep_orphans(path, f".{name}.{_HOST}.")  # only those of dead processes of this host


def save_sharded(model, path: str | os.PathLike, *, row_extra=None, extra=None) -> None:
    """Write `model` (a ShardedQAConvGS) to the directory `path`. Collective: every rank writes its shard,
    rank 0 the head and then the manifest.

    row_extra: this rank's arrays with one row per owned class (e.g. the optimiser's momentum rows
        [hi - lo, C, H, W]); the same keys on every rank. They are re-sharded on load.
    extra: replicated arrays (e.g. optimiser scalars), taken from rank 0.
    """
    comm: Communicator = model.comm
    path = os.fspath(path)
    err: BaseException | None = None
    try:
        rx = _check_extra(row_extra, "row_extra", model.hi - model.lo)
        ex = _check_extra(extra, "extra")
        # as QAConvGS.save: a diverged model must not replace the last good checkpoint
        state = {"class_embed": model.class_embed, **model.head_state}
        bad = [k for k, v in state.items() if np.asarray(v).dtype.kind == "f" and not np.isfinite(v).all()]
        if bad:
            raise ValueError(
                f"model state: {bad} contain NaN or Inf (diverged training?); not writing {path} "
                "(an existing checkpoint is left as it was)"
            )
    except (TypeError, ValueError) as exc:
        err = exc
    comm.agree(err)
    keys = [
        bytes(b).decode() for b in comm.allgather(np.frombuffer(json.dumps(sorted(rx)).encode(), np.uint8))
    ]
    if len(set(keys)) != 1:
        raise ValueError(f"row_extra: ranks passed different keys: {[json.loads(k) for k in keys]}")
    if comm.rank == 0:
        os.makedirs(path, exist_ok=True)
    gen = bytes(comm.broadcast(np.frombuffer(secrets.token_hex(8).encode(), np.uint8), 0)).decode()
    nbr = None if model.neighbors_stale else model.local_neighbors
    have_nbr = int(comm.allreduce_sum(np.array([0 if nbr is None else 1]))[0]) == comm.size
    config = model.config
    comm.barrier()  # the directory exists
    name = _write_shard(
        path, gen, config, comm.rank, comm.size, model.lo, model.hi, model.class_embed, nbr,
        model._imprinted if model.init == "imprint" else None, rx,
    )  # fmt: skip
    names = [bytes(b).decode() for b in comm.allgather(np.frombuffer(name.encode(), np.uint8))]
    if comm.rank == 0:
        if have_nbr:  # the same on every rank
            ex[_IMPRINT_AT_EXTRA_KEY] = np.array(model._imprinted_at_refresh, np.int64)
        head = _write_head(path, gen, config, model.head_state, ex)
        _write_manifest(path, gen, config, model.layout.bounds, names, head, have_nbr, list(rx))
    comm.barrier()  # the manifest is in place before anyone reads it


def shard_checkpoint(model: QAConvGS, path: str | os.PathLike, world_size: int) -> None:
    """Write a one-process model as a sharded checkpoint for `world_size` ranks (offline, no communicator)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    layout = ShardLayout.even(model.num_classes, int(world_size))
    gen = secrets.token_hex(8)
    nbr = None if model.neighbors_stale else model.class_neighbors
    config = model.config
    names = []
    for r in range(layout.world_size):
        lo, hi = layout.range(r)
        rows_nbr = None if nbr is None else nbr[lo:hi]
        counts = model._imprinted[lo:hi] if model.init == "imprint" else None
        parts = (model.class_embed[lo:hi], rows_nbr, counts)
        names.append(_write_shard(path, gen, config, r, layout.world_size, lo, hi, *parts))
    at = {} if nbr is None else {_IMPRINT_AT_EXTRA_KEY: np.array(model._imprinted_at_refresh, np.int64)}
    head = _write_head(path, gen, config, model.head_state, at)
    _write_manifest(path, gen, config, layout.bounds, names, head, nbr is not None)


def _read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath) as f:
            m = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{mpath}: cannot read the sharded-checkpoint manifest ({exc})") from exc
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
        raise ValueError(f"{mpath}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    bounds = m.get("bounds")
    N = m.get("config", {}).get("num_classes")
    if (
        not isinstance(bounds, list)
        or len(bounds) != m.get("world_size", -1) + 1
        or bounds[0] != 0
        or bounds[-1] != N
        or any(b > c for b, c in zip(bounds, bounds[1:]))
        or len(m.get("shards", [])) != m["world_size"]
    ):
        raise ValueError(f"{mpath}: inconsistent shard bounds {bounds} for {N} classes")
    return m


def _load_file(path: str, name: str, gen: str) -> tuple[dict, dict]:
    fpath = os.path.join(path, name)
    _, state, extra = load_checkpoint(fpath)
    got = extra.get(_GEN_KEY)
    if got is None or bytes(np.asarray(got, np.uint8)).decode() != gen:
        raise ValueError(f"{fpath}: belongs to another save than the manifest (generation mismatch)")
    return state, extra


def load_sharded(
    path: str | os.PathLike,
    comm: Communicator | None = None,
    layout: ShardLayout | None = None,
    *,
    return_extra: bool = False,
):
    """This rank's ShardedQAConvGS from a sharded checkpoint directory (saved with any world size) or a
    one-process .npz checkpoint. Uses comm only for rank and size (no collective).

    With return_extra: (model, row_extra, extra): row_extra re-sharded to this rank's rows (dict), extra
    the replicated arrays (for a one-process .npz: {} and its extra arrays)."""
    from .model import ShardedQAConvGS

    comm = SingleProcessCommunicator() if comm is None else comm
    path = os.fspath(path)
    if os.path.isfile(path):  # one-process checkpoint: keep our rows
        config, state, extra = load_checkpoint(path)
        model = ShardedQAConvGS(**config, comm=comm, layout=layout, _init=False)
        rows = np.asarray(state["class_embed"], np.float32)
        if rows.shape[0] != model.num_classes:
            raise ValueError(f"{path}: class_embed has {rows.shape[0]} rows, config says {model.num_classes}")
        model._embed = np.array(rows[model.lo : model.hi], copy=True)
        model._head = {k: np.array(v, copy=True) for k, v in state.items() if k != "class_embed"}
        counts = extra.get(_IMPRINT_EXTRA_KEY)
        if counts is not None and np.shape(counts) == (model.num_classes,):
            counts = np.asarray(counts)[model.lo : model.hi]
        model._counts_from_rows(counts)
        nbr = extra.get(_NBR_EXTRA_KEY)
        if nbr is not None and np.asarray(nbr).shape == (model.num_classes, model.k_nearest):
            _adopt_neighbors(model, np.asarray(nbr)[model.lo : model.hi], extra.get(_IMPRINT_AT_EXTRA_KEY))
        return (model, {}, _public(extra)) if return_extra else model
    m = _read_manifest(path)
    gen = m["generation"]
    model = ShardedQAConvGS(**m["config"], comm=comm, layout=layout, _init=False)
    C, H, W = model.channels, model.height, model.width
    lo, hi = model.lo, model.hi
    embed = np.empty((hi - lo, C, H, W), np.float32)
    nbr = np.empty((hi - lo, model.k_nearest), np.int64) if m["neighbors"] else None
    counts: np.ndarray | None = np.zeros(hi - lo, np.int64)  # None once a shard without counts was read
    row_keys = list(m.get("row_extra", [])) if return_extra else []
    rx: dict[str, np.ndarray] = {}
    for sh in m["shards"]:
        a, b = max(lo, sh["lo"]), min(hi, sh["hi"])
        if a >= b:
            continue
        state, extra = _load_file(path, sh["file"], gen)
        rows = np.asarray(state["class_embed"], np.float32)
        info = np.asarray(extra.get(_SHARD_KEY, [-1, -1]), np.int64)
        if (
            rows.shape != (sh["hi"] - sh["lo"], C, H, W)
            or int(info[0]) != sh["lo"]
            or int(info[1]) != sh["hi"]
        ):
            raise ValueError(f"{os.path.join(path, sh['file'])}: shard rows do not match the manifest")
        embed[a - lo : b - lo] = rows[a - sh["lo"] : b - sh["lo"]]
        if nbr is not None:
            nbr[a - lo : b - lo] = np.asarray(extra[_NBR_EXTRA_KEY], np.int64)[a - sh["lo"] : b - sh["lo"]]
        saved = extra.get(_IMPRINT_EXTRA_KEY)
        if counts is not None and saved is not None and np.shape(saved) == (sh["hi"] - sh["lo"],):
            counts[a - lo : b - lo] = np.asarray(saved)[a - sh["lo"] : b - sh["lo"]]
        else:  # written before the counts were saved: counted from the rows below
            counts = None
        for k in row_keys:
            v = np.asarray(extra[_ROW_PREFIX + k])
            if k not in rx:
                rx[k] = np.empty((hi - lo,) + v.shape[1:], v.dtype)
            rx[k][a - lo : b - lo] = v[a - sh["lo"] : b - sh["lo"]]
    head_state, head_extra = _load_file(path, m["head"], gen)
    model._embed = embed
    model._head = {k: np.array(v, copy=True) for k, v in head_state.items()}
    model._counts_from_rows(counts)
    if nbr is not None:
        _adopt_neighbors(model, nbr, head_extra.get(_IMPRINT_AT_EXTRA_KEY))
    if not return_extra:
        return model
    for k in row_keys:  # a rank that owns no class still gets correctly shaped (empty) arrays
        if k not in rx:
            _, ex0 = _load_file(path, m["shards"][0]["file"], gen)
            v = np.asarray(ex0[_ROW_PREFIX + k])
            rx[k] = np.empty((0,) + v.shape[1:], v.dtype)
    return model, rx, _public(head_extra)


def _adopt_neighbors(model: Any, rows: np.ndarray, at: object) -> None:
    """Take saved neighbour rows with the number of imprinted classes when they were built. Without that
    number (files older than it) an init="imprint" model drops the rows instead: it would need every
    rank's counts (a collective) to take them as built now, and the next step rebuilds them."""
    count = saved_refresh_count(at, model.num_classes)
    if count is None and model.init == "imprint":
        return
    model._set_neighbors(rows)
    model._imprinted_at_refresh = 0 if count is None else count


def _public(extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A file's extra arrays without the reserved '_qaconv_gs.' ones (what callers passed as extra)."""
    return {k: v for k, v in extra.items() if not k.startswith("_qaconv_gs.")}


def load_sharded_model(path: str | os.PathLike) -> QAConvGS:
    """A one-process QAConvGS from a sharded checkpoint directory (any saved world size)."""
    return load_sharded(path, SingleProcessCommunicator()).gather_model()


# --------------------------------------------------------------------------------------------------------
# trainer checkpoints (the trainer's arrays as extras of a sharded directory; see qaconv_gs.checkpoint)
# --------------------------------------------------------------------------------------------------------


def read_head(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, replicated extra arrays) of a sharded checkpoint directory, reading only the manifest and
    the head file (not the class rows)."""
    path = os.fspath(path)
    m = _read_manifest(path)
    _, extra = _load_file(path, m["head"], m["generation"])
    return dict(m["config"]), _public(extra)


def load_sharded_whole(path: str | os.PathLike) -> tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A sharded checkpoint directory read by one process: (one-rank ShardedQAConvGS, its state dict, the
    extra arrays with the row arrays (whole table) merged in)."""
    model, rows, extra = load_sharded(path, return_extra=True)
    return model, model.state_dict(), {**extra, **rows}


def save_trainer_sharded(model: Any, path: str | os.PathLike, extra: dict[str, np.ndarray]) -> None:
    """A sharded trainer checkpoint: ``extra`` (qaconv_gs.checkpoint.pack_trainer_state of this rank's
    trainer) split into the per-row arrays (with this rank's rows) and the replicated rest. Collective."""
    extra = dict(extra)
    rows = {k: extra.pop(k) for k in TRAINER_ROW_KEYS if k in extra}
    # every rank must pass the same keys: a rank whose momentum buffer was never created (it owned no row
    # of any step yet) saves zeros, which is what that buffer holds in effect
    buf_key = TRAINER_ROW_KEYS[0]
    have = bool(model.comm.allreduce_max(np.array([buf_key in rows], np.int8))[0])
    if have and buf_key not in rows:
        rows[buf_key] = np.zeros_like(model.class_embed)
    model.save(path, row_extra=rows, extra=extra)


def load_trainer_sharded(model: Any, path: str | os.PathLike, parse: Callable[[dict[str, Any]], Any]) -> Any:
    """Read a trainer checkpoint (a sharded directory of any world size, or a one-process file: its
    whole-table row arrays are cut to this rank's rows) into a sharded model: read and ``parse`` (validate)
    the trainer state on every rank, agree, then load the model. Collective: a failure on one rank raises
    on every rank and no model changes. Returns what ``parse`` returned."""
    err: BaseException | None = None
    loaded = parsed = None
    try:
        loaded, rows, extra = model._read_checkpoint(path)
        extra = dict(extra)
        lo, hi = model.lo, model.hi
        for k in TRAINER_ROW_KEYS:  # a one-process trainer checkpoint holds whole-table rows: keep ours
            if k not in rows and k in extra and np.ndim(extra[k]) and len(extra[k]) == model.num_classes:
                rows[k] = np.asarray(extra.pop(k))[lo:hi]
        parsed = parse(unpack_trainer_state({**extra, **rows}, path))
    except (OSError, TypeError, ValueError) as exc:
        err = exc
    model.comm.agree(err)
    model._assign(loaded)
    return parsed
