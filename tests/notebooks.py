"""The notebooks of ``examples/``: executing one against a server, reading its cells and outputs, and
comparing a re-run with the committed outputs.

Run as a script (`make notebook`), it refreshes the committed outputs of every notebook: each is executed
against the server at ``SURROGATE_URL`` (default: a `make serve` on 127.0.0.1:8000) in a scratch folder,
so the figures it writes do not replace ``examples/figures/``, and saved with its outputs.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DEFAULT_URL = "http://127.0.0.1:8000"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
KERNEL_MODULES = {"IPython"}  # the kernel itself brings these


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC, "not a PNG"
    return struct.unpack(">II", data[16:24])  # the IHDR chunk: width, height


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def code_cells(nb) -> list:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def source_of(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def text_of(cell) -> str:
    """What a cell printed (its stream outputs)."""
    out = []
    for o in cell["outputs"]:
        if o["output_type"] == "stream":
            out.append("".join(o["text"]) if isinstance(o["text"], list) else o["text"])
    return "".join(out)


def images_of(nb) -> list[bytes]:
    pngs = [o["data"]["image/png"] for c in code_cells(nb) for o in c["outputs"] if "image/png" in o.get("data", {})]
    return [base64.b64decode("".join(p) if isinstance(p, list) else p) for p in pngs]


def comparable(text: str, url: str) -> str:
    """A cell's printed text, comparable between runs: the server's URL as the default one, and the
    measured times (the decimal numbers of a line that speaks of "ms per") masked. Everything else
    (losses, accuracies, counts, arrays) stays as printed."""
    lines = []
    for line in text.replace(url, DEFAULT_URL).split("\n"):
        if "ms per" in line:
            line = re.sub(r"\d+\.\d+", "<time>", line)
        lines.append(line)
    return "\n".join(lines)


def execute(notebook: Path, url: str, workdir: Path, timeout: int = 300):
    """``notebook`` executed against the server at ``url`` in ``workdir`` (its figures land there),
    without timing metadata."""
    import nbclient
    import nbformat

    shutil.copy(notebook, workdir / notebook.name)
    nb = nbformat.read(workdir / notebook.name, as_version=4)
    old = os.environ.get("SURROGATE_URL")
    os.environ["SURROGATE_URL"] = url  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(
            nb, kernel_name="python3", timeout=timeout, record_timing=False,
            resources={"metadata": {"path": str(workdir)}},
        )
        client.execute()
    finally:
        if old is None:
            os.environ.pop("SURROGATE_URL", None)
        else:
            os.environ["SURROGATE_URL"] = old
    nb.metadata["language_info"] = {"name": "python"}  # not the interpreter's exact version
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    return nb


def assert_rerun_gives_the_committed_outputs(notebook: Path, url: str, workdir: Path):
    """Executes ``notebook`` and compares every code cell's printed text with the committed one; the re-run."""
    nb = execute(notebook, url, workdir)
    committed = read(notebook)
    rerun = [comparable(text_of(c), url) for c in code_cells(nb)]
    assert rerun == [comparable(text_of(c), DEFAULT_URL) for c in code_cells(committed)]
    assert len(images_of(nb)) == len(images_of(committed))
    return nb


def assert_committed_with_outputs(nb) -> None:
    """Run once, top to bottom, without errors and without timing metadata."""
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    cells = code_cells(nb)
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1))
    for c in cells:
        assert "execution" not in c["metadata"]
        assert not any(o["output_type"] == "error" for o in c["outputs"])


# -- the set-up cell -------------------------------------------------------------------------------


def imported_modules(nb) -> set[str]:
    """The top-level modules the code cells import, but the standard library's and the kernel's."""
    found: set[str] = set()
    for cell in code_cells(nb):
        for node in ast.walk(ast.parse(source_of(cell))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - KERNEL_MODULES


def setup_cell(nb):
    return code_cells(nb)[0]


def setup_requirements(nb) -> dict[str, str]:
    """The set-up cell's ``REQUIREMENTS``: module -> what pip installs."""
    for node in ast.parse(source_of(setup_cell(nb))).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["REQUIREMENTS"]:
            return ast.literal_eval(node.value)
    raise AssertionError("the first code cell defines no REQUIREMENTS")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(lock: Path = ROOT / "requirements-dev.lock") -> dict[str, str]:
    """``{distribution: version}`` of a lock file (``name==version`` lines)."""
    pins = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            pins[canonical(m[1])] = m[2]
    return pins


def assert_setup_installs_what_the_cells_import(notebook: Path) -> None:
    nb = read(notebook)
    requirements = setup_requirements(nb)
    assert set(requirements) == imported_modules(nb)
    pins = lock_pins()
    for module, req in requirements.items():
        if module == "surrogate_client":
            assert (notebook.parent / req).resolve() == ROOT / "surrogate_client"  # this repository's client
            continue
        name, _, version = req.partition("==")
        assert version, f"{req} is not pinned"
        assert pins[canonical(name)].split("+")[0] == version, req  # the lock's version (torch: +cpu, the CPU index)
    source = source_of(setup_cell(nb))
    if "torch" in requirements:
        assert f'"{TORCH_CPU_INDEX}"' in source
        assert '"--extra-index-url", TORCH_CPU_INDEX' in source


def refresh(notebook: Path) -> None:
    """Re-executes ``notebook`` against ``SURROGATE_URL`` and saves it with its outputs."""
    import nbformat

    url = os.environ.get("SURROGATE_URL", DEFAULT_URL)
    with tempfile.TemporaryDirectory() as tmp:
        executed = execute(notebook, url, Path(tmp))
    nbformat.write(executed, notebook)
    print(f"{notebook}: {notebook.stat().st_size} bytes, {len(images_of(read(notebook)))} figures")


if __name__ == "__main__":
    for path in sorted(EXAMPLES.glob("*.ipynb")):
        refresh(path)
