"""qaconv_gs.distributed: communicators, sharded neighbours and the sharded training step.

Multi-process tests launch tests/_dist_worker.py as R processes (torch.distributed, gloo over a file://
store, or mpirun when mpi4py and an MPI launcher are installed) once per world size with all cases, and
compare every rank's output with the one-process model here. Equality: neighbour indices and similarities
bit-identical; scores, losses, gradients and parameters within 1e-5 relative (max |a - b| <= 1e-5 max |b|
for gradient arrays, which is the float32 rounding of sums taken in another order).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import qaconv_gs as qg
from hypothesis import given
from hypothesis import strategies as st
from qaconv_gs.distributed import (
    Communicator,
    ShardedQAConvGS,
    ShardLayout,
    SingleProcessCommunicator,
    load_sharded,
    load_sharded_model,
    merge_topk,
    run_threads,
    shard_checkpoint,
    sharded_class_neighbors,
)
from qaconv_gs.distributed._head import sharded_head_backward, sharded_head_forward
from qaconv_gs.distributed.comm import _pack, _unpack
from qaconv_gs.distributed.model import _draw_shard
from qaconv_gs.distributed.neighbors import ring_pairs_per_rank

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as W  # noqa: E402

WORKER = Path(__file__).with_name("_dist_worker.py")
RTOL = 1e-5


# ---------------------------------------------------------------- launching


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the workers import the very qaconv_gs this process imported (in-tree build or installed package)
    pkg_root = str(Path(qg.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    # Open MPI refuses to start as root without these (CI runs as root); MPICH ignores them
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def _collect(names: list[str], outdir: Path, R: int) -> dict[str, list[dict]]:
    out = {}
    for name in names:
        ranks = []
        for r in range(R):
            d = dict(np.load(outdir / f"{name}.rank{r}.npz"))
            if "error" in d:
                raise AssertionError(f"case {name} failed on rank {r}:\n{d['error']}")
            ranks.append(d)
        out[name] = ranks
    return out


def launch(
    backend: str, R: int, cases: list[dict], tmp: Path, timeout: float = 120.0
) -> dict[str, list[dict]]:
    """Run the cases on R ranks; returns {case name: [rank 0 outputs, ...]}."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec = tmp / "cases.json"
    spec.write_text(json.dumps(cases))
    if backend == "torch":
        procs = []
        for r in range(R):
            env = _env()
            env.update(RANK=str(r), WORLD_SIZE=str(R), QG_INIT=f"file://{tmp / 'store'}")
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), "torch", str(spec), str(tmp)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=timeout)[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for r, p in enumerate(procs):
            assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n" + "\n".join(logs)
    else:
        cmd = [_mpirun(), "-n", str(R), sys.executable, str(WORKER), "mpi", str(spec), str(tmp)]
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, res.stdout + res.stderr
    return _collect([c["name"] for c in cases], tmp, R)


def _mpirun() -> str | None:
    return shutil.which("mpirun") or shutil.which("mpiexec")


def _cases(R: int, tmp: Path | None = None) -> list[dict]:
    counts = {1: [9], 2: [5, 7], 3: [5, 1, 6]}[R]
    step = {"N": 23, "C": 8, "H": 3, "W": 2, "k": 4, "seed": 3, "data_seed": 4, "counts": counts}
    return [
        {"name": "comm", "kind": "comm"},
        {"name": "nb_ties", "kind": "neighbors", "N": 37, "D": 20, "k": 5, "seed": 1, "ties": True},
        {"name": "nb_full_k", "kind": "neighbors", "N": 11, "D": 7, "k": 10, "seed": 2},
        {"name": "nb_k1", "kind": "neighbors", "N": 50, "D": 300, "k": 1, "seed": 5},
        {"name": "step_sep", "kind": "step", **step},
        {"name": "agree", "kind": "agree", **step},
        {"name": "step_shared_batch", "kind": "step", **step, "fc": "shared", "triplet": "batch", "k": 22},
        {"name": "step_batch", "kind": "step", **step, "triplet": "batch", "data_seed": 9},
        {
            "name": "train",
            "kind": "train",
            **step,
            "steps": 3,
            "refresh_at": 2,
            "trainer": {"sparse_embed": False},
        },
        {"name": "train_sparse_clip", "kind": "train", **_TRAIN_SPARSE_CLIP, "counts": counts},
        {
            "name": "train_imprint",
            "kind": "train",
            **_TRAIN_IMPRINT,
            "counts": {1: [40], 2: [19, 21], 3: [13, 0, 27]}[R],
        },
        {
            "name": "train_extras",
            "kind": "train",
            **_TRAIN_IMPRINT,
            **_MINED,
            "counts": {1: [40], 2: [21, 19], 3: [27, 13, 0]}[R],
        },
        {"name": "torch_loss", "kind": "torch_loss", **_TORCH_LOSS, "counts": counts},
        {"name": "identify", **_IDENTIFY, "counts": {1: [9], 2: [0, 6], 3: [4, 0, 3]}[R]},
        {"name": "identify_errors", **_IDENTIFY, "kind": "identify_errors", "counts": [2] * R},
    ] + (
        []
        if tmp is None
        else [
            {
                "name": "ckpt",
                "kind": "ckpt",
                **step,
                "load": str(tmp / "ckpt_in"),
                "save": str(tmp / "ckpt_out"),
            },
            {
                "name": "resume",
                "kind": "resume",
                **_RESUME,
                "counts": counts,
                "load": str(tmp / "trainer_ck"),
            },
        ]
    )


# lazily caught-up rows, clipping active (the global norm is ~2.5 here), a refresh mid-way
_TRAIN_SPARSE_CLIP = {
    **{"N": 23, "C": 8, "H": 3, "W": 2, "k": 4, "seed": 3, "data_seed": 4, "counts": [5, 7]},
    "steps": 4,
    "refresh_at": 2,
    "trainer": {"sparse_embed": True, "clip_grad_norm": 0.05},
}
# init="imprint" (the default): 150 classes, 40 random labels a step, so the first steps imprint rows on
# every rank and the imprinted classes double (past 64) between two refreshes: a mid-epoch rebuild
_TRAIN_IMPRINT = {
    **{"N": 150, "C": 4, "H": 2, "W": 2, "k": 5, "seed": 2, "data_seed": 8, "counts": [19, 21]},
    "init": "imprint",
    "steps": 5,
    "refresh_at": 4,
    "trainer": {"sparse_embed": True},
}
# the recommended restricted recipe on top: in-batch extras weighted for the classes they stand for,
# aligned neighbours, the in-batch triplet
_EXTRAS = {"k_batch": 6, "weighted_extras": True, "neighbors_by": "aligned", "triplet": "batch"}
# and per-sample mined classes (each rank mines its rows, the lists are merged)
_MINED = {**_EXTRAS, "k_mined": 4}
# QAConvGSLoss + torch.optim.SGD + NeighborRefresh, batch-hard triplet (the in-batch pairs cross ranks)
_TORCH_LOSS = {**_TRAIN_SPARSE_CLIP, "steps": 3, "triplet": "batch"}
# saved after `saved_at` steps on 2 ranks, resumed up to `steps` on any number of ranks
_RESUME = {
    **_TRAIN_SPARSE_CLIP,
    "steps": 5,
    "refresh_at": 3,
    "saved_at": 3,
    "trainer": {"clip_grad_norm": 0.5},
}


# identify on uneven layouts: R = 2 rank 0 has no probe, R = 3 rank 0 owns no class and rank 1 has no
# probe; classes 3, 9 and 12 are copies of class 7 and tie for the best score of the first probes (top = 1
# and 2 cut the tie, across ranks); top 5 exceeds some ranks' class counts; top = N
_IDENTIFY = {
    **{"N": 13, "C": 8, "H": 3, "W": 2, "k": 4, "seed": 6, "data_seed": 7, "kind": "identify"},
    "dups": [3, 9, 12],
    "dups_of": 7,
    "tops": [1, 2, 5, 13],
    "bounds": {"2": [0, 9, 13], "3": [0, 0, 4, 13]},
}


def _save_trainer_on_two_ranks(case: dict, path) -> list[dict]:
    """Train case['saved_at'] steps on 2 thread ranks (batch split [5, 7]), save the trainer checkpoint to
    path, and go on to case['steps'] without interruption -> the 2 ranks' outputs of the whole run."""
    counts = [5, 7]

    def rank(c):
        model = ShardedQAConvGS(**W.model_config(case), comm=c)
        trainer = qg.Trainer(model, **W.TRAINER_KW, **case["trainer"])
        sl = W._slice(counts, c.rank)
        first = W.train_steps(trainer, case, 0, case["saved_at"], sl)
        trainer.save_checkpoint(path)
        rest = W.train_steps(trainer, case, case["saved_at"], case["steps"], sl)
        return {**rest, "losses": np.concatenate([first["losses"], rest["losses"]])}

    return run_threads(2, rank)


def _ckpt_model(case: dict) -> qg.QAConvGS:
    """The model the ckpt case loads (written sharded for 2 ranks by the test before the launch)."""
    model = qg.QAConvGS(**W.model_config(case))
    model.refresh_neighbors()
    return model


@pytest.fixture(scope="module", params=[2, 3], ids=["R2", "R3"])
def torch_run(request, tmp_path_factory):
    pytest.importorskip("torch")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    R = request.param
    tmp = tmp_path_factory.mktemp(f"torch{R}")
    cases = _cases(R, tmp)
    ck = next(c for c in cases if c["name"] == "ckpt")
    shard_checkpoint(_ckpt_model(ck), ck["load"], 2)
    resume = next(c for c in cases if c["name"] == "resume")
    two = _save_trainer_on_two_ranks(resume, resume["load"])
    return R, {**launch("torch", R, cases, tmp), "_ckpt_case": ck, "_resume_case": resume, "_two_ranks": two}


def _have_mpi() -> bool:
    """mpi4py importable with a loadable MPI library, and a launcher (checked in a subprocess, so this
    process never initialises MPI)."""
    if importlib.util.find_spec("mpi4py") is None or _mpirun() is None:
        return False
    try:
        res = subprocess.run(
            [sys.executable, "-c", "from mpi4py import MPI"], env=_env(), capture_output=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


@pytest.fixture(scope="module")
def mpi_run(tmp_path_factory):
    if not _have_mpi():
        pytest.skip("mpi4py with a loadable MPI library, or mpirun, is not available (README: MPI)")
    R = 3
    tmp = tmp_path_factory.mktemp("mpi3")
    cases = _cases(R, tmp)
    ck = next(c for c in cases if c["name"] == "ckpt")
    shard_checkpoint(_ckpt_model(ck), ck["load"], 2)
    resume = next(c for c in cases if c["name"] == "resume")
    two = _save_trainer_on_two_ranks(resume, resume["load"])
    return R, {**launch("mpi", R, cases, tmp), "_ckpt_case": ck, "_resume_case": resume, "_two_ranks": two}


# ---------------------------------------------------------------- one-process references


def _ref_neighbors(case: dict):
    E = W.make_table(case["N"], case["D"], case["seed"], case.get("ties", False))
    return qg.class_neighbors(E, case["k"], return_similarity=True, n_threads=1)


def _close(a, b, what: str) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-30)
    err = float(np.abs(a - b).max(initial=0.0))
    assert err <= RTOL * scale, f"{what}: max abs diff {err:.3g} > {RTOL} * {scale:.3g}"


def _check_step(case: dict, ranks: list[dict]) -> None:
    X, y, _ = W.make_batch(case)
    model = qg.QAConvGS(**W.model_config(case))
    out = model.forward_backward(X, y)
    want = np.array([out.loss, out.loss_cls, out.loss_triplet, out.acc_cls, out.acc_triplet])
    for r, d in enumerate(ranks):
        np.testing.assert_allclose(d["loss"], want, rtol=RTOL, atol=1e-7, err_msg=f"rank {r}")
        for k, g in out.grad_head.items():  # replicated: every rank has the global gradient
            # the bias gradients are 0 up to rounding (batch-statistics BN cancels them): atol
            np.testing.assert_allclose(d["gh." + k], g, rtol=RTOL, atol=1e-6, err_msg=f"rank {r} {k}")
        for k, v in model.head_state.items():  # running statistics updated identically
            np.testing.assert_allclose(d["head." + k], np.asarray(v), rtol=1e-6, err_msg=f"rank {r} {k}")
    cat = {k: np.concatenate([d[k] for d in ranks]) for k in ("scores", "candidates", "grad_features", "nbr")}
    np.testing.assert_array_equal(cat["nbr"], model.class_neighbors)
    np.testing.assert_array_equal(cat["candidates"], out.candidates)
    np.testing.assert_allclose(cat["scores"], out.scores, rtol=RTOL, atol=1e-6)
    _close(cat["grad_features"], out.grad_features, "grad_features")
    ids = np.concatenate([d["grad_embed_ids"] for d in ranks])
    rows = np.concatenate([d["grad_embed_rows"] for d in ranks])
    np.testing.assert_array_equal(ids, out.grad_embed_ids)  # shards are contiguous: ids stay sorted
    _close(rows, out.grad_embed_rows, "grad_embed_rows")


# ---------------------------------------------------------------- multi-process tests


def _check_comm(R: int, ranks: list[dict]) -> None:
    gather = np.concatenate(
        [np.arange(q + 1, dtype=np.float32)[:, None] * np.ones((1, 3)) + 10 * q for q in range(R)]
    )
    for r, d in enumerate(ranks):
        np.testing.assert_array_equal(d["gather"], gather)
        assert d["gather_empty"].shape == (sum(range(R)), 2) and d["gather_empty"].dtype == np.int64
        # float64, added in rank order: identical bits on every rank
        want = np.zeros(3)
        for q in range(R):
            want += np.array([0.1 * (q + 1), 1e16, -1e16 + q])
        np.testing.assert_array_equal(d["sum"], want)
        np.testing.assert_array_equal(d["isum"], [R * (R - 1) // 2, R * (R - 1)])
        np.testing.assert_array_equal(d["bcast"], np.full((2, 2), 7.5))
        np.testing.assert_array_equal(d["ring"], [(r - 1) % R])
        want_a2a = np.concatenate([np.full(r + 1, 100 * q + r) for q in range(R)])
        np.testing.assert_array_equal(d["a2a"], want_a2a)


def test_torch_collectives(torch_run):
    R, res = torch_run
    _check_comm(R, res["comm"])


def test_torch_bad_input_on_one_rank_raises_everywhere(torch_run):
    R, res = torch_run
    _check_agree(R, res["agree"])


def _check_agree(R: int, ranks: list[dict]) -> None:
    errs = [str(d["err"]) for d in ranks]
    assert errs[-1].startswith("ValueError") and "labels" in errs[-1], errs
    for e in errs[:-1]:
        assert e.startswith("RuntimeError") and f"[{R - 1}]" in e, errs


@pytest.mark.parametrize("name", ["nb_ties", "nb_full_k", "nb_k1"])
def test_torch_sharded_neighbors_bit_identical(torch_run, name):
    R, res = torch_run
    case = next(c for c in _cases(R) if c["name"] == name)
    idx, sim = _ref_neighbors(case)
    got_i = np.concatenate([d["idx"] for d in res[name]])
    got_s = np.concatenate([d["sim"] for d in res[name]])
    np.testing.assert_array_equal(got_i, idx)
    np.testing.assert_array_equal(got_s, sim)  # the same float32 bits


@pytest.mark.parametrize("name", ["step_sep", "step_shared_batch", "step_batch"])
def test_torch_sharded_step_equals_one_process(torch_run, name):
    R, res = torch_run
    case = next(c for c in _cases(R) if c["name"] == name)
    _check_step(case, res[name])


@pytest.mark.parametrize("name", ["train", "train_sparse_clip", "train_imprint", "train_extras"])
def test_torch_trainer_steps_equal_one_process(torch_run, name):
    """Trainer steps (dense updates; lazy sparse updates with the global-norm clipping active; a
    neighbour refresh mid-way; imprinting from the default start; weighted in-batch extras with aligned
    neighbours) give the one-process parameters."""
    R, res = torch_run
    _check_train(next(c for c in _cases(R) if c["name"] == name), res[name])


def test_torch_adapter_sharded_equals_one_process(torch_run):
    """QAConvGSLoss(comm=...) on R gloo processes: the loss, the gradient reaching each rank's features
    (through a toy backbone), and the parameters after torch.optim.SGD steps with a NeighborRefresh
    equal the one-process module's."""
    pytest.importorskip("torch")
    R, res = torch_run
    _check_torch_loss(next(c for c in _cases(R) if c["name"] == "torch_loss"), res["torch_loss"])


def _check_torch_loss(case: dict, ranks: list[dict]) -> None:
    from qaconv_gs.torch import QAConvGSLoss

    want = W.torch_steps(QAConvGSLoss(**W.model_config(case)), case, slice(None))
    for d in ranks:
        np.testing.assert_allclose(d["losses"], want["losses"], rtol=RTOL)
        assert int(d["refreshes"]) == int(want["refreshes"]) >= 1
        for k in want:
            if k.startswith("state.") and k != "state.class_embed":
                np.testing.assert_allclose(d[k], want[k], rtol=RTOL, atol=1e-7, err_msg=k)
    for step in range(case["steps"]):
        g = np.concatenate([d[f"grad{step}"] for d in ranks])
        _close(g, want[f"grad{step}"], f"features grad, step {step}")
    _close(np.concatenate([d["state.class_embed"] for d in ranks]), want["state.class_embed"], "class_embed")


@pytest.mark.parametrize("init", ["random", "imprint"])
def test_threads_torch_adapter_sharded_equals_one_process(init):
    """The same on thread ranks, with a rank whose local batch is empty, and the module's helpers."""
    pytest.importorskip("torch")
    from qaconv_gs.torch import QAConvGSLoss

    case = {**_TORCH_LOSS, "counts": [5, 0, 7], "init": init}

    def rank(c):
        crit = QAConvGSLoss(**W.model_config(case), comm=c)
        out = W.torch_steps(crit, case, W._slice(case["counts"], c.rank))
        assert f"rank {c.rank}/3" in repr(crit)
        model = crit.to_model()
        assert isinstance(model, ShardedQAConvGS) and model.comm is c
        np.testing.assert_array_equal(model.class_embed, crit.class_embed.detach().numpy())
        back = QAConvGSLoss.from_model(model)
        assert back.class_embed.shape == crit.class_embed.shape
        out["nbr_table"] = np.asarray(crit.class_neighbors)  # gathered (collective)
        X, _, _ = W.make_batch(case)
        out["ids"] = crit.identify(X[:4], top=2)[0].numpy()  # the same probes on every rank
        own = crit.identify(X[W._slice(case["counts"], c.rank)], top=3)  # each rank its own slice
        out["own_ids"], out["own_scores"] = own[0].numpy(), own[1].numpy()
        out["full_ids"], out["full_scores"] = model.gather_model().identify(
            X, top=3
        )  # same bits, one process
        out["match"] = crit.match(X[:3], X[:5]).numpy()
        return out

    ranks = run_threads(3, rank)
    _check_torch_loss(case, ranks)
    one = QAConvGSLoss(**W.model_config(case))
    W.torch_steps(one, case, slice(None))
    X, _, _ = W.make_batch(case)
    for d in ranks:
        np.testing.assert_array_equal(d["nbr_table"], one.class_neighbors)
        np.testing.assert_array_equal(d["ids"], one.identify(X[:4], top=2)[0].numpy())
        np.testing.assert_allclose(d["match"], one.match(X[:3], X[:5]).numpy(), rtol=RTOL, atol=1e-6)
    # the rows trained on thread ranks equal the one-process rows within rounding: bits are compared with
    # the gathered model, the ids with the one-process module too
    np.testing.assert_array_equal(np.concatenate([d["own_ids"] for d in ranks]), ranks[0]["full_ids"])
    np.testing.assert_array_equal(np.concatenate([d["own_scores"] for d in ranks]), ranks[0]["full_scores"])
    np.testing.assert_array_equal(ranks[0]["full_ids"], one.identify(X, top=3)[0].numpy())


def _check_identify(R: int, case: dict, ranks: list[dict]) -> None:
    """Every rank's results are the one-process identify of its own probes, bit for bit."""
    model, P, counts = W.make_identify(case)
    lay = W.layout_of(case, R)
    assert [tuple(d["lo_hi"]) for d in ranks] == [lay.range(r) for r in range(R)]
    for top in case["tops"]:
        ids, sc = model.identify(P, top=top)
        assert [d[f"ids{top}"].shape for d in ranks] == [(c, top) for c in counts]
        np.testing.assert_array_equal(np.concatenate([d[f"ids{top}"] for d in ranks]), ids)
        got = np.concatenate([d[f"scores{top}"] for d in ranks])
        np.testing.assert_array_equal(got.view(np.uint32), sc.view(np.uint32))  # bits, -0.0 included


def _check_identify_errors(R: int, ranks: list[dict]) -> None:
    shape = [str(d["shape"]) for d in ranks]
    assert shape[-1].startswith("ValueError: features: expected shape"), shape
    assert all(e.startswith("RuntimeError") and f"[{R - 1}]" in e for e in shape[:-1]), shape
    rng = [str(d["top_range"]) for d in ranks]
    assert rng[0].startswith("ValueError: top:"), rng
    assert all(e.startswith("RuntimeError") and "[0]" in e for e in rng[1:]), rng
    differs = [str(d["top_differs"]) for d in ranks]
    assert all(e.startswith("ValueError: top: every rank must pass the same top") for e in differs), differs


def test_torch_sharded_identify_equals_one_process(torch_run):
    R, res = torch_run
    _check_identify(R, next(c for c in _cases(R) if c["name"] == "identify"), res["identify"])
    _check_identify_errors(R, res["identify_errors"])


def test_torch_trainer_resume_on_other_world_size(torch_run):
    """A trainer checkpoint saved on 2 ranks resumes on R processes: the one-process continuation, and on
    2 ranks the very bits of the uninterrupted 2-rank run."""
    R, res = torch_run
    _check_resume(R, res["_resume_case"], res["resume"], res["_two_ranks"])


def _one_process_train(case: dict, start: int = 0) -> tuple[qg.QAConvGS, dict]:
    model = qg.QAConvGS(**W.model_config(case))
    trainer = qg.Trainer(model, **W.TRAINER_KW, **case["trainer"])
    return model, W.train_steps(trainer, case, start, case["steps"])


def _check_train(case: dict, ranks: list[dict], ref: dict | None = None) -> None:
    model, want = _one_process_train(case) if ref is None else (None, ref)
    for d in ranks:
        np.testing.assert_allclose(d["losses"], want["losses"][-len(d["losses"]) :], rtol=RTOL)
        for k in ("bn.weight", "fc.weight", "logit_bn.weight", "bn.running_var", "logit_bn.running_mean"):
            np.testing.assert_allclose(d["head." + k], want["head." + k], rtol=RTOL, atol=1e-7, err_msg=k)
    _close(np.concatenate([d["embed"] for d in ranks]), want["embed"], "class_embed")
    np.testing.assert_array_equal(np.concatenate([d["nbr"] for d in ranks]), want["nbr"])


def _check_resume(R: int, case: dict, ranks: list[dict], two: list[dict]) -> None:
    _check_train(case, ranks)
    if R == 2:  # same world size: the continuation is bit-identical to the run that was not stopped
        for d, t in zip(ranks, two):
            np.testing.assert_array_equal(d["losses"], t["losses"][case["saved_at"] :])
            for k in d.keys() - {"losses"}:
                np.testing.assert_array_equal(d[k], t[k], err_msg=k)


def test_mpi_backend(mpi_run):
    R, res = mpi_run
    _check_comm(R, res["comm"])
    for name in ("nb_ties", "nb_full_k"):
        case = next(c for c in _cases(R) if c["name"] == name)
        idx, sim = _ref_neighbors(case)
        np.testing.assert_array_equal(np.concatenate([d["idx"] for d in res[name]]), idx)
        np.testing.assert_array_equal(np.concatenate([d["sim"] for d in res[name]]), sim)
    for name in ("step_sep", "step_shared_batch", "step_batch"):
        _check_step(next(c for c in _cases(R) if c["name"] == name), res[name])
    for name in ("train", "train_sparse_clip"):
        _check_train(next(c for c in _cases(R) if c["name"] == name), res[name])
    try:  # the one-process reference needs torch here (hidden in the sanitizer job; the ranks have it)
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        _check_torch_loss(next(c for c in _cases(R) if c["name"] == "torch_loss"), res["torch_loss"])
    _check_identify(R, next(c for c in _cases(R) if c["name"] == "identify"), res["identify"])
    _check_identify_errors(R, res["identify_errors"])
    _check_resume(R, res["_resume_case"], res["resume"], res["_two_ranks"])
    _check_agree(R, res["agree"])
    _check_ckpt(R, res["_ckpt_case"], res["ckpt"])


# ---------------------------------------------------------------- in-process tests


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.zeros((0, 5), np.int64),
        np.array(3.5),
        np.arange(6, dtype=">f8").reshape(2, 3)[:, ::2],
        np.array([1, 2], np.uint16),
    ],
)
def test_pack_roundtrip(arr):
    out = _unpack(_pack(arr))
    assert out.shape == arr.shape and out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable and out.flags.c_contiguous


def test_unpack_rejects_garbage():
    with pytest.raises(RuntimeError, match="malformed"):
        _unpack(np.zeros(10, np.uint8))
    with pytest.raises(TypeError, match="object"):
        _pack(np.array([object()]))


def test_single_process_communicator():
    c = SingleProcessCommunicator()
    assert isinstance(c, Communicator) and (c.rank, c.size, c.world_size) == (0, 1, 1)
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(c.allgather_concat(x), x)
    assert c.allreduce_sum(x).dtype == np.float64
    assert c.allreduce_sum(np.array([1, 2], np.int32)).dtype == np.int64
    np.testing.assert_array_equal(c.broadcast(x), x)
    np.testing.assert_array_equal(c.ring_shift(x), x)
    np.testing.assert_array_equal(c.alltoallv([x])[0], x)
    c.barrier()
    with pytest.raises(ValueError, match="root"):
        c.broadcast(x, root=1)
    with pytest.raises(TypeError, match="dest"):
        c.sendrecv(x, dest=0.5, source=0)
    with pytest.raises(ValueError, match="send"):
        c.alltoallv([x, x])
    with pytest.raises(TypeError, match="numeric"):
        c.allreduce_sum(np.array(["a"]))


def test_shard_layout():
    lay = ShardLayout.even(10, 3)
    assert lay.bounds == (0, 4, 7, 10)
    assert [lay.range(r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    np.testing.assert_array_equal(lay.owner([0, 3, 4, 6, 7, 9]), [0, 0, 1, 1, 2, 2])
    small = ShardLayout.even(2, 4)  # empty ranks own nothing
    assert [small.size_of(r) for r in range(4)] == [1, 1, 0, 0]
    np.testing.assert_array_equal(small.owner([0, 1]), [0, 1])
    with pytest.raises(ValueError, match="world_size"):
        ShardLayout.even(4, 0)


def test_merge_topk_matches_sort():
    rng = np.random.default_rng(0)
    n, N, k = 6, 40, 5
    sims = rng.integers(0, 6, size=(n, N)).astype(np.float32)  # many ties
    parts = np.array_split(np.arange(N), 4)
    idx_parts = [np.broadcast_to(p, (n, p.size)) for p in parts] + [
        np.broadcast_to(parts[0], (n, parts[0].size))
    ]
    sim_parts = [sims[:, p] for p in parts] + [sims[:, parts[0]]]  # a repeated list (deduplicated)
    got_i, got_s = merge_topk(idx_parts, sim_parts, k)
    for i in range(n):
        order = np.lexsort((np.arange(N), -sims[i]))[:k]
        np.testing.assert_array_equal(got_i[i], order)
        np.testing.assert_array_equal(got_s[i], sims[i, order])


def test_sharded_neighbors_single_process_is_class_neighbors():
    E = W.make_table(30, 12, 3, ties=True)
    idx, sim = qg.class_neighbors(E, 6, return_similarity=True)
    got = sharded_class_neighbors(E, 6, return_similarity=True)
    np.testing.assert_array_equal(got[0], idx)
    np.testing.assert_array_equal(got[1], sim)
    with pytest.raises(ValueError, match="k"):
        sharded_class_neighbors(E, 30)
    with pytest.raises(ValueError, match="E_local"):
        sharded_class_neighbors(np.full((3, 2), np.nan), 1)
    with pytest.raises(ValueError, match="layout"):
        sharded_class_neighbors(E, 2, layout=ShardLayout.even(31, 1))


def test_draw_shard_is_the_full_draw():
    full = np.random.default_rng(7).standard_normal((13, 2, 3, 1), dtype=np.float32)
    for lo, hi in [(0, 13), (0, 5), (5, 9), (12, 13), (4, 4)]:
        rng = np.random.default_rng(7)
        got = _draw_shard(rng, 13, (2, 3, 1), lo, hi)
        np.testing.assert_array_equal(got, full[lo:hi])
    rng = np.random.default_rng(7)
    _draw_shard(rng, 13, (2, 3, 1), 2, 3)  # generator state afterwards: as after the full draw
    ref = np.random.default_rng(7)
    ref.standard_normal((13, 2, 3, 1), dtype=np.float32)
    assert rng.uniform() == ref.uniform()


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("fc", ["separate", "shared"])
def test_sharded_head_single_process_matches_c_head(fc, weighted):
    """The NumPy head over all-reduced sums equals the C head, with and without per-pair statistics
    weights (a weighted restricted step's extras)."""
    rng = np.random.default_rng(1)
    S, M = 10, 40
    mp, mg = rng.random((M, S), dtype=np.float32), rng.random((M, S), dtype=np.float32)
    wts = None
    if weighted:
        wts = np.ones(M, np.float32)
        wts[rng.random(M) < 0.4] = np.float32(37.5)
    h1 = qg.functional.init_head(S, fc, np.random.default_rng(2))
    h1["bn.weight"][...] = 1.3
    h1["logit_bn.weight"][...] = 0.7
    h2 = {k: np.array(v, copy=True) for k, v in h1.items()}
    o1, c1 = qg.functional.head_forward(mp, mg, h1, fc=fc, weights=wts)
    comm = SingleProcessCommunicator()
    o2, c2 = sharded_head_forward(mp, mg, h2, fc, comm, weights=wts)
    np.testing.assert_allclose(o2, o1, rtol=1e-6, atol=1e-6)
    for k in h1:
        np.testing.assert_allclose(np.asarray(h2[k]), np.asarray(h1[k]), rtol=1e-6)
    g = rng.standard_normal(M).astype(np.float32)
    a, b = qg.functional.head_backward(g, c1), sharded_head_backward(g, c2, comm)
    _close(b[0], a[0], "grad_mp")
    _close(b[1], a[1], "grad_mg")
    for k in a[2]:
        np.testing.assert_allclose(b[2][k], a[2][k], rtol=1e-5, atol=1e-9, err_msg=k)
    with pytest.raises(ValueError, match="M >= 2"):
        sharded_head_forward(mp[:1], mg[:1], h2, fc, comm)


@pytest.mark.parametrize("triplet", ["class", "batch"])
def test_sharded_model_single_process_equals_qaconvgs(triplet):
    case = {
        "N": 15,
        "C": 6,
        "H": 2,
        "W": 3,
        "k": 5,
        "seed": 11,
        "data_seed": 2,
        "counts": [8],
        "triplet": triplet,
    }
    got = _single_step(case)
    _check_step(case, [got])
    if triplet == "class":  # one rank: the same kernel calls and the same head arithmetic, so the same bits
        X, y, _ = W.make_batch(case)
        out = qg.QAConvGS(**W.model_config(case)).forward_backward(X, y)
        np.testing.assert_array_equal(got["scores"], out.scores)
        np.testing.assert_array_equal(got["grad_features"], out.grad_features)
        np.testing.assert_array_equal(got["grad_embed_rows"], out.grad_embed_rows)


def _single_step(case: dict) -> dict:
    X, y, _ = W.make_batch(case)
    model = ShardedQAConvGS(**W.model_config(case))
    return W.step_record(model, model.forward_backward(X, y))


@pytest.mark.parametrize("init", ["imprint", "random"])
def test_sharded_model_start_equals_qaconvgs(init):
    """The same defaults as QAConvGS: init="imprint" starts with every row unset (zero), and either start
    gives the one-process table and head."""
    dims = dict(num_classes=12, channels=4, height=2, width=2, k_nearest=3, seed=5)
    m = qg.QAConvGS(**dims, init=init)
    s = ShardedQAConvGS(**dims, init=init)
    assert (ShardedQAConvGS(**dims).config == s.config) == (init == "imprint")
    assert s.config == m.config
    np.testing.assert_array_equal(s.class_embed, m.class_embed)
    assert s.class_embed.any() == (init == "random")
    for k, v in m.head_state.items():
        np.testing.assert_array_equal(np.asarray(s.head_state[k]), np.asarray(v))


def test_sharded_model_construction_and_gather():
    m = qg.QAConvGS(num_classes=12, channels=4, height=2, width=2, k_nearest=3, seed=5, init="random")
    s = ShardedQAConvGS(num_classes=12, channels=4, height=2, width=2, k_nearest=3, seed=5, init="random")
    np.testing.assert_array_equal(s.class_embed, m.class_embed)
    for k, v in m.head_state.items():
        np.testing.assert_array_equal(np.asarray(s.head_state[k]), np.asarray(v))
    f = ShardedQAConvGS.from_model(m)
    np.testing.assert_array_equal(f.class_embed, m.class_embed)
    f.refresh_neighbors()
    g = f.gather_model()
    np.testing.assert_array_equal(g.class_embed, m.class_embed)
    assert not g.neighbors_stale
    np.testing.assert_array_equal(g.class_neighbors, m.class_neighbors)
    assert s.parameters()["class_embed"] is s.class_embed
    assert "rank 0/1" in repr(s)
    unseeded = ShardedQAConvGS(num_classes=4, channels=2, height=1, width=1, k_nearest=1)
    assert isinstance(unseeded.seed, int)
    with pytest.raises(ValueError, match="k_nearest"):
        ShardedQAConvGS(num_classes=4, channels=2, height=1, width=1, k_nearest=4)
    with pytest.raises(ValueError, match="fc"):
        ShardedQAConvGS(num_classes=4, channels=2, height=1, width=1, k_nearest=1, fc="x")
    with pytest.raises(TypeError, match="comm"):
        ShardedQAConvGS(num_classes=4, channels=2, height=1, width=1, k_nearest=1, comm=object())
    with pytest.raises(ValueError, match="layout"):
        ShardedQAConvGS(
            num_classes=4, channels=2, height=1, width=1, k_nearest=1, layout=ShardLayout.even(4, 2)
        )
    with pytest.raises(ValueError, match="features"):
        s.forward_backward(np.zeros((2, 3, 2, 2)), [0, 1])
    with pytest.raises(ValueError, match="labels"):
        s.forward_backward(np.zeros((2, 4, 2, 2)), [0, 12])


# ---------------------------------------------------------------- checkpoints


def test_torch_sharded_checkpoint_roundtrip(torch_run):
    """A 2-shard checkpoint loads on R ranks; what R ranks save after a step loads on 1 and on 3 ranks."""
    R, res = torch_run
    _check_ckpt(R, res["_ckpt_case"], res["ckpt"])


def _check_ckpt(R: int, case: dict, ranks: list[dict]) -> None:
    model = _ckpt_model(case)
    np.testing.assert_array_equal(np.concatenate([d["loaded"] for d in ranks]), model.class_embed)
    np.testing.assert_array_equal(np.concatenate([d["loaded_nbr"] for d in ranks]), model.class_neighbors)
    X, y, _ = W.make_batch(case)
    trainer = qg.Trainer(model, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, sparse_embed=False)
    loss = trainer.step(X, y).loss
    for d in ranks:
        np.testing.assert_allclose(d["loss"], [loss], rtol=RTOL)
    one = load_sharded_model(case["save"])
    _close(one.class_embed, model.class_embed, "class_embed")
    for k, v in model.head_state.items():
        np.testing.assert_allclose(np.asarray(one.head_state[k]), np.asarray(v), rtol=RTOL, atol=1e-7)
    three = [load_sharded(case["save"], _RankView(r, 3)) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate([m.class_embed for m in three]), one.class_embed)
    files = sorted(os.listdir(case["save"]))
    assert len(files) == R + 2, files  # one generation left: R shards, the head, the manifest


class _RankView(Communicator):
    """rank / size only: for loading one rank's shard in this process (loading needs no collective)."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def _allgather_bytes(self, buf):
        raise AssertionError("collective called")

    _broadcast_bytes = _sendrecv_bytes = barrier = _allgather_bytes


def test_sharded_checkpoint_in_process(tmp_path):
    model = qg.QAConvGS(num_classes=10, channels=3, height=2, width=2, k_nearest=3, seed=4, init="random")
    model.refresh_neighbors()
    shard_checkpoint(model, tmp_path / "ck", 3)
    for R in (1, 2, 4):
        parts = [load_sharded(tmp_path / "ck", _RankView(r, R)) for r in range(R)]
        np.testing.assert_array_equal(np.concatenate([p.class_embed for p in parts]), model.class_embed)
        np.testing.assert_array_equal(
            np.concatenate([p.local_neighbors for p in parts]), model.class_neighbors
        )
    back = load_sharded_model(tmp_path / "ck")
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v)
    # a one-process .npz checkpoint loads into shards too
    model.save(tmp_path / "one.npz")
    parts = [load_sharded(tmp_path / "one.npz", _RankView(r, 2)) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([p.class_embed for p in parts]), model.class_embed)
    # the single-process sharded model saves (1 shard) and loads back
    s = ShardedQAConvGS.from_model(model)
    s.save(tmp_path / "s1")
    np.testing.assert_array_equal(ShardedQAConvGS.load(tmp_path / "s1").class_embed, model.class_embed)


def test_sharded_options_and_configs_round_trip():
    """ShardedQAConvGS validates the options as QAConvGS does and keeps every option in config, so configs
    build either model."""
    dims = dict(num_classes=6, channels=2, height=1, width=2, k_nearest=2, seed=3)
    with pytest.raises(ValueError, match="init"):
        ShardedQAConvGS(**dims, init="zeros")
    with pytest.raises(ValueError, match="imprint_samples"):
        ShardedQAConvGS(**dims, imprint_samples=0)
    with pytest.raises(TypeError, match="k_mined"):
        ShardedQAConvGS(**dims, k_mined=1.5)
    with pytest.raises(ValueError, match="^weighted_extras: needs triplet='batch'"):
        ShardedQAConvGS(**dims, k_batch=1, weighted_extras=True)
    for init in ("imprint", "random"):
        s = ShardedQAConvGS(
            **dims, init=init, imprint_samples=5, k_mined=1, k_batch=1, neighbors_by="aligned"
        )
        assert s.config["k_mined"] == 1 and s.config["imprint_samples"] == 5
        assert s.num_candidates == qg.QAConvGS(**s.config).num_candidates == 5
        one = qg.QAConvGS.from_config(s.config)
        assert one.config == s.config and one.init == init
        np.testing.assert_array_equal(one.class_embed, s.class_embed)
        assert ShardedQAConvGS(**one.config).config == one.config
        assert s.gather_model().config == s.config


def _half_imprinted(N: int = 9) -> qg.QAConvGS:
    """An init="imprint" model part way through imprinting: rows 0-1 unset, the others imprinted from 1
    to 3 samples (imprint_samples=2: some still open), neighbour table built mid-way."""
    model = qg.QAConvGS(num_classes=N, channels=2, height=1, width=2, k_nearest=2, seed=3, imprint_samples=2)
    rng = np.random.default_rng(0)
    y = np.array([2, 3, 3, 4, 5, 6, 7, 8, 8, 8])
    model.forward_backward(rng.standard_normal((y.size, 2, 1, 2)).astype(np.float32), y)
    return model


def _check_same_imprint_state(got: qg.QAConvGS, want: qg.QAConvGS) -> None:
    assert got.config == want.config
    np.testing.assert_array_equal(got.class_embed, want.class_embed)
    np.testing.assert_array_equal(got._imprinted, want._imprinted)
    assert got.neighbors_stale == want.neighbors_stale
    if not want.neighbors_stale:
        np.testing.assert_array_equal(got.class_neighbors, want.class_neighbors)
        assert got._imprinted_at_refresh == want._imprinted_at_refresh


def test_sharded_imprint_state_round_trips(tmp_path):
    """A one-process model part way through imprinting shards with its unset rows, imprint counts and
    neighbour table (from_model, shard_checkpoint, its .npz, a sharded save, a trainer checkpoint through
    Trainer.from_checkpoint(comm=...)) and gathers back to the same state."""
    model = _half_imprinted()
    assert set(model._imprinted.tolist()) == {0, 1, 2, 3} and not model.neighbors_stale
    assert model._imprinted_at_refresh == 7
    for R in (1, 2, 3):
        parts = [ShardedQAConvGS.from_model(model, _RankView(r, R)) for r in range(R)]
        np.testing.assert_array_equal(np.concatenate([p._imprinted for p in parts]), model._imprinted)
        assert {p._imprinted_at_refresh for p in parts} == {7}
    s = ShardedQAConvGS.from_model(model)
    _check_same_imprint_state(s.gather_model(), model)
    _check_same_imprint_state(s.copy().gather_model(), model)
    shard_checkpoint(model, tmp_path / "ck", 2)
    _check_same_imprint_state(load_sharded_model(tmp_path / "ck"), model)
    parts = [load_sharded(tmp_path / "ck", _RankView(r, 3)) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate([p._imprinted for p in parts]), model._imprinted)
    model.save(tmp_path / "one.npz")
    _check_same_imprint_state(load_sharded(tmp_path / "one.npz").gather_model(), model)
    s.save(tmp_path / "s1")
    _check_same_imprint_state(load_sharded_model(tmp_path / "s1"), model)
    qg.Trainer(model, **W.TRAINER_KW).save_checkpoint(tmp_path / "trainer.npz")
    t = qg.Trainer.from_checkpoint(tmp_path / "trainer.npz", comm=SingleProcessCommunicator())
    assert isinstance(t.model, ShardedQAConvGS)
    _check_same_imprint_state(t.model.gather_model(), model)
    # a file without imprint counts (init="random" saves none, one-process or sharded): its rows count as
    # fully imprinted, so an init="imprint" model that loads them does not overwrite them
    rnd = qg.QAConvGS(**{**model.config, "init": "random"})
    rnd.save(tmp_path / "random.npz")
    assert (load_sharded(tmp_path / "random.npz")._imprinted == 2).all()
    ShardedQAConvGS.from_model(rnd).save(tmp_path / "random_dir")
    assert (load_sharded(tmp_path / "random_dir")._imprinted == 2).all()
    into = ShardedQAConvGS(**model.config)  # init="imprint", every row unset
    into.load_checkpoint(tmp_path / "random_dir")
    X = np.random.default_rng(1).standard_normal((4, 2, 1, 2)).astype(np.float32)
    into.forward_backward(X, [0, 1, 2, 3])  # nothing is open: the loaded rows are not imprinted over
    np.testing.assert_array_equal(into.class_embed, rnd.class_embed)


def test_sharded_checkpoint_errors(tmp_path):
    model = qg.QAConvGS(num_classes=6, channels=2, height=1, width=2, k_nearest=2, seed=1, init="random")
    ck = tmp_path / "ck"
    shard_checkpoint(model, ck, 2)
    with pytest.raises(ValueError, match="manifest"):
        load_sharded(tmp_path / "missing")
    man = json.loads((ck / "manifest.json").read_text())
    # a shard from another save (generation mismatch) is refused
    other = tmp_path / "other"
    shard_checkpoint(model, other, 2)
    om = json.loads((other / "manifest.json").read_text())
    os.replace(other / om["shards"][1]["file"], ck / man["shards"][1]["file"])
    with pytest.raises(ValueError, match="generation"):
        load_sharded_model(ck)
    bad = dict(man, bounds=[0, 4, 5])
    (ck / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bounds"):
        load_sharded_model(ck)
    (ck / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest"):
        load_sharded_model(ck)


# ---------------------------------------------------------------- R ranks as threads (in-process)


@given(
    R=st.integers(1, 6),
    N=st.integers(2, 40),
    D=st.integers(1, 40),
    kf=st.floats(0.0, 1.0),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_threads_sharded_neighbors_property(R, N, D, kf, ties, seed):
    """Any world size (empty ranks when N < R), any k: the same indices and similarity bits."""
    k = 1 + int(kf * (N - 2))
    E = W.make_table(N, D, seed, ties)
    lay = ShardLayout.even(N, R)
    res = run_threads(
        R, lambda c: sharded_class_neighbors(E[slice(*lay.range(c.rank))], k, c, return_similarity=True)
    )
    idx, sim = qg.class_neighbors(E, k, return_similarity=True)
    np.testing.assert_array_equal(np.concatenate([r[0] for r in res]), idx)
    np.testing.assert_array_equal(np.concatenate([r[1] for r in res]), sim)


@pytest.mark.parametrize(
    "bounds",
    [
        (0, 1, 30),  # R = 2, rank 0 owns one class: the split pair is computed by rank 1 alone
        (0, 29, 30),  # R = 2, rank 1 owns one class
        (0, 0, 30),  # R = 2, rank 0 owns none
        (0, 1, 1, 20, 30),  # R = 4: sizes 1, 0, 19, 10
        (0, 8, 15, 23, 30),  # R = 4, even split: distance-2 pairs split by rows
        (0, 0, 0, 30, 30),  # R = 4, one rank owns everything
        (0, 10, 11, 11, 25, 30),  # R = 5
    ],
)
def test_threads_sharded_neighbors_uneven_layouts(bounds):
    N = bounds[-1]
    lay = ShardLayout(N, len(bounds) - 1, bounds)
    assert sum(ring_pairs_per_rank(lay)) == N * (N - 1) // 2
    E = W.make_table(N, 37, 11, ties=True)
    for k in (1, 9, N - 1):
        res = run_threads(
            lay.world_size,
            lambda c, k=k: sharded_class_neighbors(
                E[slice(*lay.range(c.rank))], k, c, layout=lay, return_similarity=True, n_threads=2
            ),
        )
        idx, sim = qg.class_neighbors(E, k, return_similarity=True)
        np.testing.assert_array_equal(np.concatenate([r[0] for r in res]), idx)
        np.testing.assert_array_equal(
            np.concatenate([r[1] for r in res]).view(np.uint32), sim.view(np.uint32)
        )


@pytest.mark.parametrize("R", [2, 3, 4, 5, 6])
def test_threads_sharded_neighbors_every_pair_once_and_balanced(R, monkeypatch):
    """The ring computes every pair of classes exactly once (diagonal blocks with the symmetric kernel, cross
    blocks with the cross kernel, never a block with itself twice) and splits the work evenly: per rank
    within one row-block of N^2 / (2R) pairs (with R = 2 both ranks work)."""
    import threading

    from qaconv_gs.distributed import neighbors as dn

    N = 48
    E = W.make_table(N, 20, 5)
    lay = ShardLayout.even(N, R)
    cover = np.zeros((N, N), np.int64)
    work: dict[int, int] = {}
    ranks: dict[int, int] = {}
    lock = threading.Lock()
    real = dn._native

    class Counting:
        def neighbors_topk(self, rows, k, nt, want):
            lo = int(np.flatnonzero((E == rows[0]).all(axis=1))[0])
            with lock:
                cover[lo : lo + len(rows), lo : lo + len(rows)] += 1
                work[threading.get_ident()] = (
                    work.get(threading.get_ident(), 0) + len(rows) * (len(rows) - 1) // 2
                )
            return real.neighbors_topk(rows, k, nt, want)

        def neighbors_cross_topk(self, a, b, a0, b0, k, nt, want):
            with lock:
                cover[a0 : a0 + len(a), b0 : b0 + len(b)] += 1
                cover[b0 : b0 + len(b), a0 : a0 + len(a)] += 1
                work[threading.get_ident()] = work.get(threading.get_ident(), 0) + len(a) * len(b)
            return real.neighbors_cross_topk(a, b, a0, b0, k, nt, want)

    monkeypatch.setattr(dn, "_native", Counting())

    def rank(c):
        ranks[c.rank] = threading.get_ident()
        return sharded_class_neighbors(E[slice(*lay.range(c.rank))], 7, c, return_similarity=True)

    res = run_threads(R, rank)
    np.testing.assert_array_equal(cover, np.ones((N, N), np.int64))  # every pair once (and i == j once)
    per_rank = [work.get(ranks[r], 0) for r in range(R)]
    assert sum(per_rank) == N * (N - 1) // 2
    assert per_rank == ring_pairs_per_rank(lay)
    n = N // R
    assert max(per_rank) - min(per_rank) <= n * (n + 1) // 2, per_rank
    idx, sim = qg.class_neighbors(E, 7, return_similarity=True)
    np.testing.assert_array_equal(np.concatenate([r[0] for r in res]), idx)
    np.testing.assert_array_equal(np.concatenate([r[1] for r in res]), sim)


def _thread_step(case: dict, R: int) -> list[dict]:
    X, y, counts = W.make_batch(case)

    def rank(c):
        off = sum(counts[: c.rank])
        sl = slice(off, off + counts[c.rank])
        m = ShardedQAConvGS(**W.model_config(case), comm=c)
        return W.step_record(m, m.forward_backward(X[sl], y[sl]))

    return run_threads(R, rank)


@given(
    counts=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    N=st.integers(2, 25),
    kf=st.floats(0.0, 1.0),
    fc=st.sampled_from(["separate", "shared"]),
    triplet=st.sampled_from(["class", "batch"]),
    seed=st.integers(0, 1000),
)
def test_threads_sharded_step_property(counts, N, kf, fc, triplet, seed):
    """Any world size, uneven batches, empty shards, both fc and triplet modes: equal to one process."""
    k = 1 + int(kf * (N - 2))
    case = {"N": N, "C": 5, "H": 2, "W": 2, "k": k, "seed": seed, "data_seed": seed + 1, "counts": counts}
    case.update(fc=fc, triplet=triplet)
    _check_step(case, _thread_step(case, len(counts)))


def test_run_threads_errors():
    def fails_on_one(c):
        if c.rank == 1:
            raise KeyError("boom")
        c.barrier()  # the other ranks would wait for rank 1 forever without the abort
        return c.rank

    with pytest.raises(KeyError, match="boom"):
        run_threads(3, fails_on_one, timeout_s=20)
    assert run_threads(2, lambda c: c.allreduce_sum(np.array([c.rank + 1.0]))[0]) == [3.0, 3.0]
    with pytest.raises(ValueError, match="size"):
        run_threads(0, lambda c: None)

    def agree(c):
        try:
            c.agree(ValueError("labels: bad") if c.rank == 0 else None)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    out = run_threads(3, agree)
    assert out[0] == "ValueError: labels: bad" and all(
        o.startswith("RuntimeError") and "[0]" in o for o in out[1:]
    )


def test_threads_sharded_checkpoint_with_row_extra(tmp_path):
    """Saved by 3 thread ranks with per-row optimiser state; re-sharded on 2 and 1 ranks."""
    model = qg.QAConvGS(num_classes=11, channels=3, height=2, width=1, k_nearest=2, seed=8, init="random")
    model.refresh_neighbors()
    mom = np.arange(11 * 6, dtype=np.float32).reshape(11, 3, 2, 1)
    ck = tmp_path / "ck"

    def save(c):
        s = ShardedQAConvGS.from_model(model, comm=c)
        s.save(ck, row_extra={"momentum": mom[s.lo : s.hi]}, extra={"step": np.array(7)})
        return s.lo, s.hi

    run_threads(3, save)
    for R in (1, 2, 4):
        parts = [load_sharded(ck, _RankView(r, R), return_extra=True) for r in range(R)]
        np.testing.assert_array_equal(np.concatenate([p[0].class_embed for p in parts]), model.class_embed)
        np.testing.assert_array_equal(np.concatenate([p[1]["momentum"] for p in parts]), mom)
        assert all(int(p[2]["step"]) == 7 for p in parts)
    one = load_sharded_model(ck)
    np.testing.assert_array_equal(one.class_embed, model.class_embed)
    np.testing.assert_array_equal(one.class_neighbors, model.class_neighbors)

    def bad_rows(c):
        s = ShardedQAConvGS.from_model(model, comm=c)
        rows = mom[s.lo : s.hi] if c.rank else mom[:1]
        try:
            s.save(tmp_path / "bad", row_extra={"momentum": rows})
        except (ValueError, RuntimeError) as exc:
            return type(exc).__name__ + ": " + str(exc)

    out = run_threads(2, bad_rows)
    assert out[0].startswith("ValueError") and "row_extra" in out[0] and out[1].startswith("RuntimeError")
    assert not (tmp_path / "bad").exists()


def test_threads_rows_for_step_and_global_norm():
    """rows_for_step(labels) lists exactly the rows the next step reads (and reuses its gather); the
    result's grad_embed_sqnorm is the squared norm of the whole (one-process) embedding gradient."""
    case = {"N": 17, "C": 4, "H": 2, "W": 2, "k": 3, "seed": 2, "data_seed": 3, "counts": [3, 5, 2]}
    X, y, counts = W.make_batch(case)

    def rank(c):
        off = sum(counts[: c.rank])
        sl = slice(off, off + counts[c.rank])
        m = ShardedQAConvGS(**W.model_config(case), comm=c)
        rows = m.rows_for_step(y[sl])
        sent = c.bytes_sent
        out = m.forward_backward(X[sl], y[sl])
        gathered_again = c.bytes_sent - sent
        plain = m.forward_backward(X[sl], y[sl])  # without rows_for_step: gathers the labels itself
        return rows, out, gathered_again, c.bytes_sent - sent - gathered_again, plain

    res = run_threads(3, rank)
    ref = qg.QAConvGS(**W.model_config(case)).forward_backward(X, y)
    for rows, out, with_prep, without_prep, plain in res:
        np.testing.assert_array_equal(rows, out.grad_embed_ids)
        np.testing.assert_array_equal(out.scores, plain.scores)
        assert with_prep < without_prep  # the label / candidate gathers were skipped
        np.testing.assert_allclose(
            out.grad_embed_sqnorm, np.square(ref.grad_embed_rows, dtype=np.float64).sum()
        )


# ---------------------------------------------------------------- Trainer on thread ranks (in-process)


def test_threads_sharded_step_with_empty_local_batches():
    """A rank with no sample in the step (B_r = 0) still scores and updates its classes; both triplet
    modes. A global batch with no sample at all is refused on every rank."""
    for triplet in ("class", "batch"):
        for counts in ([3, 0, 4], [0, 5], [0, 0, 2], [2, 0]):
            case = {"N": 13, "C": 4, "H": 2, "W": 2, "k": 3, "seed": 1, "data_seed": 2, "counts": counts}
            case["triplet"] = triplet
            got = _thread_step(case, len(counts))
            assert [d["grad_features"].shape[0] for d in got] == counts
            _check_step(case, got)

    def empty(c):
        m = ShardedQAConvGS(num_classes=5, channels=2, height=1, width=1, k_nearest=2, seed=0, comm=c)
        with pytest.raises(ValueError, match="global batch is empty"):
            m.forward_backward(np.zeros((0, 2, 1, 1), np.float32), np.zeros(0, np.int64))
        return True

    assert run_threads(2, empty) == [True, True]


# ---------------------------------------------------------------- sharded identify on thread ranks


@pytest.mark.parametrize("block", [1024, 2], ids=["one_block", "blocks_of_2"])
@pytest.mark.parametrize(
    "bounds, counts",
    [
        ((0, 6, 13), [5, 4]),
        ((0, 13, 13), [0, 7]),  # rank 1 owns no class, rank 0 has no probe
        ((0, 0, 4, 13), [4, 0, 3]),  # rank 0 owns no class, rank 1 has no probe
        ((0, 5, 9, 13), [1, 1, 1]),
        ((0, 1, 1, 10, 13), [3, 0, 2, 4]),  # sizes 1, 0, 9, 3
        ((0, 3, 6, 10, 13), [0, 0, 0, 5]),  # one rank has every probe
    ],
)
def test_threads_sharded_identify_equals_one_process(monkeypatch, block, bounds, counts):
    """Each rank's identify of its own probes is the one-process identify of all ranks' probes, bit for
    bit (ids and score bits), ties to the lower class id across ranks, for top = 1 .. N; several blocks
    per rank with block = 2."""
    import qaconv_gs.model as model_mod

    monkeypatch.setattr(model_mod, "_IDENTIFY_BLOCK", block)
    case = {**_IDENTIFY, "counts": counts}
    model, P, _ = W.make_identify(case)
    lay = ShardLayout(case["N"], len(bounds) - 1, bounds)
    tops = (1, 2, 3, 5, case["N"])

    def rank(c):
        sharded = ShardedQAConvGS.from_model(model, comm=c, layout=lay)
        sl = W._slice(counts, c.rank)
        return [sharded.identify(P[sl], top=t) for t in tops]

    res = run_threads(lay.world_size, rank, timeout_s=60)
    for i, top in enumerate(tops):
        ids, sc = model.identify(P, top=top)
        assert [r[i][0].shape for r in res] == [(c, top) for c in counts]
        assert all(r[i][0].dtype == np.int64 and r[i][1].dtype == np.float32 for r in res)
        np.testing.assert_array_equal(np.concatenate([r[i][0] for r in res]), ids, err_msg=f"top {top}")
        got = np.concatenate([r[i][1] for r in res])
        np.testing.assert_array_equal(got.view(np.uint32), sc.view(np.uint32), err_msg=f"top {top}")
    # the case does test ties: the first probe's best four classes are the copies 3, 7, 9, 12
    ids, sc = model.identify(P[:1], top=4)
    assert ids[0].tolist() == [3, 7, 9, 12] and len(set(sc[0].tolist())) == 1


def test_threads_sharded_identify_moves_probes_not_rows():
    """Each rank receives the other ranks' normalised probes and the candidate lists of its own probes,
    far less than one other rank's class rows (the table is never assembled)."""
    N, C, H, W_ = 300, 8, 3, 2
    model = qg.QAConvGS(num_classes=N, channels=C, height=H, width=W_, k_nearest=3, seed=4, init="random")
    P = np.random.default_rng(5).standard_normal((6, C, H, W_)).astype(np.float32)
    top = 5

    def rank(c):
        sharded = ShardedQAConvGS.from_model(model, comm=c)
        sl = W._slice([2, 2, 2], c.rank)
        c.reset_counters()
        out = sharded.identify(P[sl], top=top)
        return out, c.bytes_received, sharded.hi - sharded.lo

    res = run_threads(3, rank)
    want = model.identify(P, top=top)
    np.testing.assert_array_equal(np.concatenate([r[0][0] for r in res]), want[0])
    D = C * H * W_
    for _, received, n_r in res:
        other_rows = (N - n_r) * D * 4
        # 4 probes of the other ranks + 2 x 2 lists of [2, top] ids and scores, plus message headers
        payload = 4 * D * 4 + 2 * 2 * top * (8 + 4)
        assert payload <= received <= payload + 1024 < other_rows / 10, (received, payload, other_rows)


def test_threads_sharded_identify_errors_raise_on_every_rank():
    """Bad input on one rank raises there (ValueError / TypeError naming the argument) and RuntimeError
    naming it on the others; disagreements between ranks (top, model shape) and an empty global batch
    raise ValueError on every rank. Nothing waits (a short communicator timeout would fail the test)."""
    model, P, _ = W.make_identify({**_IDENTIFY, "counts": [6]})
    N = model.num_classes

    def errors(R, make_args, models=None):
        def rank(c):
            sharded = models(c) if models else ShardedQAConvGS.from_model(model, comm=c)
            feats, top = make_args(c.rank)
            try:
                sharded.identify(feats, top=top)
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            return ""

        return run_threads(R, rank, timeout_s=20)

    def one_bad(out, bad_rank, prefix):
        assert out[bad_rank].startswith(prefix), out
        assert all(
            e.startswith("RuntimeError") and f"[{bad_rank}]" in e for q, e in enumerate(out) if q != bad_rank
        )

    one_bad(
        errors(3, lambda r: (P[:2, :-1] if r == 1 else P[:2], 2)), 1, "ValueError: features: expected shape"
    )
    one_bad(errors(2, lambda r: (P[:2, :, :, :1] if r == 0 else P[:2], 2)), 0, "ValueError: features")
    nan = P[:2].copy()
    nan[1, 0, 0, 0] = np.nan
    one_bad(errors(3, lambda r: (nan if r == 2 else P[:2], 2)), 2, "ValueError: features")
    one_bad(
        errors(2, lambda r: (P[:2].astype(np.complex64) if r == 1 else P[:2], 2)), 1, "TypeError: features"
    )
    one_bad(errors(3, lambda r: (P[:2], 0 if r == 2 else 1)), 2, "ValueError: top:")
    one_bad(errors(2, lambda r: (P[:2], N + 1 if r == 0 else N)), 0, "ValueError: top:")
    one_bad(errors(2, lambda r: (P[:2], 2.0 if r == 1 else 2)), 1, "TypeError: top")
    for top in (0, N + 1, -3):  # out of range everywhere: each rank reports its own error
        assert all(e.startswith("ValueError: top:") for e in errors(3, lambda r, t=top: (P[:1], t)))
    differs = errors(3, lambda r: (P[:2], 1 + r))
    assert all(e.startswith("ValueError: top: every rank must pass the same top") for e in differs)
    empty = errors(2, lambda r: (P[:0], 1))
    assert all(e.startswith("ValueError: features: the global batch is empty") for e in empty), empty

    other = qg.QAConvGS(**{**model.config, "num_classes": N + 1})
    mixed = errors(
        2,
        lambda r: (P[:2], 2),
        models=lambda c: ShardedQAConvGS.from_model(other if c.rank == 1 else model, comm=c),
    )
    assert all(e.startswith("ValueError: identify: the ranks' models disagree") for e in mixed), mixed
    diverged = qg.QAConvGS(**model.config)
    diverged.load_state_dict(model.state_dict())
    diverged.parameters()["class_embed"][11, 0, 0, 0] = np.inf  # a class of the last rank
    out = errors(3, lambda r: (P[:2], 2), models=lambda c: ShardedQAConvGS.from_model(diverged, comm=c))
    one_bad(out, 2, "ValueError")
    assert "NaN or Inf" in out[2], out
    # after all that, the same ranks still identify correctly (no message was left in flight)
    ok = errors(2, lambda r: (P[:3] if r == 0 else P[3:], 4))
    assert ok == ["", ""]

    single = ShardedQAConvGS.from_model(model)  # one rank: QAConvGS.identify
    for got, want in zip(single.identify(P, top=3), model.identify(P, top=3)):
        np.testing.assert_array_equal(got, want)


def test_threads_one_bad_rank_in_neighbors_and_torch_loss_raises_everywhere():
    """A NaN shard or a bad k on one rank in sharded_class_neighbors (also reached by a stale model's
    step), and bad input on one rank of a sharded QAConvGSLoss: the bad rank raises its error, the others
    a RuntimeError naming it, nothing waits, and the same ranks go on to compute correctly."""
    rng = np.random.default_rng(3)
    E = rng.standard_normal((9, 4, 2, 2)).astype(np.float32)
    lay = ShardLayout.even(9, 3)

    def neighbors(bad_rank, kind):
        def rank(c):
            lo, hi = lay.range(c.rank)
            mine, k = E[lo:hi].copy(), 3
            if c.rank == bad_rank and kind == "nan":
                mine[0, 0, 0, 0] = np.nan
            if c.rank == bad_rank and kind == "k":
                k = 2.5
            try:
                sharded_class_neighbors(mine, k, c)
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            return sharded_class_neighbors(E[lo:hi], 3, c)  # still in step afterwards

        return run_threads(3, rank, timeout_s=20)

    for bad_rank, kind, prefix in [(1, "nan", "ValueError: E_local"), (2, "k", "TypeError: k")]:
        out = neighbors(bad_rank, kind)
        assert out[bad_rank].startswith(prefix), out
        assert all(
            e.startswith("RuntimeError") and f"[{bad_rank}]" in e for q, e in enumerate(out) if q != bad_rank
        )
    want = qg.class_neighbors(E, 3)

    def differing_k(c):
        try:
            sharded_class_neighbors(E[slice(*lay.range(c.rank))], 2 + c.rank, c)
        except ValueError as exc:
            return str(exc)
        return ""

    assert all(e.startswith("k: every rank must pass the same k") for e in run_threads(3, differing_k, 20))

    def good(c):
        return sharded_class_neighbors(E[slice(*lay.range(c.rank))], 3, c)

    np.testing.assert_array_equal(np.concatenate(run_threads(3, good, 20)), want)

    torch = pytest.importorskip("torch")
    from qaconv_gs.torch import QAConvGSLoss

    cfg = dict(num_classes=9, channels=4, height=2, width=2, k_nearest=3, seed=0, n_threads=1)
    X = torch.from_numpy(rng.standard_normal((6, 4, 2, 2)).astype(np.float32))
    y = torch.arange(6) % 9

    def loss_on(bad):
        def rank(c):
            crit = QAConvGSLoss(**cfg, comm=c)
            part = slice(3 * c.rank, 3 * c.rank + 3)
            x = X[part]
            if c.rank == 1 and bad == "int":
                x = x.int()
            if c.rank == 1 and bad == "double_module":
                crit.double()
            try:
                crit(x, y[part])
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            return ""

        return run_threads(2, rank, timeout_s=20)

    for bad, prefix in [("int", "TypeError: features"), ("double_module", "TypeError: QAConvGSLoss.")]:
        out = loss_on(bad)
        assert out[1].startswith(prefix), out
        assert out[0].startswith("RuntimeError") and "[1]" in out[0], out
    assert loss_on(None) == ["", ""]


def _thread_train(case: dict, counts: list[int], start: int = 0, load=None) -> list[dict]:
    def rank(c):
        model = ShardedQAConvGS(**W.model_config(case), comm=c)
        trainer = qg.Trainer(model, **W.TRAINER_KW, **case["trainer"])
        if load is not None:
            trainer.load_checkpoint(load)
        return W.train_steps(trainer, case, start, case["steps"], W._slice(counts, c.rank))

    return run_threads(len(counts), rank)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("clip", [None, 0.05, 1e6], ids=["noclip", "clip", "clip_inactive"])
@pytest.mark.parametrize("counts", [[5, 7], [5, 1, 6], [4, 0, 8]], ids=["R2", "R3", "R3_empty_rank"])
def test_threads_trainer_equals_one_process(sparse, clip, counts):
    """Trainer steps on R thread ranks give the one-process Trainer's losses and parameters: lazy or
    dense row updates, clipping by the global norm (active at 0.05: the norm is ~2.5 here), a neighbour
    refresh mid-way, a rank whose local batch is empty."""
    case = {**_TRAIN_SPARSE_CLIP, "steps": 4, "trainer": {"sparse_embed": sparse, "clip_grad_norm": clip}}
    _check_train(case, _thread_train(case, counts))


@pytest.mark.parametrize("extras", [{}, _EXTRAS, _MINED], ids=["plain", "extras", "mined"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("counts", [[19, 21], [13, 0, 27], [10, 10, 10, 10]], ids=["R2", "R3_empty", "R4"])
def test_threads_imprint_trainer_equals_one_process(sparse, counts, extras):
    """From the default start (init="imprint"), Trainer steps on R thread ranks imprint the same rows with
    the same counts as one process, rebuild the neighbour table at the same steps (first step, the
    doubling mid-epoch, on_epoch_start) and train to the same parameters; also with the recommended
    restricted recipe (weighted in-batch extras, aligned neighbours, in-batch triplet) and with mined
    classes."""
    case = {
        **_TRAIN_IMPRINT,
        **extras,
        "counts": counts,
        "trainer": {"sparse_embed": sparse},
    }

    def run(model, sl):
        trainer = qg.Trainer(model, **W.TRAINER_KW, **case["trainer"])
        refreshes, imprinted = [], []
        for step in range(case["steps"]):
            if step == case["refresh_at"]:
                model.on_epoch_start()
            X, y, _ = W.make_batch({**case, "data_seed": case["data_seed"] + step})
            trainer.step(X[sl], y[sl])
            refreshes.append(model.neighbor_refreshes)
            imprinted.append(model._imprinted.copy())
        trainer.flush()
        nbr = getattr(model, "local_neighbors", None)
        return {
            "refreshes": refreshes,
            "imprinted": imprinted,
            "embed": model.class_embed.copy(),
            "nbr": model.class_neighbors if nbr is None else nbr,
        }

    one = qg.QAConvGS(**W.model_config(case))
    assert one.init == "imprint"
    want = run(one, slice(None))
    # the table is rebuilt at the first step (twice with lazy rows: rows_for_step reads it before the
    # step imprints), once mid-epoch when the imprinted classes double, and after on_epoch_start; rows of
    # classes seen fewer than 64 times are still open
    first = 2 if sparse else 1
    assert want["refreshes"] == [first, first, first + 1, first + 1, first + 2], want["refreshes"]
    assert 0 < np.count_nonzero(want["imprinted"][-1]) < case["N"]
    ranks = run_threads(len(counts), lambda c: run(ShardedQAConvGS(**W.model_config(case), comm=c),
                                                   W._slice(counts, c.rank)))  # fmt: skip
    for d in ranks:
        assert d["refreshes"] == want["refreshes"]
    for step in range(case["steps"]):
        np.testing.assert_array_equal(np.concatenate([d["imprinted"][step] for d in ranks]),
                                      want["imprinted"][step])  # fmt: skip
    _close(np.concatenate([d["embed"] for d in ranks]), want["embed"], "class_embed")
    np.testing.assert_array_equal(np.concatenate([d["nbr"] for d in ranks]), want["nbr"])


def test_threads_mining_with_a_rank_that_owns_no_class():
    """k_mined on 3 thread ranks where rank 0 owns no class (it mines nothing and merges the others'
    lists): the step's candidates are the one-process candidates, its loss within 1e-5."""
    case = {**_TRAIN_IMPRINT, **_MINED, "counts": [13, 0, 27]}
    X, y, counts = W.make_batch(case)
    want = qg.QAConvGS(**W.model_config(case)).forward_backward(X, y)
    layout = ShardLayout(case["N"], 3, (0, 0, 60, case["N"]))

    def rank(c):
        m = ShardedQAConvGS(**W.model_config(case), comm=c, layout=layout)
        sl = W._slice(counts, c.rank)
        return m.forward_backward(X[sl], y[sl])

    for got in run_threads(3, rank):
        np.testing.assert_array_equal(got.all_candidates, want.candidates)
        np.testing.assert_allclose(got.loss, want.loss, rtol=RTOL)


def test_sharded_step_that_fails_leaves_its_imprinting_undone():
    """A step that raises after imprinting (here: from the optimiser's row hook) leaves the rows, counts
    and neighbour table as they were, as QAConvGS does; the same step then succeeds."""
    case = {**_TRAIN_IMPRINT, "counts": [40]}
    X, y, _ = W.make_batch(case)
    s = ShardedQAConvGS(**W.model_config(case))
    s.forward_backward(X[:10], y[:10])
    before = (s.class_embed.copy(), s._imprinted.copy(), s.local_neighbors.copy(), s.neighbor_refreshes)

    def fail(ids):
        raise KeyboardInterrupt

    s.set_row_hook(fail)
    with pytest.raises(KeyboardInterrupt):
        s.forward_backward(X[10:], y[10:])
    np.testing.assert_array_equal(s.class_embed, before[0])
    np.testing.assert_array_equal(s._imprinted, before[1])
    np.testing.assert_array_equal(s.local_neighbors, before[2])
    assert s.neighbor_refreshes == before[3]
    s.set_row_hook(None)
    one = qg.QAConvGS(**W.model_config(case))
    one.forward_backward(X[:10], y[:10])
    want = one.forward_backward(X[10:], y[10:])
    got = s.forward_backward(X[10:], y[10:])
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(s.class_embed, one.class_embed)
    np.testing.assert_array_equal(s._imprinted, one._imprinted)


@pytest.mark.parametrize("counts", [[6, 6], [2, 0, 3, 7]], ids=["R2", "R4_empty_rank"])
def test_threads_trainer_shared_fc_batch_triplet(counts):
    """The other head and loss variants (fc shared, in-batch triplet) train alike on thread ranks."""
    case = {**_TRAIN_SPARSE_CLIP, "fc": "shared", "triplet": "batch", "trainer": {"clip_grad_norm": 0.5}}
    _check_train(case, _thread_train(case, counts))


def test_threads_trainer_global_norm_and_history():
    """fit() on 2 thread ranks: per-step grad_norm is the one-process global norm (not this rank's part),
    the history's batch_size is the global batch, and the epoch means and neighbour change equal the
    one-process history on every rank."""
    case = {**_TRAIN_SPARSE_CLIP, "trainer": {"clip_grad_norm": 1.0}}
    counts = [5, 7]
    batches = [W.make_batch({**case, "counts": counts, "data_seed": 4 + s})[:2] for s in range(6)]

    def epoch_batches(rank):
        sl = W._slice(counts, rank)
        return lambda epoch: [(X[sl], y[sl]) for X, y in batches[3 * epoch : 3 * epoch + 3]]

    model = qg.QAConvGS(**W.model_config(case))
    one = qg.Trainer(model, **W.TRAINER_KW, **case["trainer"])
    one.fit(lambda e: batches[3 * e : 3 * e + 3], epochs=2, progress=False)

    def rank(c):
        m = ShardedQAConvGS(**W.model_config(case), comm=c)
        t = qg.Trainer(m, **W.TRAINER_KW, **case["trainer"])
        t.fit(epoch_batches(c.rank), epochs=2, progress=False)
        return t.history, t.rank

    res = run_threads(2, rank)
    assert [r for _, r in res] == [0, 1]
    for h, _ in res:
        assert h.steps["batch_size"] == [12] * 6
        for key in ("loss", "acc_cls", "grad_norm", "lr"):
            np.testing.assert_allclose(h.steps[key], one.history.steps[key], rtol=RTOL, err_msg=key)
        for e, f in zip(h.epochs, one.history.epochs):
            assert e["samples"] == f["samples"] == 36
            for key in ("loss", "loss_cls", "acc_cls", "acc_triplet"):
                np.testing.assert_allclose(e[key], f[key], rtol=RTOL, err_msg=key)
            np.testing.assert_allclose(
                e["neighbor_change"], f["neighbor_change"], rtol=1e-12
            )  # NaN, then a fraction
    assert np.isfinite(res[0][0].epochs[1]["neighbor_change"])


def test_threads_trainer_resume_any_world_size(tmp_path):
    """Saved on 2 ranks after 3 steps; resumed on 2 (bit-identical to not stopping), 1 and 3 thread ranks,
    in one process with a plain QAConvGS, and through Trainer.from_checkpoint (with and without comm):
    all continue like the one-process run."""
    case = _RESUME
    ck = tmp_path / "ck"
    two = _save_trainer_on_two_ranks(case, ck)
    _check_train(case, two)
    _, ref = _one_process_train(case)
    start = case["saved_at"]
    for counts in ([5, 7], [12], [5, 1, 6]):
        got = _thread_train(case, counts, start=start, load=ck)
        _check_train(case, got, ref)
        if len(counts) == 2:
            _check_resume(2, case, got, two)
    # one process, plain QAConvGS (a fresh model of another seed: everything comes from the directory)
    model = qg.QAConvGS(**{**W.model_config(case), "seed": 42})
    trainer = qg.Trainer(model, **W.TRAINER_KW, **case["trainer"])
    trainer.load_checkpoint(ck)
    assert trainer.global_step == start and trainer.epoch == 0
    _check_train(case, [W.train_steps(trainer, case, start, case["steps"])], ref)
    trainer = qg.Trainer.from_checkpoint(ck)
    assert isinstance(trainer.model, qg.QAConvGS) and trainer.clip_grad_norm == 0.5
    _check_train(case, [W.train_steps(trainer, case, start, case["steps"])], ref)

    def from_ck(c):
        t = qg.Trainer.from_checkpoint(ck, comm=c)
        assert isinstance(t.model, ShardedQAConvGS) and t.global_step == start
        return W.train_steps(t, case, start, case["steps"], W._slice([6, 6], c.rank))

    _check_train(case, run_threads(2, from_ck), ref)


def test_threads_trainer_resumes_a_one_process_checkpoint(tmp_path):
    """A one-process trainer .npz (whole-table momentum and row counters) resumes on 2 thread ranks, each
    keeping its rows."""
    case = _RESUME
    model = qg.QAConvGS(**W.model_config(case))
    trainer = qg.Trainer(model, **W.TRAINER_KW, **case["trainer"])
    W.train_steps(trainer, {**case, "steps": case["saved_at"]}, 0, case["saved_at"])
    trainer.save_checkpoint(tmp_path / "one.npz")
    _, ref = _one_process_train(case)
    _check_train(case, _thread_train(case, [7, 5], start=case["saved_at"], load=tmp_path / "one.npz"), ref)


class _NaNOnRank(ShardedQAConvGS):
    """Reports a non-finite embedding gradient norm on one rank only (as if only its rows diverged)."""

    bad_rank = 1

    def forward_backward(self, features, labels):
        out = super().forward_backward(features, labels)
        if self.comm.rank == self.bad_rank:
            out.grad_embed_sqnorm = float("nan")
        return out


def test_threads_trainer_refuses_a_non_finite_step_on_every_rank():
    case = {**_TRAIN_SPARSE_CLIP, "counts": [5, 7]}
    X, y, counts = W.make_batch(case)

    def rank(c):
        m = _NaNOnRank(**W.model_config(case), comm=c)
        t = qg.Trainer(m, **W.TRAINER_KW)
        sl = W._slice(counts, c.rank)
        before = {k: v.copy() for k, v in m.parameters().items()}
        try:
            t.step(X[sl], y[sl])
        except (FloatingPointError, RuntimeError) as exc:
            err = type(exc).__name__
        else:
            err = None
        unchanged = all(np.array_equal(v, m.parameters()[k]) for k, v in before.items())
        return err, unchanged, t.global_step

    assert run_threads(2, rank) == [("RuntimeError", True, 0), ("FloatingPointError", True, 0)]


def test_threads_trainer_checkpoint_errors_raise_on_every_rank(tmp_path):
    """A corrupt shard that only one rank reads, or a wrong architecture: every rank raises and no
    rank's model or trainer changes. A diverged model is not written over a good checkpoint."""
    case = _RESUME
    ck = tmp_path / "ck"
    _save_trainer_on_two_ranks(case, ck)
    man = json.loads((ck / "manifest.json").read_text())
    shard1 = ck / man["shards"][1]["file"]
    raw = bytearray(shard1.read_bytes())
    with zipfile.ZipFile(shard1) as z:  # a byte of the class rows' data (a zip header's slack is not read)
        at = z.getinfo("state/class_embed.npy").header_offset + 300
    raw[at] ^= 0xFF
    shard1.write_bytes(bytes(raw))

    def load(c):
        m = ShardedQAConvGS(**W.model_config(case), comm=c)
        t = qg.Trainer(m, **W.TRAINER_KW)
        before = m.class_embed.copy()
        try:
            t.load_checkpoint(ck)
        except (ValueError, RuntimeError) as exc:
            err = type(exc).__name__
        return err, np.array_equal(before, m.class_embed) and m.class_embed is not None, t.global_step

    assert run_threads(2, load) == [("RuntimeError", True, 0), ("ValueError", True, 0)]

    def wrong_arch(c):
        m = ShardedQAConvGS(**{**W.model_config(case), "channels": 4}, comm=c)
        with pytest.raises(ValueError, match="channels"):
            qg.Trainer(m, **W.TRAINER_KW).load_checkpoint(tmp_path / "good")
        return True

    def save_good(c):
        m = ShardedQAConvGS(**W.model_config(case), comm=c)
        qg.Trainer(m, **W.TRAINER_KW).save_checkpoint(tmp_path / "good")
        m.head_state["fc.weight"][0, 0] = np.nan  # diverged: the next save must refuse
        with pytest.raises(ValueError, match="NaN or Inf"):
            m.save(tmp_path / "good")
        return True

    assert run_threads(2, save_good) == [True, True]
    assert load_sharded_model(tmp_path / "good").head_state["fc.weight"][0, 0] == pytest.approx(1 / 6)
    assert run_threads(2, wrong_arch) == [True, True]


# ---------------------------------------------------------------- shared pieces with the one-process model


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sharded_save_sweeps_temporaries_of_killed_saves(tmp_path):
    """Temporaries of dead processes (the manifest's, and shards / heads of an older generation whose
    names no later save reuses) are deleted by the next save; a live process's are left alone."""
    from qaconv_gs.checkpoint import _HOST

    model = qg.QAConvGS(num_classes=6, channels=2, height=1, width=2, k_nearest=2, seed=1, init="random")
    ck = tmp_path / "ck"
    shard_checkpoint(model, ck, 2)
    dead, live = _dead_pid(), os.getpid()
    names = {
        "manifest_dead": f".manifest.json.{_HOST}.{dead}.ab12.tmp",
        "shard_dead": f".shard-0123456789abcdef-00001-of-00002.npz.{_HOST}.{dead}.cd34.tmp",
        "head_dead": f".head-0123456789abcdef.npz.{_HOST}.{dead}.ef56.tmp",
        "shard_live": f".shard-0123456789abcdef-00000-of-00002.npz.{_HOST}.{live}.gh78.tmp",
        "other_host": f".head-0123456789abcdef.npz.elsewhere.{dead}.ij90.tmp",
    }
    for n in names.values():
        (ck / n).write_bytes(b"partial")
    ShardedQAConvGS.from_model(model).save(ck)
    left = set(os.listdir(ck))
    assert {names["shard_live"], names["other_host"]} <= left
    assert not {names["manifest_dead"], names["shard_dead"], names["head_dead"]} & left
    np.testing.assert_array_equal(load_sharded_model(ck).class_embed, model.class_embed)


@pytest.mark.parametrize(
    "bad",
    [
        {"num_classes": 1},
        {"num_classes": 2.5},
        {"channels": 0},
        {"height": 300, "width": 300},
        {"k_nearest": 6},
        {"k_nearest": 0},
        {"fc": "both"},
        {"fc": 3},
        {"triplet": "pair"},
        {"triplet_weight": -1.0},
        {"margin": float("nan")},
        {"seed": -1},
        {"n_threads": 0},
        {"init": "zeros"},
        {"init": None},
        {"imprint_samples": 0},
        {"k_mined": -1},
        {"k_batch": 1.5},
        {"weighted_extras": 1},
        {"k_batch": 1, "weighted_extras": True},
        {"neighbors_by": "dot"},
    ],
)
def test_sharded_constructor_validates_like_qaconvgs(bad):
    """One validator: the same exception type and message from both constructors."""
    cfg = {"num_classes": 6, "channels": 2, "height": 1, "width": 2, "k_nearest": 2, "seed": 0, **bad}
    with pytest.raises((TypeError, ValueError)) as one:
        qg.QAConvGS(**cfg)
    with pytest.raises(one.type) as sharded:
        ShardedQAConvGS(**cfg)
    assert str(sharded.value) == str(one.value)


def test_threads_trainer_progress_bar_on_rank_zero_only(monkeypatch):
    import qaconv_gs.trainer as trainer_mod

    shown = []
    monkeypatch.setattr(trainer_mod, "_progress_bar", lambda progress, total, desc: shown.append(progress))
    case = {**_TRAIN_SPARSE_CLIP, "trainer": {}}
    counts = [5, 7]
    batches = [W.make_batch({**case, "data_seed": 4 + s})[:2] for s in range(2)]

    def rank(c):
        t = qg.Trainer(ShardedQAConvGS(**W.model_config(case), comm=c), **W.TRAINER_KW)
        sl = W._slice(counts, c.rank)
        t.fit([(X[sl], y[sl]) for X, y in batches], epochs=2, progress=True)
        return t.rank

    assert run_threads(2, rank) == [0, 1]
    assert sorted(shown) == [False, False, True, True]  # per epoch: rank 0 asks for a bar, rank 1 not
