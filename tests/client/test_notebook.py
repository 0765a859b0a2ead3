"""examples/quickstart.ipynb runs top to bottom against a real server and draws its figures."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOK = EXAMPLES / "quickstart.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])  # the IHDR chunk: width, height


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_committed_figure_is_a_png():
    w, h = png_size(EXAMPLES / "figures" / "piecewise_quadratic_grad.png")
    assert 400 <= w <= 2000 and 300 <= h <= 1500


@pytest.mark.e2e
@pytest.mark.slow
def test_notebook_runs_against_a_real_server(server_url, tmp_path, monkeypatch):
    import nbclient
    import nbformat

    # a copy in a scratch folder: the figures land there, not over the committed ones
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    nb = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)
    monkeypatch.setenv("SURROGATE_URL", server_url)  # the kernel inherits this process's environment
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    figure = tmp_path / "figures" / "piecewise_quadratic_grad.png"
    w, h = png_size(figure)
    assert 400 <= w <= 2000 and 300 <= h <= 1500
    assert figure.stat().st_size > 10_000  # four curves, axes, labels and a legend
    assert png_size(tmp_path / "figures" / "lif_neuron.png")[0] > 0
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "spike: [0. 0. 1. 1. 1.]" in text
    assert "-> 10 spikes (target 10)" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2


def test_python3_kernel_is_this_interpreter():
    """nbclient's "python3" kernel runs sys.executable (so it sees this venv's surrogate_client)."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    cmd = km.format_kernel_cmd()
    assert cmd[0] == sys.executable and cmd[1:3] == ["-m", "ipykernel_launcher"]
