"""mkdocs hook: relative links from a page to files of the repository outside ``docs/``.

A page may link to ``../examples/quickstart.ipynb`` or show ``../examples/figures/x.png``: such links
work when the Markdown is read in the repository, but mkdocs only publishes ``docs/``. This hook
publishes every repository file that a page links to that way under ``_repo/`` in the site, and
points the link there. A link to a file that does not exist is left alone, so ``--strict`` still
fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

PREFIX = "_repo"
# [text](target) and ![alt](target), target without a scheme, up to an optional #fragment or title
LINK = re.compile(r"(\]\()(?P<target>\.\./[^)\s#]+)(?P<rest>[^)]*\))")


def _repo_target(docs_dir: Path, page_src: str, target: str) -> str | None:
    """The repository-relative path of ``target`` (a link from ``page_src``) if it is a file outside docs/."""
    root = docs_dir.parent
    path = (docs_dir / posixpath.dirname(page_src) / target).resolve()
    try:
        path.relative_to(docs_dir.resolve())
        return None  # inside docs/: mkdocs' own business
    except ValueError:
        pass
    try:
        rel = path.relative_to(root.resolve())
    except ValueError:
        return None
    return rel.as_posix() if path.is_file() else None


def on_files(files: Files, config) -> Files:
    docs_dir = Path(config["docs_dir"])
    wanted: set[str] = set()
    for f in files.documentation_pages():
        for m in LINK.finditer(Path(f.abs_src_path).read_text()):
            rel = _repo_target(docs_dir, f.src_uri, m["target"])
            if rel is not None:
                wanted.add(rel)
    for rel in sorted(wanted):
        files.append(File.generated(config, f"{PREFIX}/{rel}", abs_src_path=str(docs_dir.parent / rel)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs_dir = Path(config["docs_dir"])
    src = page.file.src_uri

    def repoint(m: re.Match) -> str:
        rel = _repo_target(docs_dir, src, m["target"])
        if rel is None:
            return m.group(0)
        return f"{m[1]}{posixpath.relpath(f'{PREFIX}/{rel}', posixpath.dirname(src) or '.')}{m['rest']}"

    return LINK.sub(repoint, markdown)
