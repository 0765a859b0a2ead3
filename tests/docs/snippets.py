"""Fenced code blocks of the documentation, and how each kind is treated by ``test_snippets.py``.

Documents: ``README.md``, ``surrogate_client/README.md`` and every ``docs/*.md`` (found by glob, so a new
page is checked without registering it anywhere).

Languages (the word after the opening fence):

- ``python``: run with this interpreter (``sys.executable``) in a subprocess, through ``run_python_snippet.py``.
- ``sh`` / ``bash``: each command run with bash; ``python`` on the PATH is this interpreter.
- ``json``: must parse.
- ``text``, ``console``, ``yaml``, ``dockerfile``, ``nginx``, ``ini``, ``toml``: shown, not run.
- anything else, or no language at all: the test fails (so that a block is never skipped unnoticed).

A ``python``/``sh``/``bash`` block that must not run here (it needs Docker, or installs packages, or
starts a server of its own) carries ``<!-- not-run: <reason> -->`` on the line before its fence.

Shown output, one convention everywhere: a comment ``# -> <output>`` at the end of the line (or on the
next line, alone) after a Python expression statement or a shell command. For Python the ``repr`` of the
expression's value is compared (whitespace ignored; for ``print(...)`` the printed text, whitespace
runs collapsed); for a shell command, its standard output (stripped). Several ``# -> `` lines in a row
are one multi-line output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RUN = {"python", "sh", "bash"}
PARSE = {"json"}
INERT = {"text", "console", "yaml", "dockerfile", "nginx", "ini", "toml"}

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^`]*)$")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(?P<reason>\S.*?)\s*-->\s*$")
# the local server a snippet talks to; the test points it at its own server
LOCAL = re.compile(r"(?:127\.0\.0\.1|localhost):8000\b")
LOCAL_GRPC = re.compile(r"(?:127\.0\.0\.1|localhost):8001\b")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason given by a <!-- not-run: ... --> marker

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def documents() -> list[Path]:
    docs = sorted((ROOT / "docs").glob("*.md"))
    return [ROOT / "README.md", ROOT / "surrogate_client" / "README.md", *docs]


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = len(m["indent"]), m["info"].strip().split(" ")[0].lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: unclosed code block")
        marker = NOT_RUN.match(lines[start - 1]) if start > 0 else None
        out.append(Block(path, start + 1, lang, "\n".join(body) + "\n", marker["reason"] if marker else None))
        i += 1
    return out


def all_blocks() -> list[Block]:
    return [b for p in documents() for b in blocks(p)]


def pointed_at(code: str, base_url: str, grpc: str | None = None) -> str:
    """``code`` with the documented local server (127.0.0.1:8000, localhost:8000) pointed at ``base_url``,
    and its gRPC port (127.0.0.1:8001, localhost:8001) at ``grpc`` (host:port), where given."""
    hostport = base_url.split("://", 1)[1]
    code = LOCAL.sub(hostport, code)
    return LOCAL_GRPC.sub(grpc, code) if grpc else code


@dataclass(frozen=True)
class Command:
    line: int  # 1-based line inside the block
    text: str
    shown: str | None  # the output the document shows, if any


def shell_commands(code: str) -> list[Command]:
    """Commands of a shell block (backslash continuations joined), each with the output shown after it."""
    cmds: list[Command] = []
    pending: list[str] = []
    start = 0
    for n, raw in enumerate(code.splitlines(), 1):
        line = raw.rstrip()
        stripped = line.strip()
        if not pending and stripped.startswith("# ->"):
            if not cmds:
                raise ValueError(f"line {n}: shown output before any command")
            prev = cmds[-1]
            text = stripped[len("# ->"):].strip()
            cmds[-1] = Command(prev.line, prev.text, text if prev.shown is None else f"{prev.shown}\n{text}")
            continue
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            start = n
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        text = " ".join(p.strip() for p in pending)
        shown = None
        m = re.search(r"\s#\s->\s?(.*)$", text)
        if m:
            text, shown = text[: m.start()].rstrip(), m[1].strip()
        cmds.append(Command(start, text, shown))
        pending = []
    if pending:
        raise ValueError("a shell block ends in a line continuation")
    return cmds
