"""MkDocs hooks for the documentation site (mkdocs.yml: ``hooks:``).

The README, CONTRIBUTING.md and CHANGELOG.md are written once, at the repository root, and
shown on the site as index.md, contributing.md and changelog.md: those pages of docs/ hold
only the line ``--8<-- "README.md"`` (etc.), which is replaced by the file. Links in the
included file are relative to the repository root (``docs/choosing.md``, ``CONTRIBUTING.md``)
and are rewritten for a page at the top of docs/ (``choosing.md``, ``contributing.md``); any
page's link to one of the root files (``../README.md#anchor``) goes to its page on the site.

Links are rewritten before the Markdown is rendered, so mkdocs still validates every one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: root file -> its page in docs/
INCLUDED = {"README.md": "index.md", "CONTRIBUTING.md": "contributing.md", "CHANGELOG.md": "changelog.md"}
_INCLUDE = re.compile(r'^--8<-- "([A-Z]+\.md)"\s*$', re.MULTILINE)


def _links_to(target: str, replacement: str, markdown: str) -> str:
    """Rewrite inline links ``](target)`` and ``](target#anchor)``."""
    return re.sub(r"\]\(" + re.escape(target) + r"(?=[#)])", "](" + replacement, markdown)


def _include(match: re.Match[str]) -> str:
    name = match.group(1)
    if name not in INCLUDED:
        raise ValueError(f'--8<-- "{name}": only {", ".join(INCLUDED)} can be included (scripts/mkdocs_hooks.py)')
    text = (ROOT / name).read_text(encoding="utf-8")
    text = re.sub(r"\]\(docs/", "](", text)
    for root_file, page in INCLUDED.items():
        text = _links_to(root_file, page, text)
    return text


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Include the root files in their pages; point links to them at those pages."""
    markdown = _INCLUDE.sub(_include, markdown)
    depth = page.file.src_uri.count("/")
    for root_file, site_page in INCLUDED.items():
        markdown = _links_to("../" * (depth + 1) + root_file, "../" * depth + site_page, markdown)
    return markdown
