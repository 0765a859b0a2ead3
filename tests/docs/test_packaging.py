"""`pip install -e .` (what `make install` runs) and `pip install -e ./surrogate_client`: setuptools builds the editable
wheels without a warning, as a plain .pth path entry (not its import finder for an unnamed flat layout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("setuptools")

BUILD = """
import sys, warnings
from setuptools import build_meta
warnings.simplefilter("always")
print(build_meta.build_editable(sys.argv[1]))
"""


def build_editable(project: Path, out: Path) -> tuple[zipfile.ZipFile, str]:
    """setuptools' PEP 660 hook, as pip calls it: the wheel and everything the backend printed."""
    out.mkdir()
    r = subprocess.run(
        [sys.executable, "-c", BUILD, str(out)],
        cwd=project, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONWARNINGS": "always"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    name = r.stdout.strip().splitlines()[-1]
    return zipfile.ZipFile(out / name), r.stdout + r.stderr


def copy_project(src: Path, dst: Path, entries: list[str]) -> Path:
    dst.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for entry in entries:
        if (src / entry).is_dir():
            shutil.copytree(src / entry, dst / entry, ignore=ignore)
        else:
            shutil.copy2(src / entry, dst / entry)
    return dst


@pytest.mark.parametrize(
    ("project", "entries", "path_entry"),
    [
        (".", ["pyproject.toml", "README.md", "LICENSE", "service", "surrogate_core"], "."),
        ("surrogate_client", ["pyproject.toml", "README.md", "src"], "src"),
    ],
    ids=["surrogate-serve", "surrogate-client"],
)
def test_editable_install_builds_without_a_warning(tmp_path, project, entries, path_entry):
    copy = copy_project(ROOT / project, tmp_path / "project", [e for e in entries if (ROOT / project / e).exists()])
    wheel, output = build_editable(copy, tmp_path / "dist")
    assert "Warning" not in output, output
    assert "Editable installation" not in output, output
    names = wheel.namelist()
    # a .pth file with the package directory, no generated finder module
    assert not [n for n in names if n.endswith(".py")], names
    (pth,) = [n for n in names if n.endswith(".pth")]
    assert [Path(line) for line in wheel.read(pth).decode().splitlines()] == [(copy / path_entry).resolve()]
