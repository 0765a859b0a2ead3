"""The `pip install` lines of the documents against the project's extras and locks: every extra they name exists, every
package they name is one the project tests with, at the version it is pinned to, torch's CPU build comes from
PyTorch's CPU index, and the training page's install lines bring every package its examples import."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from snippets import blocks  # tests/docs/snippets.py

ROOT = Path(__file__).resolve().parents[2]
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PAGES = sorted(
    [ROOT / "README.md", ROOT / "surrogate_client" / "README.md", *(ROOT / "docs").glob("*.md")],
    key=str,
)
# locks: the runtime's and development's; the container test's tools (docs/deploy.md installs those)
LOCKS = ["requirements.lock", "requirements-dev.lock", "deploy/requirements-container.txt"]
PROJECTS = {".": ROOT / "pyproject.toml", "./surrogate_client": ROOT / "surrogate_client" / "pyproject.toml"}
OPTIONS_WITH_VALUE = {"--index-url", "-i", "--extra-index-url", "-r", "--requirement", "-c", "--constraint"}
FLAGS = {"-e", "--editable", "--no-deps", "-U", "--upgrade", "-q", "--quiet"}


def lock(path: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / path).read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


LOCKED = {name: v for path in LOCKS for name, v in lock(path).items()}
#: Tools a page names outside the project's locks: JupyterLab, to open the notebooks (docs/index.md says so).
UNLOCKED_TOOLS = {"jupyterlab"}


def pyproject(path: Path) -> dict:
    with path.open("rb") as fh:
        return tomllib.load(fh)["project"]


class PipLine:
    def __init__(self, page: Path, text: str) -> None:
        self.page, self.text = page, text
        self.options: dict[str, list[str]] = {}
        self.requirements: list[str] = []
        args = shlex.split(text, comments=True)
        i = 0
        while i < len(args):
            a = args[i]
            if a in OPTIONS_WITH_VALUE:
                self.options.setdefault(a, []).append(args[i + 1])
                i += 2
                continue
            if a.startswith("-"):
                assert a in FLAGS, f"{page.name}: unknown pip option {a!r} in {text!r}"
            else:
                self.requirements.append(a)
            i += 1

    def indexes(self) -> list[str]:
        return [v for k in ("--index-url", "-i", "--extra-index-url") for v in self.options.get(k, [])]

    def local(self) -> list[tuple[str, set[str]]]:
        """The project directories it installs, with the extras named."""
        out = []
        for r in self.requirements:
            m = re.fullmatch(r"(\.(?:/[\w.\-]+)?)/?(?:\[([\w,\- ]+)\])?", r)
            if m:
                extras = {canonicalize_name(e.strip()) for e in (m.group(2) or "").split(",") if e.strip()}
                out.append((m.group(1), extras))
        return out

    def named(self) -> list[Requirement]:
        return [Requirement(r) for r in self.requirements if not r.startswith(".")]

    def __repr__(self) -> str:
        return f"{self.page.relative_to(ROOT)}: pip install {self.text}"


def pip_lines(page: Path) -> list[PipLine]:
    text = page.read_text(encoding="utf-8")
    found = [m.group(1) for m in re.finditer(r"`pip install ([^`]+)`", text)]
    found += [
        m.group(1)
        for m in re.finditer(r"(?:^\s*(?:\$ )?|&& )(?:\S*/)?pip3? install ([^&;`\n]+)", text, re.MULTILINE)
    ]
    return [PipLine(page, f) for f in found]


ALL_LINES = [line for page in PAGES for line in pip_lines(page)]


def test_the_pages_have_install_lines():
    pages = {line.page.name for line in ALL_LINES}
    assert {"training.md", "client.md", "README.md"} <= pages


@pytest.mark.parametrize("line", ALL_LINES, ids=repr)
def test_install_line_agrees_with_extras_and_locks(line):
    for directory, extras in line.local():
        assert directory in PROJECTS, f"{line}: no project at {directory}"
        known = {canonicalize_name(e) for e in pyproject(PROJECTS[directory]).get("optional-dependencies", {})}
        assert extras <= known, f"{line}: extras {sorted(extras - known)} not in {directory}/pyproject.toml"
    for req in line.named():
        name = canonicalize_name(req.name)
        if name in UNLOCKED_TOOLS:
            assert not req.specifier, f"{line}: {req.name} is in no lock, so the page pins nothing"
            continue
        assert name in LOCKED, f"{line}: {req.name} is in none of {LOCKS}"
        locked = LOCKED[name]
        assert req.specifier.contains(locked, prereleases=True), f"{line}: {req} excludes the locked {locked}"
        for spec in req.specifier:
            # a pin names the locked version (its local label, like +cpu, is the index's business)
            if spec.operator == "==":
                assert Version(spec.version).public == LOCKED[name].public, f"{line}: {req}, locked {LOCKED[name]}"
    for path in line.options.get("-r", []) + line.options.get("--requirement", []):
        assert path in LOCKS, f"{line}: {path} is not one of the project's locks"
    for index in line.indexes():
        assert index == TORCH_CPU_INDEX, f"{line}: an index other than PyTorch's CPU index"
        assert [canonicalize_name(r.name) for r in line.named()] == ["torch"], f"{line}: the CPU index is for torch"
        assert line.local() == [], f"{line}: the project comes from the configured sources, not the CPU index"


def test_the_training_page_gives_torchs_cpu_build_at_the_locked_version():
    (cpu,) = [ln for ln in pip_lines(ROOT / "docs" / "training.md") if TORCH_CPU_INDEX in ln.indexes()]
    assert cpu.options.get("--index-url") == [TORCH_CPU_INDEX]
    (torch,) = cpu.named()
    assert str(torch.specifier) == f"=={LOCKED['torch'].public}"
    assert LOCKED["torch"].local == "cpu"


@pytest.mark.parametrize("directory", sorted(PROJECTS))
def test_the_extras_admit_the_locked_versions(directory):
    """What the tests run with satisfies every dependency and extra the projects declare."""
    project = pyproject(PROJECTS[directory])
    extras = project.get("optional-dependencies", {}).values()
    reqs = [*project.get("dependencies", []), *(r for extra in extras for r in extra)]
    for text in reqs:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in LOCKED, f"{directory}/pyproject.toml: {req.name} is not locked"
        assert req.specifier.contains(LOCKED[name], prereleases=True), f"{req} excludes the locked {LOCKED[name]}"


def third_party_imports(page: Path) -> set[str]:
    names = set()
    for block in blocks(page):
        if block.lang != "python":
            continue
        for node in ast.walk(ast.parse(block.code)):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "surrogate_client"}


def brought_by(lines: list[PipLine]) -> set[str]:
    """The distributions the lines install directly, with the client's own dependencies and those of its extras."""
    dists = {canonicalize_name(r.name) for line in lines for r in line.named()}
    for line in lines:
        for directory, extras in line.local():
            project = pyproject(PROJECTS[directory])
            reqs = list(project.get("dependencies", []))
            for extra, extra_reqs in project.get("optional-dependencies", {}).items():
                if canonicalize_name(extra) in extras:
                    reqs += extra_reqs
            dists |= {canonicalize_name(Requirement(r).name) for r in reqs}
    return dists


@pytest.mark.parametrize("page", ["docs/training.md", "surrogate_client/README.md"])
def test_the_install_lines_bring_what_the_examples_import(page):
    imports = third_party_imports(ROOT / page)
    assert imports, page
    dists = brought_by(pip_lines(ROOT / page))
    installed = importlib.metadata.packages_distributions()
    for module in sorted(imports):
        providers = {canonicalize_name(d) for d in installed.get(module, [module])}
        assert providers & dists, f"{page} imports {module} ({sorted(providers)}), which no install line brings"
