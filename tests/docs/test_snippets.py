"""Every code block of the documentation runs as written, against a real server, and shows true outputs.

Which blocks run and how shown outputs are written (``# -> <output>``): see ``snippets.py``. Python
blocks run with this interpreter in a subprocess; shell blocks run command by command with bash, with
this interpreter's folder first on the PATH. Both run in a scratch folder, against one server started
for this module on a free port (``127.0.0.1:8000`` / ``localhost:8000`` in a snippet are rewritten to it).
A ``curl`` command whose output the document does not show must get a 2xx answer (``--fail-with-body``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from snippets import INERT, PARSE, RUN, all_blocks, blocks, pointed_at, shell_commands

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "run_python_snippet.py"
BLOCKS = all_blocks()
RUNNABLE = [b for b in BLOCKS if b.lang in RUN and b.not_run is None]


def _env() -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    path = cwd / "snippet.py"
    path.write_text(code)
    return subprocess.run(
        [sys.executable, str(RUNNER), str(path)], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )


def run_shell(code: str, cwd: Path) -> None:
    for cmd in shell_commands(code):
        text = cmd.text
        if cmd.shown is None:
            text = re.sub(r"(^|[|;&]\s*)curl\b", r"\1curl --fail-with-body", text)
        r = subprocess.run(
            ["bash", "-o", "pipefail", "-c", text], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, f"line {cmd.line}: `{cmd.text}` exited {r.returncode}\n{r.stdout}\n{r.stderr}"
        if cmd.shown is not None:
            got = r.stdout.strip()
            assert got == cmd.shown, f"line {cmd.line}: `{cmd.text}`\nshown: {cmd.shown}\ngot:   {got}"


# -- static checks (fast) ----------------------------------------------------------------------------


def test_the_documents_have_blocks_to_check():
    ids = {b.id.split(":")[0] for b in RUNNABLE}
    assert {"README.md", "surrogate_client/README.md"} <= ids
    assert any(i.startswith("docs/") for i in ids)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_every_block_has_a_known_language(block):
    assert block.lang in RUN | PARSE | INERT, (
        f"{block.id}: code block language {block.lang!r}; use one of {sorted(RUN | PARSE | INERT)}"
    )
    if block.not_run is not None:
        assert block.lang in RUN, f"{block.id}: a not-run marker on a block that would not run anyway"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in PARSE], ids=lambda b: b.id)
def test_json_blocks_parse(block):
    json.loads(block.code)


def test_fences_are_found_with_their_markers(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text(
        "intro\n\n```python\nprint(1)  # -> 1\n```\n\n<!-- not-run: needs Docker -->\n```sh\ndocker ps\n```\n\n"
        "1. a list item\n\n   ```sh\n   curl -s localhost:8000/healthz\n   # -> {\"status\":\"ok\"}\n   ```\n"
    )
    found = blocks(doc)
    assert [(b.line, b.lang, b.not_run) for b in found] == [
        (3, "python", None),
        (8, "sh", "needs Docker"),
        (14, "sh", None),
    ]
    assert found[2].code == 'curl -s localhost:8000/healthz\n# -> {"status":"ok"}\n'
    assert pointed_at(found[2].code, "http://127.0.0.1:5555").startswith("curl -s 127.0.0.1:5555/healthz")


def test_shell_commands_join_continuations_and_take_shown_output():
    code = "# a comment\ncurl -s a \\\n  -d 'b'\n# -> first\n# -> second\n\necho hi  # -> hi\nls\n"
    cmds = shell_commands(code)
    assert [(c.line, c.text, c.shown) for c in cmds] == [
        (2, "curl -s a -d 'b'", "first\nsecond"),
        (7, "echo hi", "hi"),
        (8, "ls", None),
    ]


def test_python_runner_compares_shown_outputs(tmp_path):
    ok = "x = [1, 2]\nx  # -> [1, 2]\nprint('a', 3)  # -> a 3\nsum(\n    x\n)\n# -> 3\n"
    r = run_python(ok, tmp_path)
    assert r.returncode == 0, r.stderr
    wrong = "import numpy as np\nnp.arange(3) * 2  # -> array([0, 2, 5])\n"
    r = run_python(wrong, tmp_path)
    assert r.returncode == 1
    assert "array([0, 2, 4])" in r.stderr
    stray = "y = 1  # -> 1\n"
    r = run_python(stray, tmp_path)
    assert r.returncode != 0
    assert "no expression statement" in r.stderr


def test_shell_runner_compares_shown_outputs(tmp_path):
    run_shell("echo hi\n# -> hi\n", tmp_path)
    with pytest.raises(AssertionError, match="shown: ho"):
        run_shell("echo hi\n# -> ho\n", tmp_path)
    with pytest.raises(AssertionError, match="exited"):
        run_shell("false\n", tmp_path)


# -- the snippets, against a real server ---------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_snippet_runs(block, shared_server, tmp_path):
    base, proc = shared_server
    code = pointed_at(block.code, base, proc.grpc_address)
    if block.lang == "python":
        r = run_python(code, tmp_path)
        assert r.returncode == 0, f"{block.id} failed:\n{r.stdout}\n{r.stderr}"
    else:
        run_shell(code, tmp_path)
