"""Worker for tests/test_distributed.py: one rank of a multi-process run.

Usage (the tests launch it; by hand too):
    RANK=r WORLD_SIZE=R QG_INIT=file:///tmp/x python tests/_dist_worker.py torch CASES.json OUTDIR
    mpirun -n R python tests/_dist_worker.py mpi CASES.json OUTDIR
CASES.json is a list of case dicts (see run_case); each rank writes OUTDIR/<case name>.rank<r>.npz.
The data of every case comes from make_* below, which the tests also call for the one-process reference.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np


def make_table(N: int, D: int, seed: int, ties: bool = False) -> np.ndarray:
    """[N, D] float32 class table; with ties, rows repeat (equal similarities) and one row is zero."""
    rng = np.random.default_rng(seed)
    E = rng.standard_normal((N, D), dtype=np.float32)
    if ties:
        E[1::3] = E[0::3][: E[1::3].shape[0]]
        E[N // 2] = 0.0
    return E


def make_batch(case: dict) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(features [B, C, H, W] float32, labels [B], per-rank sample counts)."""
    rng = np.random.default_rng(case["data_seed"])
    counts = case["counts"]
    B = int(sum(counts))
    X = rng.standard_normal((B, case["C"], case["H"], case["W"]), dtype=np.float32)
    y = rng.integers(0, case["N"], size=B).astype(np.int64)
    return X, y, counts


def model_config(case: dict) -> dict:
    return {
        "num_classes": case["N"],
        "channels": case["C"],
        "height": case["H"],
        "width": case["W"],
        "k_nearest": case["k"],
        "fc": case.get("fc", "separate"),
        "triplet": case.get("triplet", "class"),
        "seed": case.get("seed", 0),
        "init": case.get("init", "random"),  # the one-process runs compared with it use the same start
        "k_batch": case.get("k_batch", 0),
        "k_mined": case.get("k_mined", 0),
        "weighted_extras": case.get("weighted_extras", False),
        "neighbors_by": case.get("neighbors_by", "cosine"),
    }


def _slice(counts: list[int], rank: int) -> slice:
    off = int(sum(counts[:rank]))
    return slice(off, off + counts[rank])


def make_identify(case: dict):
    """(one-process QAConvGS, probes [B, C, H, W], per-rank probe counts) of an identify case.

    One training step in one process gives the head non-trivial running statistics (every rank builds
    the same model and takes its shard with from_model, so the head has the same bits everywhere);
    the class rows listed in case["dups"] are copies of case["dups_of"], and the first probes are scaled
    copies of that row, so equal scores (ties) are at the top of their lists."""
    from qaconv_gs import QAConvGS

    X, y, _ = make_batch({**case, "counts": [8]})
    model = QAConvGS(**model_config(case))
    model.forward_backward(X, y)
    E = model.parameters()["class_embed"]
    E[case["dups"]] = E[case["dups_of"]]
    rng = np.random.default_rng(case["data_seed"] + 1)
    counts = case["counts"]
    P = rng.standard_normal((int(sum(counts)), case["C"], case["H"], case["W"]), dtype=np.float32)
    P[: min(3, P.shape[0])] = E[case["dups_of"]] * np.float32(2.0)
    return model, P, counts


def layout_of(case: dict, R: int):
    """The case's class layout: case["bounds"][str(R)] when given, else the even split."""
    from qaconv_gs.distributed import ShardLayout

    bounds = case.get("bounds", {}).get(str(R))
    if bounds is None:
        return ShardLayout.even(case["N"], R)
    return ShardLayout(case["N"], R, tuple(bounds))


TRAINER_KW = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


def train_steps(trainer, case: dict, start: int, stop: int, sl: slice | None = None) -> dict[str, np.ndarray]:
    """Steps start .. stop-1 of the case's batch sequence (this rank's slice `sl` of each global batch;
    the neighbours refreshed before step refresh_at), then flush -> losses, rows, neighbour rows, head."""
    model = trainer.model
    losses = []
    for step in range(start, stop):
        if step == case.get("refresh_at", -1):
            model.on_epoch_start()
        X, y, _ = make_batch({**case, "data_seed": case["data_seed"] + step})
        if sl is not None:
            X, y = X[sl], y[sl]
        losses.append(trainer.step(X, y).loss)
    trainer.flush()
    nbr = model.local_neighbors if hasattr(model, "local_neighbors") else model.class_neighbors
    res = {"losses": np.array(losses), "embed": model.class_embed.copy(), "nbr": np.array(nbr)}
    for k, v in model.head_state.items():
        res["head." + k] = np.array(v)
    return res


def torch_steps(crit, case: dict, sl: slice) -> dict[str, np.ndarray]:
    """SGD steps (torch.optim.SGD's momentum update, written out: importing the optimiser costs seconds
    of torch._dynamo per process) on a QAConvGSLoss (one process, or this rank's sharded module) with
    features made by a toy "backbone" from this rank's slice of each global batch; NeighborRefresh before
    step refresh_at -> losses, per-step gradients of the backbone input, final rows and head."""
    import torch
    from qaconv_gs.torch import NeighborRefresh

    params = list(crit.parameters())
    bufs: list = [None] * len(params)

    def sgd_step() -> None:
        with torch.no_grad():
            for i, p in enumerate(params):
                d = p.grad + 5e-4 * p
                bufs[i] = d.clone() if bufs[i] is None else bufs[i].mul_(0.9).add_(d)
                p.add_(bufs[i], alpha=-0.05)
                p.grad = None

    refresh = NeighborRefresh()
    res: dict[str, np.ndarray] = {}
    losses = []
    for step in range(case["steps"]):
        if step == case.get("refresh_at", -1):
            refresh.on_train_epoch_start(None, crit)
        X, y, _ = make_batch({**case, "data_seed": case["data_seed"] + step})
        base = torch.from_numpy(X[sl]).requires_grad_(True)
        loss = crit(base * 1.5, torch.from_numpy(y[sl]))
        loss.backward()
        sgd_step()
        losses.append(loss.item())
        res[f"grad{step}"] = base.grad.numpy().copy()
    res["losses"] = np.array(losses)
    res["refreshes"] = np.array(refresh.calls)
    for k, v in crit.state_dict().items():
        res["state." + k] = v.numpy().copy()
    return res


def step_record(model, out) -> dict[str, np.ndarray]:
    """What a sharded step case reports: the StepResult's arrays, the rank's neighbour rows and head state."""
    res = {
        "loss": np.array([out.loss, out.loss_cls, out.loss_triplet, out.acc_cls, out.acc_triplet]),
        "scores": out.scores,
        "candidates": out.candidates,
        "grad_features": out.grad_features,
        "grad_embed_ids": out.grad_embed_class_ids,
        "grad_embed_rows": out.grad_embed_rows,
        "nbr": model.local_neighbors,
    }
    res.update({"gh." + k: v for k, v in out.grad_head.items()})
    res.update({"head." + k: np.asarray(v) for k, v in model.head_state.items()})
    return res


def run_case(case: dict, comm) -> dict[str, np.ndarray]:
    from qaconv_gs.distributed import ShardedQAConvGS, sharded_class_neighbors

    kind = case["kind"]
    r, R = comm.rank, comm.size
    if kind == "comm":
        out = {}
        x = np.arange(r + 1, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32) + 10 * r
        out["gather"] = comm.allgather_concat(x)
        out["gather_empty"] = comm.allgather_concat(np.zeros((0 if r == 0 else r, 2), np.int64))
        out["sum"] = comm.allreduce_sum(np.array([0.1 * (r + 1), 1e16, -1e16 + r], np.float64))
        out["isum"] = comm.allreduce_sum(np.array([r, 2 * r], np.int64))
        out["bcast"] = comm.broadcast(np.full((2, 2), 7.5) if r == R - 1 else None, root=R - 1)
        out["ring"] = comm.ring_shift(np.array([r], np.int64))
        out["a2a"] = np.concatenate(comm.alltoallv([np.full(q + 1, 100 * r + q, np.int64) for q in range(R)]))
        comm.barrier()
        return out
    if kind == "neighbors":
        E = make_table(case["N"], case["D"], case["seed"], case.get("ties", False))
        from qaconv_gs.distributed import ShardLayout

        lo, hi = ShardLayout.even(case["N"], R).range(r)
        idx, sim = sharded_class_neighbors(E[lo:hi], case["k"], comm, return_similarity=True, n_threads=1)
        return {"idx": idx, "sim": sim}
    if kind in ("step", "train"):
        X, y, counts = make_batch(case)
        sl = _slice(counts, r)
        model = ShardedQAConvGS(**model_config(case), comm=comm)
        if kind == "step":
            return step_record(model, model.forward_backward(X[sl], y[sl]))
        from qaconv_gs import Trainer

        trainer = Trainer(model, **TRAINER_KW, **case.get("trainer", {}))
        return train_steps(trainer, case, 0, case["steps"], sl)
    if kind == "resume":  # a trainer checkpoint written by the test (on 2 ranks), continued here
        from qaconv_gs import Trainer

        model = ShardedQAConvGS(**{**model_config(case), "seed": 99}, comm=comm)  # overwritten by the load
        trainer = Trainer(model, **TRAINER_KW, **case.get("trainer", {}))
        trainer.load_checkpoint(case["load"])
        return train_steps(trainer, case, trainer.global_step, case["steps"], _slice(case["counts"], r))
    if kind == "torch_loss":
        from qaconv_gs.torch import QAConvGSLoss

        crit = QAConvGSLoss(**model_config(case), comm=comm)
        return torch_steps(crit, case, _slice(case["counts"], r))
    if kind == "identify":
        model, P, counts = make_identify(case)
        sharded = ShardedQAConvGS.from_model(model, comm, layout=layout_of(case, R))
        res = {"lo_hi": np.array([sharded.lo, sharded.hi])}
        for top in case["tops"]:
            ids, sc = sharded.identify(P[_slice(counts, r)], top=top)
            res[f"ids{top}"], res[f"scores{top}"] = ids, sc
        return res
    if kind == "identify_errors":  # every rank must come back with an error (nobody waits)
        model, P, counts = make_identify(case)
        sharded = ShardedQAConvGS.from_model(model, comm)
        bad = {
            "shape": (P[:2, :-1] if r == R - 1 else P[:2], 2),  # wrong C on the last rank only
            "top_range": (P[:2], case["N"] + 1 if r == 0 else 2),  # out of range on rank 0 only
            "top_differs": (P[:2], 1 + r),  # each valid, but not the same on every rank
        }
        res = {}
        for name, (feats, top) in bad.items():
            try:
                sharded.identify(feats, top=top)
                res[name] = np.array("")
            except Exception as exc:
                res[name] = np.array(f"{type(exc).__name__}: {exc}")
        return res
    if kind == "agree":
        X, y, counts = make_batch(case)
        sl = _slice(counts, r)
        model = ShardedQAConvGS(**model_config(case), comm=comm)
        yb = y[sl].copy()
        if r == R - 1:
            yb[0] = case["N"]  # out of range on the last rank only
        try:
            model.forward_backward(X[sl], yb)
        except Exception as exc:  # every rank must get here (nobody waits for the failed rank)
            return {"err": np.array(f"{type(exc).__name__}: {exc}")}
        return {"err": np.array("")}
    if kind == "ckpt":
        from qaconv_gs import Trainer

        model = ShardedQAConvGS.load(case["load"], comm)
        res = {"loaded": model.class_embed.copy(), "loaded_nbr": model.local_neighbors.copy()}
        X, y, counts = make_batch(case)
        trainer = Trainer(model, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, sparse_embed=False)
        res["loss"] = np.array([trainer.step(X[_slice(counts, r)], y[_slice(counts, r)]).loss])
        model.save(case["save"])
        model.save(case["save"])  # a second save replaces the first generation
        return res
    raise ValueError(f"unknown case kind {kind!r}")


def main() -> int:
    backend, cases_path, outdir = sys.argv[1], sys.argv[2], sys.argv[3]
    from qaconv_gs.distributed import init_communicator

    if backend == "torch":
        comm = init_communicator(
            "torch",
            init_method=os.environ["QG_INIT"],
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout_s=120,
        )
    else:
        comm = init_communicator(backend)
    with open(cases_path) as f:
        cases = json.load(f)
    status = 0
    for case in cases:
        try:
            res = run_case(case, comm)
        except Exception:  # report and go on: the other ranks would hang on a missing rank otherwise
            traceback.print_exc()
            res = {"error": np.array(traceback.format_exc())}
            status = 1
        np.savez(os.path.join(outdir, f"{case['name']}.rank{comm.rank}.npz"), **res)
    comm.barrier()
    if backend == "torch":  # a gloo group left to interpreter exit can abort ("terminate called ...")
        import torch.distributed as dist

        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
