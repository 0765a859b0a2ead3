"""examples/quickstart.ipynb: committed with its outputs (two figures), and it still runs against a real server.

Refresh the committed outputs, with a server on 127.0.0.1:8000 (`make serve`), by running this file:
``.venv/bin/python tests/client/test_notebook.py`` (`make notebook`). The notebook runs in a scratch
folder, so the figures it writes do not replace ``examples/figures/``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOK = EXAMPLES / "quickstart.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_NOTEBOOK_BYTES = 400_000  # two PNG figures and a few lines of text


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC, "not a PNG"
    return struct.unpack(">II", data[16:24])  # the IHDR chunk: width, height


def code_cells(nb) -> list:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def text_of(cell) -> str:
    out = []
    for o in cell["outputs"]:
        if o["output_type"] == "stream":
            out.append("".join(o["text"]) if isinstance(o["text"], list) else o["text"])
    return "".join(out)


def images_of(nb) -> list[bytes]:
    pngs = [o["data"]["image/png"] for c in code_cells(nb) for o in c["outputs"] if "image/png" in o.get("data", {})]
    return [base64.b64decode("".join(p) if isinstance(p, list) else p) for p in pngs]


def execute(url: str, workdir: Path):
    """The notebook executed against ``url`` in ``workdir`` (its figures land there), without timing metadata."""
    import nbclient
    import nbformat

    shutil.copy(NOTEBOOK, workdir / NOTEBOOK.name)
    nb = nbformat.read(workdir / NOTEBOOK.name, as_version=4)
    old = os.environ.get("SURROGATE_URL")
    os.environ["SURROGATE_URL"] = url  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(
            nb, kernel_name="python3", timeout=120, record_timing=False, resources={"metadata": {"path": str(workdir)}}
        ).execute()
    finally:
        if old is None:
            os.environ.pop("SURROGATE_URL", None)
        else:
            os.environ["SURROGATE_URL"] = old
    nb.metadata["language_info"] = {"name": "python"}  # not the interpreter's exact version
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    return nb


# -- the committed notebook (fast) -----------------------------------------------------------------


def test_notebook_is_committed_with_its_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    cells = code_cells(nb)
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1))  # run once, top to bottom
    for c in cells:
        assert "execution" not in c["metadata"]  # no timing metadata
        assert not any(o["output_type"] == "error" for o in c["outputs"])
    text = "".join(text_of(c) for c in cells)
    assert "spike: [0. 0. 1. 1. 1.]" in text
    assert "grad:  [0.  0.5 1.  0.5 0. ]" in text
    assert "-> 10 spikes (target 10)" in text
    assert NOTEBOOK.stat().st_size < MAX_NOTEBOOK_BYTES


def test_committed_outputs_hold_the_two_figures():
    images = images_of(json.loads(NOTEBOOK.read_text()))
    assert len(images) == 2
    for png in images:
        w, h = png_size(png)
        assert 400 <= w <= 2000
        assert 300 <= h <= 1500
        assert len(png) > 10_000  # curves, axes, labels and a legend, not an empty canvas


def test_committed_figure_is_a_png():
    w, h = png_size((EXAMPLES / "figures" / "piecewise_quadratic_grad.png").read_bytes())
    assert 400 <= w <= 2000
    assert 300 <= h <= 1500


# -- re-running it (e2e) ----------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_notebook_runs_against_a_real_server_and_gives_the_committed_outputs(server_url, tmp_path):
    nb = execute(server_url, tmp_path)
    figure = tmp_path / "figures" / "piecewise_quadratic_grad.png"
    w, h = png_size(figure.read_bytes())
    assert 400 <= w <= 2000
    assert 300 <= h <= 1500
    assert figure.stat().st_size > 10_000
    assert png_size((tmp_path / "figures" / "lif_neuron.png").read_bytes())[0] > 0
    assert len(images_of(nb)) == 2
    committed = json.loads(NOTEBOOK.read_text())
    # every printed line but the first cell's (it names the server's URL, device and JAX version)
    assert [text_of(c) for c in code_cells(nb)[1:]] == [text_of(c) for c in code_cells(committed)[1:]]
    assert "spike: [0. 0. 1. 1. 1.]" in text_of(code_cells(nb)[2])


def test_python3_kernel_is_this_interpreter():
    """nbclient's "python3" kernel runs sys.executable (so it sees this venv's surrogate_client)."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    cmd = km.format_kernel_cmd()
    assert cmd[0] == sys.executable
    assert cmd[1:3] == ["-m", "ipykernel_launcher"]


if __name__ == "__main__":  # refresh the committed outputs
    import nbformat

    url = os.environ.get("SURROGATE_URL", "http://127.0.0.1:8000")
    with tempfile.TemporaryDirectory() as tmp:
        executed = execute(url, Path(tmp))
    nbformat.write(executed, NOTEBOOK)
    print(f"{NOTEBOOK}: {NOTEBOOK.stat().st_size} bytes, {len(images_of(json.loads(NOTEBOOK.read_text())))} figures")
