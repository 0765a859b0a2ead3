"""examples/train_snn.ipynb: committed with its outputs, its set-up cell installs what it imports, and a
re-run against a real server gives the committed outputs (the measured times aside): the local and
served runs agree, step for step, in PyTorch and in JAX.

Refresh the committed outputs, with a server on 127.0.0.1:8000 (`make serve`), with `make notebook`
(``.venv/bin/python tests/notebooks.py``).
"""

from __future__ import annotations

import ast
import json
import re

import pytest

from notebooks import (
    EXAMPLES,
    assert_committed_with_outputs,
    assert_rerun_gives_the_committed_outputs,
    assert_setup_installs_what_the_cells_import,
    DEFAULT_URL,
    code_cells,
    comparable,
    images_of,
    png_size,
    setup_requirements,
    text_of,
)

NOTEBOOK = EXAMPLES / "train_snn.ipynb"
FIGURES = ("train_loss.png", "train_accuracy.png", "train_raster.png", "train_time.png")
MAX_NOTEBOOK_BYTES = 600_000  # four PNG figures and a few lines of text


def committed() -> dict:
    return json.loads(NOTEBOOK.read_text())


def printed(nb) -> str:
    return "".join(text_of(c) for c in code_cells(nb))


def check_results(text: str) -> None:
    """What the notebook's runs show: two trainings that agree, step for step, and learn."""
    assert text.count("losses agree (rtol 1e-5): True") == 2  # PyTorch and JAX
    assert "88 steps;" in text  # 4 epochs of 22 batches (1347 training images, batches of 64)
    acc = re.search(r"test accuracy per epoch: local (\[[^\]]*\]), served (\[[^\]]*\])", text)
    assert acc is not None
    local, served = ast.literal_eval(acc[1]), ast.literal_eval(acc[2])
    assert local == served
    assert len(local) == 4
    assert local[-1] > 0.5  # ten classes: far above chance
    # the served run fetched the gradients of each step in one request, the local one sent none
    calls = re.search(r"/v1/grad requests per training step: local (\d+), served (\d+)", text)
    assert calls is not None
    assert calls.groups() == ("0", "1")
    jax_run = re.search(r"JAX: 40 SGD steps, loss (\S+) -> (\S+); losses agree", text)
    assert jax_run is not None
    assert float(jax_run[2]) < float(jax_run[1])


# -- the committed notebook (fast) -----------------------------------------------------------------


def test_notebook_is_committed_with_its_outputs():
    nb = committed()
    assert_committed_with_outputs(nb)
    assert text_of(code_cells(nb)[0]) == "everything the notebook imports is installed\n"
    check_results(printed(nb))
    assert NOTEBOOK.stat().st_size < MAX_NOTEBOOK_BYTES


def test_setup_cell_installs_what_the_cells_import_at_the_locked_versions():
    assert_setup_installs_what_the_cells_import(NOTEBOOK)
    assert {"sklearn", "snntorch", "torch", "jax", "matplotlib"} <= set(setup_requirements(committed()))


def test_committed_outputs_hold_the_four_figures():
    images = images_of(committed())
    assert len(images) == len(FIGURES)
    for png in images:
        w, h = png_size(png)
        assert 400 <= w <= 2000
        assert 300 <= h <= 1500
        assert len(png) > 10_000  # curves, axes, labels, not an empty canvas


@pytest.mark.parametrize("name", FIGURES)
def test_committed_figures_are_pngs(name):
    w, h = png_size((EXAMPLES / "figures" / name).read_bytes())
    assert 400 <= w <= 2000
    assert 300 <= h <= 1500


def test_a_rerun_is_compared_with_the_times_masked_and_everything_else_exact():
    url = "http://127.0.0.1:40123"
    run = f"server {url}: cpu\nmedian ms per step: local 18.7, served 98.1 (2.48 ms more per request)\nloss 5.446\n"
    same = f"server {DEFAULT_URL}: cpu\nmedian ms per step: local 20.1, served 105.0 (2.65 ms more per request)\nloss 5.446\n"
    assert comparable(run, url) == comparable(same, DEFAULT_URL)
    assert comparable(run, url) == (
        f"server {DEFAULT_URL}: cpu\nmedian ms per step: local <time>, served <time> (<time> ms more per request)\nloss 5.446\n"
    )
    assert comparable(run, url) != comparable(same.replace("5.446", "5.447"), DEFAULT_URL)
    assert comparable("JAX median ms per step: local 0.6, served 80.7 (16 requests per step)", url).endswith(
        "(16 requests per step)"
    )
    assert comparable("test accuracy per epoch: local [0.504, 0.647]", url) == "test accuracy per epoch: local [0.504, 0.647]"


# -- re-running it (e2e) ----------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_notebook_runs_against_a_real_server_and_gives_the_committed_outputs(server_url, tmp_path):
    nb = assert_rerun_gives_the_committed_outputs(NOTEBOOK, server_url, tmp_path)
    check_results(printed(nb))
    for name in FIGURES:
        w, h = png_size((tmp_path / "figures" / name).read_bytes())
        assert 400 <= w <= 2000
        assert 300 <= h <= 1500
