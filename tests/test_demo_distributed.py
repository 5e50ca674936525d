"""`qaconv-gs demo --distributed`: launched by torchrun (gloo) and mpirun (mpi4py), it prints on rank 0
only and trains exactly the one-process demo's steps (same batches, losses within rounding)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import qaconv_gs
from qaconv_gs.cli import main

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(qaconv_gs.__file__)))
TINY = [
    "demo",
    *("--classes", "12", "--samples", "6", "--held-out", "1", "--epochs", "2", "--k", "4"),
    *("--batch-size", "8", "--num-instances", "2", "--no-progress", "--no-full", "--threads", "1"),
]
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS + _MPI_VARS}
    env["PYTHONPATH"] = os.pathsep.join([PYTHON_DIR, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")  # Open MPI as root (CI); MPICH ignores these
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def _run(cmd: list[str], timeout: float = 180) -> str:
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} exited with {res.returncode}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _epoch_lines(out: str) -> list[str]:
    """The per-epoch and before-training report lines without their wall times."""
    lines = [ln for ln in out.splitlines() if ln.startswith("  [k=")]
    return [re.sub(r"\s+[\d.]+ s$", "", ln) for ln in lines]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("one")
    return _run([sys.executable, "-m", "qaconv_gs", *TINY, "--out", str(out)])


def _check_distributed(out: str, one: str, R: int, backend: str) -> None:
    assert out.count("qaconv-gs demo:") == 1, out  # rank 0 prints, the others do not
    assert f"distributed: {R} ranks ({backend})" in out, out
    assert _epoch_lines(out) == _epoch_lines(one) and len(_epoch_lines(one)) == 3, out
    m = re.search(r"max \|loss difference\| ([\d.e+-]+) .*max relative difference ([\d.e+-]+)", out)
    assert m is not None, out
    assert float(m.group(1)) <= 1e-5 and float(m.group(2)) <= 1e-5, m.group(0)


def test_demo_under_torchrun_equals_one_process(one_process, tmp_path):
    pytest.importorskip("torch")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = _run(launcher + ["-m", "qaconv_gs", *TINY, "--out", str(tmp_path), "--compare-one-process"])
    _check_distributed(out, one_process, 2, "TorchCommunicator")
    assert sorted(os.listdir(tmp_path)) == ["demo_curves_restricted.png"]


def test_fonts_demo_under_torchrun_equals_one_process(tmp_path):
    """--data fonts on 2 ranks: the sharded model starts as one process does (init="imprint", rows imprinted
    on the rank owning them) and prints the same curve."""
    pytest.importorskip("torch")
    pytest.importorskip("PIL", reason="Pillow is not installed (pip install 'qaconv-gs[fonts]')")
    from test_cli import _fonts_installed

    if not _fonts_installed():
        pytest.skip("Korean fonts not installed (see qaconv_gs.glyphs.DEBIAN_PACKAGES)")
    args = ["-m", "qaconv_gs", "demo", "--data", "fonts", "--classes", "30", "--epochs", "2", "--k", "4"]
    args += ["--no-progress", "--no-full", "--threads", "1"]
    one = _run([sys.executable, *args, "--out", str(tmp_path / "one")])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = _run(launcher + args + ["--out", str(tmp_path / "two"), "--compare-one-process"])
    assert "distributed: 2 ranks (TorchCommunicator)" in out, out
    assert _epoch_lines(out) == _epoch_lines(one) and len(_epoch_lines(one)) == 3, out
    m = re.search(r"max \|loss difference\| ([\d.e+-]+) ", out)
    assert m is not None and float(m.group(1)) <= 1e-4, out
    row = next(line.split() for line in out.splitlines() if re.match(r"restricted +\d", line))
    assert float(row[-1]) > 0.3  # held-out rank-1 after two epochs; chance 0.033


def _mpi_ready() -> str | None:
    """mpirun / mpiexec when mpi4py loads an MPI library (checked in a subprocess), else None."""
    launcher = shutil.which("mpirun") or shutil.which("mpiexec")
    if launcher is None or importlib.util.find_spec("mpi4py") is None:
        return None
    res = subprocess.run([sys.executable, "-c", "from mpi4py import MPI"], env=_env(), capture_output=True)
    return launcher if res.returncode == 0 else None


def test_demo_under_mpirun_equals_one_process(one_process, tmp_path):
    launcher = _mpi_ready()
    if launcher is None:
        pytest.skip("mpi4py with a loadable MPI library, or mpirun, is not available (README: MPI)")
    cmd = [launcher, "-n", "2", sys.executable, "-m", "qaconv_gs", *TINY, "--out", str(tmp_path)]
    out = _run(cmd + ["--distributed", "mpi", "--compare-one-process"])
    _check_distributed(out, one_process, 2, "MPICommunicator")


def test_demo_distributed_flag_errors(monkeypatch, capsys):
    """Misuse ends with a one-line error (exit status 1) before any collective could wait forever."""
    for var in _LAUNCH_VARS + _MPI_VARS:
        monkeypatch.delenv(var, raising=False)
    assert main([*TINY, "--compare-one-process"]) == 1  # auto -> one process: nothing to compare
    assert "--compare-one-process" in capsys.readouterr().err
    assert main([*TINY, "--distributed", "torch"]) == 1
    err = capsys.readouterr().err
    assert "RANK is not set" in err and "torchrun" in err
    monkeypatch.setenv("WORLD_SIZE", "2")  # auto picks torch under a launcher-like environment
    assert main(TINY) == 1
    assert "--distributed torch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*TINY, "--distributed", "nccl"])
    if importlib.util.find_spec("mpi4py") is None:  # never initialise MPI inside the test process
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.setenv("PMI_SIZE", "2")
        assert main(TINY) == 1
        assert "mpi4py" in capsys.readouterr().err
