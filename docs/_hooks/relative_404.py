"""mkdocs hook: ``404.html`` with links relative to the site's root, so the built site works from disk.

mkdocs renders error pages with absolute links (``/assets/...``, ``/api/``) because a web server
serves them at any missing URL. Opened from disk (``file://.../site/404.html``) or served below a
path, those links point at the root of the file system or of the host. ``404.html`` lies at the
root of the site, so links relative to it (``./assets/...``) work from disk, under ``mkdocs serve``
and from a web server that serves the site's root directory.
"""

from __future__ import annotations

from mkdocs import utils


def on_template_context(context, template_name: str, config):
    if not utils.is_error_template(template_name):
        return context
    base = "."
    context["base_url"] = base
    context["extra_css"] = [utils.normalize_url(path, None, base) for path in config.extra_css]
    context["extra_javascript"] = [utils.normalize_url(str(s), None, base) for s in config.extra_javascript]
    return context
