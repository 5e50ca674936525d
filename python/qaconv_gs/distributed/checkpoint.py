"""Sharded checkpoints: a directory with one file per rank plus a manifest; loadable with any world size.

Layout of `path/` (a directory; a shared file system when the ranks run on several machines):
    manifest.json                 {"format", "version", "generation", "config", "world_size", "bounds",
                                   "shards": [{"file", "lo", "hi"}], "head": file, "neighbors": bool}
    head-<gen>.npz                the replicated head state (qaconv_gs.checkpoint format)
    shard-<gen>-<r>-of-<R>.npz    class_embed rows [lo, hi) (+ their neighbour rows), checkpoint format

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
import tempfile

import numpy as np

from ..checkpoint import load_checkpoint, save_checkpoint
from ..model import _NBR_EXTRA_KEY, QAConvGS
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


def _write_shard(path: str, gen: str, config: dict, r: int, R: int, lo: int, hi: int, rows, nbr) -> str:
    name = f"shard-{gen}-{r:05d}-of-{R:05d}.npz"
    extra = {_SHARD_KEY: np.array([lo, hi, r, R], np.int64), _GEN_KEY: _gen_array(gen)}
    if nbr is not None:
        extra[_NBR_EXTRA_KEY] = np.asarray(nbr, np.int64)
    save_checkpoint(os.path.join(path, name), config, {"class_embed": rows}, extra=extra)
    return name


def _write_head(path: str, gen: str, config: dict, head: dict) -> str:
    name = f"head-{gen}.npz"
    save_checkpoint(os.path.join(path, name), config, dict(head), extra={_GEN_KEY: _gen_array(gen)})
    return name


def _write_manifest(
    path: str, gen: str, config: dict, bounds, files: list[str], head: str, nbr: bool
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
    }
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(path, MANIFEST))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # the new generation is committed: drop files of older saves
    keep = set(files) | {head, MANIFEST}
    for f in os.listdir(path):
        if (f.startswith("shard-") or f.startswith("head-")) and f.endswith(".npz") and f not in keep:
            try:
                os.unlink(os.path.join(path, f))
            except OSError:
                pass


def save_sharded(model, path: str | os.PathLike) -> None:
    """Write `model` (a ShardedQAConvGS) to the directory `path`. Collective: every rank writes its shard,
    rank 0 the head and then the manifest."""
    comm: Communicator = model.comm
    path = os.fspath(path)
    if comm.rank == 0:
        os.makedirs(path, exist_ok=True)
    gen = bytes(comm.broadcast(np.frombuffer(secrets.token_hex(8).encode(), np.uint8), 0)).decode()
    nbr = None if model.neighbors_stale else model.local_neighbors
    have_nbr = int(comm.allreduce_sum(np.array([0 if nbr is None else 1]))[0]) == comm.size
    config = model.config
    comm.barrier()  # the directory exists
    name = _write_shard(path, gen, config, comm.rank, comm.size, model.lo, model.hi, model.class_embed, nbr)
    names = [bytes(b).decode() for b in comm.allgather(np.frombuffer(name.encode(), np.uint8))]
    if comm.rank == 0:
        head = _write_head(path, gen, config, model.head_state)
        _write_manifest(path, gen, config, model.layout.bounds, names, head, have_nbr)
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
        names.append(
            _write_shard(path, gen, config, r, layout.world_size, lo, hi, model.class_embed[lo:hi], rows_nbr)
        )
    head = _write_head(path, gen, config, model.head_state)
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
    path: str | os.PathLike, comm: Communicator | None = None, layout: ShardLayout | None = None
):
    """This rank's ShardedQAConvGS from a sharded checkpoint directory (saved with any world size) or a
    one-process .npz checkpoint. Uses comm only for rank and size (no collective)."""
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
        nbr = extra.get(_NBR_EXTRA_KEY)
        if nbr is not None and np.asarray(nbr).shape == (model.num_classes, model.k_nearest):
            model._set_neighbors(np.asarray(nbr)[model.lo : model.hi])
        return model
    m = _read_manifest(path)
    gen = m["generation"]
    model = ShardedQAConvGS(**m["config"], comm=comm, layout=layout, _init=False)
    C, H, W = model.channels, model.height, model.width
    lo, hi = model.lo, model.hi
    embed = np.empty((hi - lo, C, H, W), np.float32)
    nbr = np.empty((hi - lo, model.k_nearest), np.int64) if m["neighbors"] else None
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
    head_state, _ = _load_file(path, m["head"], gen)
    model._embed = embed
    model._head = {k: np.array(v, copy=True) for k, v in head_state.items()}
    if nbr is not None:
        model._set_neighbors(nbr)
    return model


def load_sharded_model(path: str | os.PathLike) -> QAConvGS:
    """A one-process QAConvGS from a sharded checkpoint directory (any saved world size)."""
    return load_sharded(path, SingleProcessCommunicator()).gather_model()
