"""examples/quickstart.ipynb: committed with its outputs (two figures), its set-up cell installs what it
imports, and a re-run against a real server gives the committed outputs.

Refresh the committed outputs, with a server on 127.0.0.1:8000 (`make serve`), with `make notebook`
(``.venv/bin/python tests/notebooks.py``).
"""

from __future__ import annotations

import json
import sys

import pytest

from notebooks import (
    EXAMPLES,
    assert_committed_with_outputs,
    assert_rerun_gives_the_committed_outputs,
    assert_setup_installs_what_the_cells_import,
    code_cells,
    images_of,
    png_size,
    setup_requirements,
    text_of,
)

NOTEBOOK = EXAMPLES / "quickstart.ipynb"
MAX_NOTEBOOK_BYTES = 400_000  # two PNG figures and a few lines of text


# -- the committed notebook (fast) -----------------------------------------------------------------


def test_notebook_is_committed_with_its_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    assert_committed_with_outputs(nb)
    cells = code_cells(nb)
    assert text_of(cells[0]) == "everything the notebook imports is installed\n"
    text = "".join(text_of(c) for c in cells)
    assert "spike: [0. 0. 1. 1. 1.]" in text
    assert "grad:  [0.  0.5 1.  0.5 0. ]" in text
    assert "-> 10 spikes (target 10)" in text
    assert NOTEBOOK.stat().st_size < MAX_NOTEBOOK_BYTES


def test_setup_cell_installs_what_the_cells_import_at_the_locked_versions():
    assert_setup_installs_what_the_cells_import(NOTEBOOK)
    assert set(setup_requirements(json.loads(NOTEBOOK.read_text()))) == {"surrogate_client", "numpy", "matplotlib"}


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
    nb = assert_rerun_gives_the_committed_outputs(NOTEBOOK, server_url, tmp_path)
    figure = tmp_path / "figures" / "piecewise_quadratic_grad.png"
    w, h = png_size(figure.read_bytes())
    assert 400 <= w <= 2000
    assert 300 <= h <= 1500
    assert figure.stat().st_size > 10_000
    assert png_size((tmp_path / "figures" / "lif_neuron.png").read_bytes())[0] > 0
    assert len(images_of(nb)) == 2
    assert "spike: [0. 0. 1. 1. 1.]" in text_of(code_cells(nb)[3])


def test_python3_kernel_is_this_interpreter():
    """nbclient's "python3" kernel runs sys.executable (so it sees this venv's surrogate_client)."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    cmd = km.format_kernel_cmd()
    assert cmd[0] == sys.executable
    assert cmd[1:3] == ["-m", "ipykernel_launcher"]
