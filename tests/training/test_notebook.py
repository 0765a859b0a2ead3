"""examples/train_snn.ipynb (short version) trains with local and served gradients against a real
server, the two runs agree, and it draws its figures."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOK = EXAMPLES / "train_snn.ipynb"
FIGURES = ("train_loss.png", "train_accuracy.png", "train_raster.png", "train_time.png")
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
            assert cell["outputs"] == []
            assert cell["execution_count"] is None


@pytest.mark.parametrize("name", FIGURES)
def test_committed_figures_are_pngs(name):
    w, h = png_size(EXAMPLES / "figures" / name)
    assert 400 <= w <= 2000
    assert 300 <= h <= 1500


@pytest.mark.e2e
@pytest.mark.slow
def test_notebook_runs_against_a_real_server(server_url, tmp_path, monkeypatch):
    import nbclient
    import nbformat

    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)  # the figures land in the scratch folder
    nb = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)
    monkeypatch.setenv("SURROGATE_URL", server_url)  # the kernel inherits this environment
    monkeypatch.setenv("SURROGATE_NOTEBOOK_QUICK", "1")
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "quick=True" in text
    assert "losses agree (rtol 1e-5): True" in text
    assert "JAX: 3 SGD steps" in text
    assert text.count("losses agree (rtol 1e-5): True") == 2  # PyTorch and JAX
    # the served run sent one request per spiking layer per time step, the local one none
    calls = re.search(r"/v1/grad requests per training step: local (\d+), served (\d+)", text)
    assert calls is not None
    assert calls.groups() == ("0", "32")
    for name in FIGURES:
        w, h = png_size(tmp_path / "figures" / name)
        assert 400 <= w <= 2000
        assert 300 <= h <= 1500
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(FIGURES)
