"""examples/quickstart.ipynb runs top to bottom in a fresh kernel of this interpreter (nbclient)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

import qaconv_gs  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
KERNEL = "qaconv-gs-test-python"


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_stored_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    for cell in _code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert sum("cmc" in c.metadata.get("tags", []) for c in nb.cells) == 1


@pytest.mark.parametrize("data", ["auto", "synthetic"])
def test_notebook_runs(data, tmp_path, monkeypatch):
    # A kernelspec of our own, first on JUPYTER_PATH: the kernel is this interpreter (sys.executable), never
    # whatever "python3" spec a user or system directory happens to hold.
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    # ... importing the qaconv_gs under test (a relative PYTHONPATH, as the sanitizer job sets, would not
    # survive the kernel's working directory, and the kernel would pick up an installed copy instead)
    pkg_root = str(Path(qaconv_gs.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")])))
    from jupyter_client.kernelspec import KernelSpecManager

    assert KernelSpecManager().get_kernel_spec(KERNEL).argv[0] == sys.executable

    nb = nbformat.read(NOTEBOOK, as_version=4)
    if data != "auto":  # the notebook's own switch (auto = the glyphs where the fonts are installed)
        (cell,) = [c for c in nb.cells if 'DATA = "auto"' in c.source]
        cell.source = cell.source.replace('DATA = "auto"', f"DATA = {data!r}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(run_dir)}}
    )
    client.execute()  # raises CellExecutionError on the first cell that errors

    cells = _code_cells(nb)
    assert all(c.execution_count is not None for c in cells)
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    (cmc,) = [c for c in cells if "cmc" in c.metadata.get("tags", [])]
    images = [o for o in cmc.outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert images, cmc.outputs
    text = "".join(o.get("text", "") for c in cells for o in c.outputs if o.output_type == "stream")
    assert "retrieval after training: rank-1" in text and "identification: rank-1" in text
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return
    # with ipywidgets the Trainer's tqdm.auto bar renders as a widget in the kernel, not as text on stderr
    (fit,) = [c for c in cells if "trainer.fit(" in c.source]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in fit.outputs), (
        fit.outputs
    )
