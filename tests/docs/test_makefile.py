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


def always_dry_run(target: str) -> str:
    """`make -n -B TARGET`: every command TARGET needs from nothing (a fresh clone), none run."""
    r = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return r.stdout


def pip_installs(commands: str) -> list[str]:
    return [ln for ln in commands.splitlines() if "-m pip install" in ln]


@pytest.mark.parametrize("target", ["install", "serve"])
def test_install_and_serve_install_only_the_runtime_lock(target):
    installs = pip_installs(always_dry_run(target))
    assert any("-r requirements.lock" in ln for ln in installs)
    assert not any("requirements-dev.lock" in ln or "torch" in ln for ln in installs), installs


@pytest.mark.parametrize("target", ["test", "test-fast", "lint", "docs"])
def test_the_development_targets_install_the_dev_lock(target):
    commands = always_dry_run(target)
    assert any("-r requirements-dev.lock" in ln for ln in pip_installs(commands))
    assert "https://download.pytorch.org/whl/cpu" in commands


def test_the_dev_locks_torch_is_the_cpu_build_of_pyproject():
    (pin,) = re.findall(r"^torch==(\S+)", (ROOT / "requirements-dev.lock").read_text(), re.MULTILINE)
    assert pin.endswith("+cpu")
    assert f'"torch=={pin}"' in (ROOT / "pyproject.toml").read_text()


@pytest.fixture
def fake_venv(tmp_path):
    """A .venv whose runtime install is done and whose python runs `-c` for real but only logs `-m pip ...`."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    python = venv / "bin" / "python"
    python.write_text(
        f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\necho "$*" >> {log}\n'
    )
    python.chmod(0o755)
    (venv / ".installed-runtime").touch()
    return venv, log


def install_dev(venv: Path, index: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    subprocess.run(
        ["make", f"VENV={venv}", f"TORCH_CPU_INDEX={index}", f"{venv}/.installed-dev"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    return (venv.parent / "pip.log").read_text()


def test_dev_install_takes_torch_from_the_cpu_index_where_it_answers(fake_venv):
    import http.server
    import threading

    class Index(http.server.BaseHTTPRequestHandler):
        seen: list[str] = []  # noqa: RUF012

        def do_HEAD(self):
            Index.seen.append(self.path)
            self.send_response(200 if self.path == "/whl/cpu/torch/" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
        venv, _ = fake_venv
        calls = install_dev(venv, index).splitlines()
    finally:
        server.shutdown()
        server.server_close()
    (pin,) = re.findall(r"^(torch==\S+)", (ROOT / "requirements-dev.lock").read_text(), re.MULTILINE)
    assert Index.seen == ["/whl/cpu/torch/"]
    assert calls == [
        f"-m pip install --quiet --no-deps --index-url {index} {pin}",
        "-m pip install --quiet -r requirements-dev.lock",
    ]


@pytest.mark.parametrize("index", ["http://127.0.0.1:9/whl/cpu", ""], ids=["unreachable", "empty"])
def test_dev_install_takes_torch_from_the_configured_sources_otherwise(fake_venv, index):
    venv, _ = fake_venv
    (pin,) = re.findall(r"^(torch==\S+)", (ROOT / "requirements-dev.lock").read_text(), re.MULTILINE)
    assert install_dev(venv, index).splitlines() == [
        f"-m pip install --quiet --no-deps {pin}",
        "-m pip install --quiet -r requirements-dev.lock",
    ]
