"""Checkpoints: one .npz file holding a format version, the model config, the state dict and extra arrays.

Layout inside the (uncompressed) zip archive:
    __meta__            uint8 JSON: {"format", "version", "config", "state_keys", "extra_keys", "sha256", ...}
    state/<key>         one array per state_dict entry (PyTorch key names)
    extra/<key>         optional arrays (e.g. optimizer state, epoch counters)

The SHA-256 covers the config and every array's name, dtype, shape and bytes, so a flipped bit
anywhere is detected even where the zip CRC is not checked. Writes are atomic: a temporary file in
the target directory is written, flushed and fsynced, renamed over the target with os.replace, and
the directory is fsynced, so a crash leaves either the old file or the new one, never a torn file.
Loading never unpickles (allow_pickle=False).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np

from ._contract import ARCH_KEYS

__all__ = ["FORMAT", "FORMAT_VERSION", "load_checkpoint", "save_checkpoint"]

FORMAT = "qaconv-gs-checkpoint"
FORMAT_VERSION = 1
_META = "__meta__"
_STATE = "state/"
_EXTRA = "extra/"


def _as_array(value: object, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) and hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()  # torch tensor, without importing torch
    try:
        a = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: could not be converted to an array ({exc})") from None
    if a.dtype.kind not in "biufcUS":
        raise TypeError(f"{name}: expected a numeric, bool or string array, got dtype {a.dtype}")
    return np.require(a, requirements="C")  # keeps 0-d arrays 0-d (ascontiguousarray would not)


def _check_arrays(arrays: object, what: str) -> dict[str, np.ndarray]:
    if arrays is None:
        return {}
    if not isinstance(arrays, Mapping):
        raise TypeError(f"{what}: expected a mapping of name -> array, got {type(arrays).__name__}")
    out = {}
    for k, v in arrays.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"{what}: keys must be non-empty strings, got {k!r}")
        out[k] = _as_array(v, f"{what}[{k!r}]")
    return out


def _digest(header: dict, arrays: list[tuple[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for name, a in arrays:
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(np.require(a, requirements="C").reshape(-1).view(np.uint8))
    return h.hexdigest()


def _signed_header(config: dict, state_keys: list[str], extra_keys: list[str]) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": config,
        "state_keys": state_keys,
        "extra_keys": extra_keys,
    }


def _fsync_dir(directory: str) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_HOST = socket.gethostname().replace(os.sep, "_") or "host"


def _sweep_orphans(directory: str, prefix: str) -> None:
    """Delete temporary files left by saves to the same target whose process died (SIGKILL, power loss).

    Temporary names are `.<name>.<host>.<pid>.<random>.tmp`; only files of this host whose pid no longer
    exists are removed, so a save in flight in another live process is never touched.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid_text = name[len(prefix) :].split(".", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # alive (or pid reused): leave it
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, ValueError):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def save_checkpoint(
    path: str | os.PathLike,
    model_config: Mapping[str, Any],
    state: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Atomically write `model_config` (JSON-serialisable), `state` and optional `extra` arrays to `path`.

    The file is written exactly at `path` (no suffix is appended). Values may be NumPy arrays,
    scalars or torch tensors; object arrays are refused.
    """
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}") from None
    if not isinstance(model_config, Mapping):
        raise TypeError(f"model_config: expected a mapping, got {type(model_config).__name__}")
    config = dict(model_config)
    try:
        config = json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"model_config: must be JSON-serialisable with finite numbers ({exc})") from None
    st = _check_arrays(state, "state")
    ex = _check_arrays(extra, "extra")
    header = _signed_header(config, list(st), list(ex))
    ordered = [(_STATE + k, v) for k, v in st.items()] + [(_EXTRA + k, v) for k, v in ex.items()]
    meta = dict(header, sha256=_digest(header, ordered), library="qaconv_gs")
    arrays = {_META: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    arrays.update(ordered)

    _atomic_write(path, lambda f: np.savez(f, **arrays))


def _atomic_write(path: str, write_fn: Callable[[BinaryIO], None]) -> None:
    """Write `path` atomically: write_fn(f) fills a temporary file in the same directory, which is
    flushed, fsynced and renamed over `path`; then the directory is fsynced. A crash leaves the old file
    or the new one, never a torn one. The temporary is `.NAME.<host>.<pid>.<random>.tmp`; temporaries of
    dead processes saving to the same target are swept first. An existing file's permissions are kept
    (new files get 0644). On any error (KeyboardInterrupt included) the temporary is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    mode = 0o644
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        pass
    prefix = f".{os.path.basename(path)}.{_HOST}."
    _sweep_orphans(directory, prefix)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, mode)  # mkstemp creates 0600; give the checkpoint ordinary permissions
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read a checkpoint written by save_checkpoint -> (config, state, extra).

    Raises FileNotFoundError for a missing file and ValueError (naming the file and the problem) for
    a truncated, corrupt, wrong-format, wrong-version or checksum-mismatched one.
    """
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}") from None
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, expected a checkpoint file")

    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: not a valid qaconv-gs checkpoint: {why}")

    try:
        z = np.load(path, allow_pickle=False)
    except (KeyboardInterrupt, PermissionError):
        raise
    except Exception as exc:  # not a zip/npy (pickle refused), unreadable header...
        raise bad(f"unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise bad("not an .npz archive")
    try:
        with z:
            arrays = {name: z[name] for name in z.files}
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # zipfile.BadZipFile (CRC), zlib.error, EOFError, ValueError, struct.error...
        raise bad(f"corrupt or truncated ({type(exc).__name__}: {exc})") from exc

    odd = [n for n, a in arrays.items() if not isinstance(a, np.ndarray)]
    if odd:
        raise bad(f"entries that are not arrays: {odd}")
    if _META not in arrays:
        raise bad(f"no {_META} entry (not written by qaconv_gs.save_checkpoint)")
    try:
        meta = json.loads(arrays.pop(_META).astype(np.uint8).tobytes().decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"corrupt metadata ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    version = meta.get("version")
    if version != FORMAT_VERSION:
        raise bad(f"format version {version!r}, this qaconv_gs reads version {FORMAT_VERSION}")
    config, state_keys, extra_keys = meta.get("config"), meta.get("state_keys"), meta.get("extra_keys")
    if (
        not isinstance(config, dict)
        or not isinstance(state_keys, list)
        or not isinstance(extra_keys, list)
        or not all(isinstance(k, str) for k in state_keys + extra_keys)
    ):
        raise bad("malformed metadata")
    names = [_STATE + k for k in state_keys] + [_EXTRA + k for k in extra_keys]
    missing = [n for n in names if n not in arrays]
    unlisted = sorted(set(arrays) - set(names))
    if missing or unlisted:
        raise bad(f"entries do not match the metadata (missing {missing}, unlisted {unlisted})")
    ordered = [(n, arrays[n]) for n in names]
    header = _signed_header(config, state_keys, extra_keys)
    if _digest(header, ordered) != meta.get("sha256"):
        raise bad("SHA-256 checksum mismatch (the file is corrupt)")
    state = {k: arrays[_STATE + k] for k in state_keys}
    extra = {k: arrays[_EXTRA + k] for k in extra_keys}
    return config, state, extra


# --------------------------------------------------------------------------------------------------------
# trainer checkpoints (one process)
# --------------------------------------------------------------------------------------------------------
# A trainer checkpoint is a model checkpoint whose extra arrays also hold the trainer's state:
#     extra/trainer/meta               uint8 JSON: format "qaconv_gs.trainer", version, hyper, schedule, seed,
#                                      epoch, global_step, lr_now, lr_runs, history_epochs
#     extra/trainer/buffer/<param>     momentum buffers (float32, the parameter's shape)
#     extra/trainer/history/<column>   per-step history columns (int64 or float64)
#     extra/trainer/row_step           [N] int64: per class row, the step it is up to date with
# A sharded trainer checkpoint (distributed.checkpoint) is a sharded directory with the same keys: the
# per-row ones (TRAINER_ROW_KEYS) go with each rank's rows, the rest with the head.

TRAINER_PREFIX = "trainer/"
TRAINER_ROW_KEYS = (TRAINER_PREFIX + "buffer/class_embed", TRAINER_PREFIX + "row_step")


_HEAD_PREFIXES = ("bn", "fc", "logit_bn")


def load_head_for_maps(
    path: str | os.PathLike, maps: tuple[int, ...], *, checkpoint_name: str, maps_name: str
) -> dict[str, np.ndarray]:
    """The QAConv head (bn.*, fc.*, logit_bn.*) of a model or trainer checkpoint, for maps of shape
    `maps` = (C, H, W). The checkpoint's model must have been built for that shape (the head's size alone
    cannot tell: a "separate" head for 2 x 4 locations has the size of a "shared" one for 4 x 4), and its
    fc.weight must fit both the saved fc mode and S = H * W. Errors (ValueError) start with the name of
    the offending command-line option: `checkpoint_name` or `maps_name`."""
    from .evaluate import head_fc_kind

    try:
        config, state, _ = load_checkpoint(path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{checkpoint_name}: {exc}") from None
    head = {k: np.asarray(v) for k, v in state.items() if k.split(".")[0] in _HEAD_PREFIXES}
    if "fc.weight" not in head:
        raise ValueError(f"{checkpoint_name}: {str(path)!r} holds no QAConv head (no 'fc.weight')")
    want = tuple(config.get(k) for k in ("channels", "height", "width"))
    if want != tuple(maps):
        raise ValueError(
            f"{maps_name}: maps of shape (C, H, W) = {tuple(maps)}, but the checkpoint {str(path)!r} was "
            f"built for {want}"
        )
    S = int(maps[1] * maps[2])
    try:
        kind = head_fc_kind(head, S)
    except ValueError as exc:
        raise ValueError(f"{checkpoint_name}: {str(path)!r}: {exc}") from None
    if config.get("fc") not in (None, kind):
        raise ValueError(
            f"{checkpoint_name}: {str(path)!r} has an fc.weight of {kind!r} size, but its config says "
            f"fc={config['fc']!r}"
        )
    return head


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return repr(o)  # e.g. an object a callback put into the epoch stats


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy scalars and arrays as Python numbers and lists (anything else as its repr)."""
    return json.loads(json.dumps(obj, default=_json_default))


def pack_trainer_state(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A trainer's ``state_dict()`` (``{"meta": JSON-able dict, "arrays": name -> array}``) as the extra
    arrays of a checkpoint (``trainer/meta`` as uint8 JSON, ``trainer/<name>`` for each array)."""
    meta = json.dumps(state["meta"], default=_json_default).encode("utf-8")
    extra = {TRAINER_PREFIX + "meta": np.frombuffer(meta, dtype=np.uint8)}
    for k, v in state["arrays"].items():
        extra[TRAINER_PREFIX + k] = v
    return extra


def unpack_trainer_state(
    extra: Mapping[str, np.ndarray], path: str | os.PathLike, need_rows: bool = True
) -> dict[str, Any]:
    """The trainer part of a checkpoint's extra arrays, as the trainer's ``state_dict()`` returns it
    (ValueError when absent or corrupt; ``need_rows``: the row counters must be there too)."""
    key = TRAINER_PREFIX + "meta"
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
        k[len(TRAINER_PREFIX) :]: v for k, v in extra.items() if k.startswith(TRAINER_PREFIX) and k != key
    }
    if need_rows and "row_step" not in arrays:
        raise ValueError(f"checkpoint: {os.fspath(path)!r} lacks the optimizer's row counters")
    return {"meta": meta, "arrays": arrays}


TRAINER_FORMAT = "qaconv_gs.trainer"
TRAINER_VERSION = 1
_INT_COLUMNS = ("step", "epoch", "batch_size")  # history columns stored as int64 (the rest float64)


def encode_trainer_state(
    hyper: Mapping[str, Any],
    schedule: Any,
    loop: Mapping[str, Any],
    optimizer_state: Mapping[str, Any],
    buffer_order: list[str],
    history: Any,
) -> dict[str, Any]:
    """A trainer's state as ``{"meta": JSON-able dict, "arrays": name -> array}`` (Trainer.state_dict).

    ``hyper``: the Trainer's constructor hyperparameters; ``schedule``: its spec (str / dict) or None;
    ``loop``: ``seed``, ``epoch``, ``lr_now``; ``optimizer_state``: ``optim.SGD.state_dict()`` (its row
    parameter is ``class_embed``); ``buffer_order``: the momentum buffers' names in the order to store
    them; ``history``: a ``History`` (its epochs go into ``meta``, its per-step columns into arrays).
    """
    rep, rows = optimizer_state["replicated"], optimizer_state["rows"]
    meta = {
        "format": TRAINER_FORMAT,
        "version": TRAINER_VERSION,
        "hyper": dict(hyper),
        "schedule": schedule,
        "seed": loop["seed"],
        "epoch": loop["epoch"],
        "global_step": rep["steps"],
        "lr_now": loop["lr_now"],
        "lr_runs": rep["lr_runs"],
        "history_epochs": [dict(e) for e in history.epochs],
    }
    buffers = {**rep["buffers"], **({"class_embed": rows["buffer"]} if "buffer" in rows else {})}
    arrays = {f"buffer/{k}": buffers[k] for k in buffer_order}
    for k, v in history.steps.items():  # per-step columns as arrays (compact, exact)
        arrays[f"history/{k}"] = np.asarray(v, dtype=np.int64 if k in _INT_COLUMNS else np.float64)
    arrays["row_step"] = rows["row_step"]
    return {"meta": meta, "arrays": arrays}


def decode_trainer_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of an :func:`encode_trainer_state` value: ``hyper``, ``loop`` (``seed``, ``epoch``,
    ``lr_now``), ``optimizer`` (as ``optim.SGD.state_dict()`` returns it, not yet checked against the
    parameters) and ``history`` (``History.from_dict`` input). ValueError for another format or version;
    a missing key raises KeyError (the caller reports a malformed state)."""
    meta, arrays = state["meta"], state["arrays"]
    if meta.get("format") != TRAINER_FORMAT or meta.get("version") != TRAINER_VERSION:
        raise ValueError(
            f"checkpoint: expected trainer state format {TRAINER_FORMAT} v{TRAINER_VERSION}, "
            f"got {meta.get('format')} v{meta.get('version')}"
        )
    buffers = {k[len("buffer/") :]: v for k, v in arrays.items() if k.startswith("buffer/")}
    rows = {"row_step": arrays["row_step"]}
    if "class_embed" in buffers:
        rows["buffer"] = buffers.pop("class_embed")
    steps = {
        k[len("history/") :]: np.asarray(v).tolist() for k, v in arrays.items() if k.startswith("history/")
    }
    return {
        "hyper": meta["hyper"],
        "loop": {"seed": meta["seed"], "epoch": meta["epoch"], "lr_now": meta["lr_now"]},
        "optimizer": {
            "replicated": {"steps": meta["global_step"], "lr_runs": meta["lr_runs"], "buffers": buffers},
            "rows": rows,
        },
        "history": {"epochs": meta["history_epochs"], "steps": steps},
    }


def read_trainer_header(path: str | os.PathLike) -> tuple[dict, dict[str, Any]]:
    """(model config, trainer state without the row arrays' check) of a trainer checkpoint: a file, or a
    sharded directory (then only its manifest and head file are read, not the class rows)."""
    if os.path.isdir(os.fspath(path)):
        from .distributed.checkpoint import read_head

        config, extra = read_head(path)
    else:
        config, _, extra = load_checkpoint(path)
    return config, unpack_trainer_state(extra, path, need_rows=False)


def save_model_checkpoint(model: Any, path: str | os.PathLike, extra: Mapping[str, Any]) -> None:
    """One file for a model that only has ``state_dict()`` (and optionally a ``config`` dict)."""
    config = jsonable(dict(getattr(model, "config", {}) or {}))
    save_checkpoint(path, config, model.state_dict(), extra=extra)


def load_trainer_checkpoint(
    model: Any,
    path: str | os.PathLike,
    parse: Callable[[dict[str, Any]], Any],
    load_file: Callable[[str | os.PathLike, dict], Any],
    adopt_neighbors: Callable[[np.ndarray], Any] | None = None,
) -> Any:
    """Read a trainer checkpoint into a one-process model, checking everything before anything changes.

    ``path`` is a file (:func:`save_checkpoint` layout) or a sharded directory (read whole). ``parse``
    gets the trainer state (:func:`unpack_trainer_state`) and validates it (raising leaves the model
    unchanged); then the model is loaded: ``load_file(path, state)`` for a file (the model's own
    loader), ``model.load_state_dict(state)`` and ``adopt_neighbors(table)`` (the saved neighbour
    table, when there is one) for a directory. Returns what ``parse`` returned.
    """
    if not os.path.isdir(os.fspath(path)):
        _, state, extra = load_checkpoint(path)
        parsed = parse(unpack_trainer_state(extra, path))
        load_file(path, state)
        return parsed
    from .distributed.checkpoint import load_sharded_whole

    whole, state, extra = load_sharded_whole(path)
    parsed = parse(unpack_trainer_state(extra, path))
    for key in ARCH_KEYS:
        mine = getattr(model, key, None)
        if mine is not None and mine != whole.config[key]:
            raise ValueError(
                f"{os.fspath(path)}: checkpoint {key}={whole.config[key]!r} does not match this "
                f"model's {key}={mine!r}"
            )
    model.load_state_dict(state)
    if adopt_neighbors is not None and not whole.neighbors_stale:
        adopt_neighbors(whole.local_neighbors)
    return parsed
