"""The package is release-ready and its documentation site covers it.

Version in one place, py.typed, LICENSE and CHANGELOG; mkdocs.yml's nav lists every page of
docs/ and every page it lists exists; the API reference has a page per public module and
links every name `import bilevel` exports; .ci/run runs its steps in the documented order.
(The build itself, `mkdocs build --strict` and the wheel smoke test run in .ci/run.)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
import sys
from pathlib import Path

import pytest
import yaml

import bilevel

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = [
    "problem", "methods", "solve", "oracles", "linsolve", "schedules", "updates", "callbacks",
    "checkpoint", "tree", "validation", "problems", "data", "experiments",
]  # fmt: skip


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _mkdocs() -> dict:
    class Loader(yaml.SafeLoader):
        """Safe loading that keeps mkdocs.yml's !!python/... tags as None instead of running them."""

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_version_is_defined_once_and_read_by_the_metadata():
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "bilevel.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", bilevel.__version__)
    installed = importlib.metadata.version("bilevel")
    assert installed == bilevel.__version__, (
        f"installed metadata says {installed}, bilevel.__version__ is {bilevel.__version__}: reinstall with pip install -e ."
    )


def test_changelog_has_the_current_version_and_an_unreleased_section():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in text
    assert re.search(rf"^## \[{re.escape(bilevel.__version__)}\] — \d{{4}}-\d{{2}}-\d{{2}}$", text, re.MULTILINE)


def test_license_is_mit_as_the_metadata_says():
    project = _pyproject()["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "the bilevel authors" in text


def test_package_is_marked_typed_and_ships_the_marker():
    assert (Path(bilevel.__file__).parent / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["bilevel"]
    assert "Typing :: Typed" in _pyproject()["project"]["classifiers"]


def test_nav_lists_every_docs_page_and_only_pages_that_exist():
    nav = _nav_pages(_mkdocs()["nav"])
    docs = ROOT / "docs"
    missing = [page for page in nav if not (docs / page).is_file()]
    assert not missing, f"mkdocs.yml nav lists pages that do not exist: {missing}"
    pages = sorted(str(p.relative_to(docs)) for p in docs.rglob("*.md"))
    omitted = [page for page in pages if page not in nav]
    assert not omitted, f"pages of docs/ missing from mkdocs.yml nav: {omitted}"


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_module_has_an_api_page(module):
    page = ROOT / "docs" / "api" / f"{module}.md"
    assert page.is_file(), f"no API page for bilevel.{module}: add docs/api/{module}.md with '::: bilevel.{module}'"
    assert f"::: bilevel.{module}\n" in page.read_text(encoding="utf-8")
    importlib.import_module(f"bilevel.{module}")
    assert f"api/{module}.md" in _nav_pages(_mkdocs()["nav"])


def test_api_index_links_every_top_level_name():
    index = (ROOT / "docs" / "api" / "index.md").read_text(encoding="utf-8")
    names = [n for n in bilevel.__all__ if n != "__version__"]
    for name in names:
        obj = getattr(bilevel, name)
        if inspect.ismodule(obj):
            assert f"(`{obj.__name__}`)" in index or f"[`{obj.__name__}`]" in index, f"docs/api/index.md does not list {obj.__name__}"
        else:
            assert re.search(rf"\[`{name}`\]\[bilevel\.[\w.]*\.{name}\]", index), f"docs/api/index.md does not link bilevel.{name}"


def test_ci_runs_its_steps_in_the_documented_order():
    text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    steps = re.findall(r'^step "([^"]+)"', text, re.MULTILINE)
    assert steps == ["install", "lint", "types", "tests", "docs", "wheel smoke"]
    assert "python -m pytest -q -p no:cacheprovider" in text
