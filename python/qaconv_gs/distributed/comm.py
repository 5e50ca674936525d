"""Communicators: the few collectives the sharded model needs, on NumPy arrays, over an existing engine.

Backends move opaque byte messages only (`_allgather_bytes`, `_sendrecv_bytes`, `_broadcast_bytes`,
`barrier`); everything else (variable first-dimension sizes, dtypes, shapes, sums) is done here once,
so the backends behave identically:

- every message carries its own dtype and shape, so `allgather` accepts arrays whose sizes differ per rank;
- `allreduce_sum` gathers the per-rank arrays and adds them in rank order (in float64 for floats), so
  the result is bit-identical on every rank and for every backend, whatever algorithm the engine uses
  internally. It is meant for statistics and small vectors (its cost is R times the array size).

Backends: `SingleProcessCommunicator` (world size 1, no engine), `TorchCommunicator` (torch.distributed,
gloo on CPU; any backend whose process group supports all_gather / broadcast / send / recv of uint8
tensors) and `MPICommunicator` (mpi4py).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

__all__ = [
    "Communicator",
    "MPICommunicator",
    "SingleProcessCommunicator",
    "ThreadCommunicator",
    "TorchCommunicator",
    "init_communicator",
    "run_threads",
]

_MAGIC = b"QGM1"


def _pack(arr: np.ndarray) -> np.ndarray:
    """One array -> a uint8 message: magic, header length (uint32 LE), JSON {dtype, shape}, C-order data."""
    a = np.asarray(arr)
    if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        a = a.copy(order="C")
    if a.dtype.hasobject:
        raise TypeError(f"x: object arrays cannot be communicated, got dtype {a.dtype}")
    header = json.dumps({"dtype": a.dtype.str, "shape": list(a.shape)}).encode()
    out = np.empty(8 + len(header) + a.nbytes, dtype=np.uint8)
    out[:4] = np.frombuffer(_MAGIC, dtype=np.uint8)
    out[4:8] = np.frombuffer(np.uint32(len(header)).astype("<u4").tobytes(), dtype=np.uint8)
    out[8 : 8 + len(header)] = np.frombuffer(header, dtype=np.uint8)
    out[8 + len(header) :] = a.reshape(-1).view(np.uint8)
    return out


def _unpack(buf: np.ndarray) -> np.ndarray:
    """Inverse of _pack; the result owns its memory (writable, C-contiguous)."""
    b = np.asarray(buf, dtype=np.uint8).reshape(-1)
    if b.size < 8 or b[:4].tobytes() != _MAGIC:
        raise RuntimeError("communicator: received a malformed message (bad magic)")
    hlen = int(np.frombuffer(b[4:8].tobytes(), dtype="<u4")[0])
    header = json.loads(b[8 : 8 + hlen].tobytes().decode())
    dtype = np.dtype(header["dtype"])
    shape = tuple(int(s) for s in header["shape"])
    data = b[8 + hlen :]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if data.size != expected:
        raise RuntimeError(f"communicator: message holds {data.size} bytes, header says {expected}")
    return data.view(dtype).reshape(shape).copy() if expected else np.empty(shape, dtype=dtype)


class Communicator(ABC):
    """Rank / world size and the collectives of the sharded model, on NumPy arrays.

    Every method is collective (all ranks call it, in the same order) unless stated otherwise.
    """

    rank: int
    size: int
    # logical payload bytes this rank sent / received (message headers included), for benchmarks
    bytes_sent: int = 0
    bytes_received: int = 0

    def reset_counters(self) -> None:
        self.bytes_sent = self.bytes_received = 0

    # ---------------------------------------------------------------- what a backend implements

    @abstractmethod
    def _allgather_bytes(self, buf: np.ndarray) -> list[np.ndarray]:
        """uint8 [n_r] from every rank (sizes may differ) -> list of R uint8 arrays, in rank order."""

    @abstractmethod
    def _broadcast_bytes(self, buf: np.ndarray | None, root: int) -> np.ndarray:
        """root's uint8 message to every rank (buf is ignored on the other ranks)."""

    @abstractmethod
    def _sendrecv_bytes(self, buf: np.ndarray, dest: int, source: int) -> np.ndarray:
        """Send buf to dest and receive one message from source, without deadlock (paired calls)."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait until every rank has reached the barrier."""

    # ---------------------------------------------------------------- generic collectives

    @property
    def world_size(self) -> int:
        return self.size

    def _check_rank(self, value: object, name: str) -> int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}: expected an int rank, got {type(value).__name__}")
        if not 0 <= int(value) < self.size:
            raise ValueError(f"{name}: expected a rank in [0, {self.size}), got {int(value)}")
        return int(value)

    def allgather(self, x: object) -> list[np.ndarray]:
        """x from every rank -> list of R arrays in rank order (shapes and dtypes may differ per rank)."""
        buf = _pack(np.asarray(x))
        msgs = self._allgather_bytes(buf)
        self.bytes_sent += buf.size * (self.size - 1)
        self.bytes_received += sum(m.size for q, m in enumerate(msgs) if q != self.rank)
        return [_unpack(m) for m in msgs]

    def allgather_concat(self, x: object) -> np.ndarray:
        """Concatenate every rank's x along axis 0 (rank order). First dimensions may differ; the trailing
        shape and the dtype must agree (checked on every rank, so every rank raises together)."""
        parts = self.allgather(x)
        ref = parts[0]
        for r, p in enumerate(parts):
            if p.ndim == 0 or p.shape[1:] != ref.shape[1:] or p.dtype != ref.dtype:
                raise ValueError(
                    f"x: rank {r} sent shape {p.shape} dtype {p.dtype}, rank 0 sent {ref.shape} {ref.dtype}; "
                    "allgather_concat needs the same trailing shape and dtype"
                )
        return np.concatenate(parts, axis=0)

    def allreduce_sum(self, x: object) -> np.ndarray:
        """Elementwise sum over ranks, added in rank order: float inputs in float64, integers in int64.
        Bit-identical on every rank. Cost: R times the array (meant for statistics)."""
        a = np.asarray(x)
        acc_dtype = np.float64 if a.dtype.kind in "fc" else np.int64
        if a.dtype.kind not in "fciub":
            raise TypeError(f"x: expected a numeric array, got dtype {a.dtype}")
        parts = self.allgather(a.astype(acc_dtype))
        out = np.zeros_like(parts[0])
        for r, p in enumerate(parts):
            if p.shape != out.shape:
                raise ValueError(f"x: rank {r} sent shape {p.shape}, rank 0 sent {out.shape}")
            out += p
        return out

    def allreduce_max(self, x: object) -> np.ndarray:
        """Elementwise maximum over ranks (same dtype)."""
        parts = self.allgather(np.asarray(x))
        return np.maximum.reduce(parts) if len(parts) > 1 else parts[0]

    def broadcast(self, x: object, root: int = 0) -> np.ndarray:
        """root's x to every rank (x is ignored elsewhere and may be None)."""
        root = self._check_rank(root, "root")
        buf = _pack(np.asarray(x)) if self.rank == root else None
        out = self._broadcast_bytes(buf, root)
        if self.rank == root:
            self.bytes_sent += out.size * (self.size - 1)
        else:
            self.bytes_received += out.size
        return _unpack(out)

    def sendrecv(self, x: object, dest: int, source: int) -> np.ndarray:
        """Send x to rank dest and return the array received from rank source (a ring step when
        dest = rank + 1 and source = rank - 1). Every rank calls it; the pairs must match up."""
        dest = self._check_rank(dest, "dest")
        source = self._check_rank(source, "source")
        buf = _pack(np.asarray(x))
        if dest == self.rank and source == self.rank:
            return _unpack(buf)
        got = self._sendrecv_bytes(buf, dest, source)
        self.bytes_sent += buf.size
        self.bytes_received += got.size
        return _unpack(got)

    def ring_shift(self, x: object, shift: int = 1) -> np.ndarray:
        """Send x to rank + shift, receive from rank - shift (mod R)."""
        return self.sendrecv(x, (self.rank + shift) % self.size, (self.rank - shift) % self.size)

    def alltoallv(self, send: Sequence[object]) -> list[np.ndarray]:
        """send[q] goes to rank q; returns recv with recv[q] = what rank q sent here (any shapes).

        R - 1 paired exchanges (step t: to rank + t, from rank - t), so at most one message per rank pair
        is in flight at a time."""
        if len(send) != self.size:
            raise ValueError(f"send: expected one array per rank ({self.size}), got {len(send)}")
        out: list[np.ndarray | None] = [None] * self.size
        out[self.rank] = np.array(send[self.rank], copy=True)
        for t in range(1, self.size):
            dest, source = (self.rank + t) % self.size, (self.rank - t) % self.size
            buf = _pack(np.asarray(send[dest]))
            got = self._sendrecv_bytes(buf, dest, source)
            self.bytes_sent += buf.size
            self.bytes_received += got.size
            out[source] = _unpack(got)
        return out  # type: ignore[return-value]

    def agree(self, error: BaseException | None) -> None:
        """Collective error check: if any rank passes an exception, every rank raises (the failing rank
        its own exception, the others a RuntimeError naming the failing ranks), so no rank is left waiting
        in a later collective."""
        flags = self.allgather(np.array([error is not None], dtype=np.bool_))
        bad = [q for q, f in enumerate(flags) if bool(f[0])]
        if error is not None:
            raise error
        if bad:
            raise RuntimeError(f"rank(s) {bad} failed (see their error); this rank stops too")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SingleProcessCommunicator(Communicator):
    """World size 1: every collective is the identity. The default of the sharded classes."""

    def __init__(self) -> None:
        self.rank, self.size = 0, 1

    def _allgather_bytes(self, buf: np.ndarray) -> list[np.ndarray]:
        return [buf]

    def _broadcast_bytes(self, buf: np.ndarray | None, root: int) -> np.ndarray:
        assert buf is not None
        return buf

    def _sendrecv_bytes(self, buf: np.ndarray, dest: int, source: int) -> np.ndarray:
        return buf

    def barrier(self) -> None:
        return None


class TorchCommunicator(Communicator):
    """torch.distributed (an initialised default process group, or `group`); CPU tensors of uint8.

    Use `init_communicator("torch")` to initialise the default group from the environment
    (env:// with MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, as torchrun sets them), or pass
    init_method="tcp://127.0.0.1:PORT" / "file:///path" with rank and world_size.
    """

    def __init__(self, group: object = None) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchCommunicator: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group(...) or init_communicator('torch') first"
            )
        self._torch, self._dist, self._group = torch, dist, group
        self.rank = int(dist.get_rank(group))
        self.size = int(dist.get_world_size(group))

    def _global(self, rank: int) -> int:
        if self._group is None:
            return rank
        return int(self._dist.get_global_rank(self._group, rank))

    def _allgather_bytes(self, buf: np.ndarray) -> list[np.ndarray]:
        torch, dist = self._torch, self._dist
        n = torch.tensor([buf.size], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(sizes, n, group=self._group)
        counts = [int(s.item()) for s in sizes]
        width = max(counts)
        mine = torch.zeros(width, dtype=torch.uint8)
        mine[: buf.size] = torch.from_numpy(np.ascontiguousarray(buf))
        outs = [torch.empty(width, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(outs, mine, group=self._group)
        return [o.numpy()[:c] for o, c in zip(outs, counts)]

    def _broadcast_bytes(self, buf: np.ndarray | None, root: int) -> np.ndarray:
        torch, dist = self._torch, self._dist
        n = torch.tensor([buf.size if self.rank == root else 0], dtype=torch.int64)
        dist.broadcast(n, src=self._global(root), group=self._group)
        t = torch.from_numpy(np.ascontiguousarray(buf)) if self.rank == root else None
        if t is None:
            t = torch.empty(int(n.item()), dtype=torch.uint8)
        dist.broadcast(t, src=self._global(root), group=self._group)
        return t.numpy()

    def _sendrecv_bytes(self, buf: np.ndarray, dest: int, source: int) -> np.ndarray:
        torch, dist = self._torch, self._dist
        g_dest, g_src = self._global(dest), self._global(source)
        n_out = torch.tensor([buf.size], dtype=torch.int64)
        n_in = torch.zeros(1, dtype=torch.int64)
        reqs = [
            dist.isend(n_out, g_dest, group=self._group, tag=1),
            dist.irecv(n_in, g_src, group=self._group, tag=1),
        ]
        for q in reqs:
            q.wait()
        t_out = torch.from_numpy(np.ascontiguousarray(buf))
        t_in = torch.empty(int(n_in.item()), dtype=torch.uint8)
        reqs = [
            dist.isend(t_out, g_dest, group=self._group, tag=2),
            dist.irecv(t_in, g_src, group=self._group, tag=2),
        ]
        for q in reqs:
            q.wait()
        return t_in.numpy()

    def barrier(self) -> None:
        self._dist.barrier(group=self._group)


class MPICommunicator(Communicator):
    """mpi4py (MPI.COMM_WORLD by default). Byte buffers with Allgatherv / Bcast / Sendrecv."""

    def __init__(self, comm: object = None) -> None:
        try:
            from mpi4py import MPI
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "MPICommunicator needs mpi4py (pip install mpi4py, with an MPI library such as "
                "Debian's mpich or openmpi installed)"
            ) from exc
        self._MPI = MPI
        self._comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = int(self._comm.Get_rank())
        self.size = int(self._comm.Get_size())

    def _allgather_bytes(self, buf: np.ndarray) -> list[np.ndarray]:
        MPI = self._MPI
        counts = np.array(self._comm.allgather(int(buf.size)), dtype=np.int64)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        out = np.empty(int(counts.sum()), dtype=np.uint8)
        self._comm.Allgatherv(
            [np.ascontiguousarray(buf), MPI.BYTE], [out, (counts.tolist(), displs.tolist()), MPI.BYTE]
        )
        return [out[d : d + c] for d, c in zip(displs, counts)]

    def _broadcast_bytes(self, buf: np.ndarray | None, root: int) -> np.ndarray:
        MPI = self._MPI
        n = self._comm.bcast(int(buf.size) if self.rank == root else None, root=root)
        out = np.ascontiguousarray(buf) if self.rank == root else np.empty(n, dtype=np.uint8)
        self._comm.Bcast([out, MPI.BYTE], root=root)
        return out

    def _sendrecv_bytes(self, buf: np.ndarray, dest: int, source: int) -> np.ndarray:
        MPI = self._MPI
        n = self._comm.sendrecv(int(buf.size), dest=dest, sendtag=1, source=source, recvtag=1)
        out = np.empty(int(n), dtype=np.uint8)
        self._comm.Sendrecv(
            [np.ascontiguousarray(buf), MPI.BYTE],
            dest=dest,
            sendtag=2,
            recvbuf=[out, MPI.BYTE],
            source=source,
            recvtag=2,
        )
        return out

    def barrier(self) -> None:
        self._comm.Barrier()


class _ThreadHub:
    """Shared state of R ThreadCommunicators: a barrier, one slot per rank, one queue per ordered pair."""

    def __init__(self, size: int, timeout_s: float) -> None:
        import queue
        import threading

        self.size, self.timeout_s = size, timeout_s
        self.barrier = threading.Barrier(size, timeout=timeout_s)
        self.slots: list[np.ndarray | None] = [None] * size
        self.queues = {(a, b): queue.Queue() for a in range(size) for b in range(size)}


class ThreadCommunicator(Communicator):
    """R ranks as threads of one process (the C kernels release the GIL, so ranks do run in parallel).

    For tests, debugging and notebooks: `run_threads(R, fn)` calls fn(comm) on R threads and returns the
    R results. Every collective is a barrier round; a rank that raises breaks the barrier, so the other
    ranks fail (threading.BrokenBarrierError) instead of waiting forever."""

    def __init__(self, hub: _ThreadHub, rank: int) -> None:
        self._hub, self.rank, self.size = hub, int(rank), hub.size

    def _allgather_bytes(self, buf: np.ndarray) -> list[np.ndarray]:
        hub = self._hub
        hub.slots[self.rank] = np.array(buf, copy=True)
        hub.barrier.wait()
        out = list(hub.slots)
        hub.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out  # type: ignore[return-value]

    def _broadcast_bytes(self, buf: np.ndarray | None, root: int) -> np.ndarray:
        hub = self._hub
        if self.rank == root:
            hub.slots[root] = np.array(buf, copy=True)
        hub.barrier.wait()
        out = hub.slots[root]
        hub.barrier.wait()
        return out  # type: ignore[return-value]

    def _sendrecv_bytes(self, buf: np.ndarray, dest: int, source: int) -> np.ndarray:
        import queue

        hub = self._hub
        hub.queues[(self.rank, dest)].put(np.array(buf, copy=True))
        try:
            return hub.queues[(source, self.rank)].get(timeout=hub.timeout_s)
        except queue.Empty:
            raise TimeoutError(f"rank {self.rank}: nothing received from rank {source}") from None

    def barrier(self) -> None:
        self._hub.barrier.wait()


def run_threads(size: int, fn, timeout_s: float = 60.0) -> list:
    """Run fn(comm) on `size` ThreadCommunicator ranks; returns [result of rank 0, ...] or re-raises the
    first rank's exception (by rank order)."""
    import threading

    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size: expected an int >= 1, got {size!r}")
    hub = _ThreadHub(int(size), float(timeout_s))
    results: list = [None] * size
    errors: list[BaseException | None] = [None] * size

    def body(r: int) -> None:
        try:
            results[r] = fn(ThreadCommunicator(hub, r))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            errors[r] = exc
            hub.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next(
        (e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None
    )
    if first is None:
        first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


def init_communicator(
    backend: str = "torch",
    *,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timeout_s: float = 300.0,
) -> Communicator:
    """Create a communicator.

    backend:
        "single": one process, no engine.
        "torch": torch.distributed with gloo. If the default process group is not initialised yet it is
            initialised here: init_method defaults to "env://" (torchrun's MASTER_ADDR / MASTER_PORT /
            RANK / WORLD_SIZE); "tcp://127.0.0.1:PORT" or "file:///path" need rank and world_size.
        "mpi": mpi4py's COMM_WORLD (launch with mpirun / mpiexec).
    """
    if backend == "single":
        return SingleProcessCommunicator()
    if backend == "mpi":
        return MPICommunicator()
    if backend != "torch":
        raise ValueError(f"backend: expected 'torch', 'mpi' or 'single', got {backend!r}")
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        kwargs: dict = {"backend": "gloo", "init_method": init_method or "env://"}
        if rank is not None:
            kwargs["rank"] = int(rank)
        if world_size is not None:
            kwargs["world_size"] = int(world_size)
        if kwargs["init_method"] == "env://":
            kwargs.setdefault("rank", int(os.environ.get("RANK", "0")))
            kwargs.setdefault("world_size", int(os.environ.get("WORLD_SIZE", "1")))
        kwargs["timeout"] = datetime.timedelta(seconds=float(timeout_s))
        dist.init_process_group(**kwargs)
    return TorchCommunicator()
