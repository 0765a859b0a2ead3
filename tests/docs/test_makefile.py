"""The Makefile (`make serve` binds where it is told, `make test` runs no linter) and the strict documentation build."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry_run(target: str, *args: str, **env: str) -> str:
    """The commands `make -n` would run (nothing is run), with only the given SURROGATE_/HOST/PORT variables set."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SURROGATE_", "MAKE"))}
    base.pop("HOST", None)
    base.pop("PORT", None)
    r = subprocess.run(
        ["make", "-n", target, *args],
        cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60, check=True,
    )
    return r.stdout


def serve_command(*args: str, **env: str) -> str:
    (line,) = [ln for ln in dry_run("serve", *args, **env).splitlines() if "-m service" in ln]
    return line


def test_serve_defaults_to_loopback_8000():
    assert re.search(r"-m service --host 127\.0\.0\.1 --port 8000$", serve_command())


def test_serve_honours_the_service_variables():
    line = serve_command(SURROGATE_PORT="8852", SURROGATE_HOST="0.0.0.0")
    assert re.search(r"--host 0\.0\.0\.0 --port 8852$", line)


def test_make_variables_win_over_the_service_variables():
    line = serve_command("PORT=9001", "HOST=127.0.0.2", SURROGATE_PORT="8852", SURROGATE_HOST="0.0.0.0")
    assert re.search(r"--host 127\.0\.0\.2 --port 9001$", line)


def test_test_target_runs_pytest_and_no_linter():
    commands = dry_run("test")
    assert "-m pytest" in commands
    assert "ruff" not in commands
    assert "mypy" not in commands


def test_lint_and_docs_targets():
    lint = dry_run("lint")
    assert "ruff check" in lint
    assert "mypy" in lint
    assert "mkdocs build --strict" in dry_run("docs")


def test_documentation_site_builds_strict(tmp_path):
    """`mkdocs build --strict` (what `make docs` runs): a broken link, anchor or nav entry fails it."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    r = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    site = tmp_path / "site"
    assert (site / "api" / "index.html").is_file()
    # a repository file a page links to (../openapi.yaml) is published with the site
    assert (site / "_repo" / "openapi.yaml").read_bytes() == (ROOT / "openapi.yaml").read_bytes()
