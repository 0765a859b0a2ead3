"""The built documentation site needs no network and its 404 page works from disk; `make docs-serve` serves it."""

from __future__ import annotations

import os
import posixpath
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]


class Refs(HTMLParser):
    """Every URL an HTML page names (``href``, ``src``), and those the browser loads by itself
    (stylesheets, icons, preconnects, scripts, images), each as ``(tag, attribute, url)``."""

    LOADED: ClassVar = {("link", "href"), ("script", "src"), ("img", "src"), ("source", "src"), ("iframe", "src")}

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.urls.append((tag, name, value))

    def loaded(self) -> list[str]:
        return [u for tag, name, u in self.urls if (tag, name) in self.LOADED]


def refs(path: Path) -> Refs:
    parser = Refs()
    parser.feed(path.read_text())
    return parser


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    mkdocs = Path(sys.executable).parent / "mkdocs"
    r = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return out


def test_404_page_links_are_relative_and_lead_to_the_site(site):
    page = site / "404.html"
    urls = [u for _tag, _name, u in refs(page).urls]
    assert len(urls) > 10  # stylesheets, script, favicon and the navigation
    local = [u for u in urls if not urlsplit(u).scheme]
    assert not [u for u in local if u.startswith("/")]  # "/assets/..." points at the disk's root from file://
    # each relative link, taken from the site's root (where 404.html lies), names a file or page of the site
    for u in local:
        target = site / posixpath.normpath(urlsplit(u).path)
        assert target.is_file() or (target / "index.html").is_file(), u
    bundles = ["assets/javascripts/" + p.name for p in (site / "assets" / "javascripts").glob("bundle.*.js")]
    assert any(u.endswith(b) for u in local for b in bundles)
    assert '"base": "."' in page.read_text()  # the theme's own scripts (search) resolve from the same place


def test_no_page_loads_anything_from_the_network(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        text = page.read_text()
        assert "fonts.googleapis.com" not in text, page
        assert "fonts.gstatic.com" not in text, page
        assert [u for u in refs(page).loaded() if urlsplit(u).scheme or u.startswith("//")] == [], page
    for css in (site / "assets").rglob("*.css"):
        assert "fonts.googleapis.com" not in css.read_text(), css


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_docs_serve_target_runs_mkdocs_serve():
    r = subprocess.run(["make", "-n", "docs-serve"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    (line,) = [ln for ln in r.stdout.splitlines() if "mkdocs serve" in ln]
    assert "--dev-addr 127.0.0.1:8002" in line  # not make serve's ports 8000 (HTTP) and 8001 (gRPC)
