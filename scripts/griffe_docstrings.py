"""Griffe extension: the docstrings as written, rendered well in the API reference.

Two things the docstrings do that Google-style rendering would not understand:

* ``Example:`` sections (singular) are read as ``Examples:``, so that their ``>>>`` lines render
  as code (griffe knows only the plural; otherwise they are prose and ``x["k"][0]`` becomes a
  broken Markdown reference);
* Sphinx roles become links, as below.

The docstrings cite other objects the Sphinx way (``:class:`Result```, ``:func:`~bilevel.solve```,
``:mod:`bilevel.schedules```), which Google-style rendering would print verbatim. Each role is
resolved in the scope of the object whose docstring holds it:

* a ``bilevel`` object becomes a link to its entry in the API reference (an optional
  cross-reference: plain code when that object has no entry, e.g. a private helper);
* an object of another package (``torch.compile``, ``ValueError``) becomes inline code;
* a name that resolves nowhere is logged as a warning, so ``mkdocs build --strict`` fails on a
  reference to something that does not exist.

Used by mkdocs.yml (``plugins: mkdocstrings: handlers: python: options: extensions``).
"""

from __future__ import annotations

import builtins
import contextlib
import html
import logging
import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")
_EXTERNAL = ("torch", "numpy", "np", "builtins", "typing", "collections", "pathlib", "yaml", "matplotlib", "tqdm")
_BUILTINS = set(dir(builtins))

logger = logging.getLogger("mkdocs.plugins.griffe_sphinx_roles")


def _resolve(obj: griffe.Object, target: str, collection: Any) -> str | None:
    """The canonical path of ``target`` seen from ``obj``, or None if it resolves nowhere."""
    if target.startswith("."):  # a sibling module, e.g. :mod:`.sources` in bilevel/data/__init__.py
        package = obj.module if obj.module.is_init_module or obj.module.parent is None else obj.module.parent
        target = package.path + target
    candidates = [target] if "." in target else []
    scope: griffe.Object | None = obj
    while scope is not None:  # the object's own scope, then each enclosing one
        with contextlib.suppress(griffe.NameResolutionError):
            candidates.append(scope.resolve(target))
        scope = scope.parent
    for path in candidates:
        try:
            found = collection[path]
        except (KeyError, ValueError):
            continue
        try:
            return str(found.final_target.path if found.is_alias else found.path)
        except griffe.AliasResolutionError:  # an alias to another package, not loaded
            return path
    return None


class Docstrings(griffe.Extension):
    """Rewrite ``Example:`` headings and Sphinx roles in every docstring of the loaded package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        collection = loader.modules_collection
        seen: set[str] = set()

        def visit(obj: griffe.Object) -> None:
            if obj.path in seen:
                return
            seen.add(obj.path)
            if obj.docstring is not None:
                text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
                obj.docstring.value = _ROLE.sub(lambda m: self._replace(obj, m, collection), text)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)  # type: ignore[arg-type]  # non-alias members are Objects

        visit(pkg)

    @staticmethod
    def _replace(obj: griffe.Object, match: re.Match[str], collection: Any) -> str:
        short, target = match.group(1), match.group(2).strip()
        shown = target.rsplit(".", 1)[-1] if short else target
        code = f"<code>{html.escape(shown)}</code>"
        if target.split(".")[0] in _EXTERNAL or target in _BUILTINS:
            return f"`{shown}`"
        path = _resolve(obj, target, collection)
        if path is None:
            logger.warning("%s: %s names nothing that exists (seen from %s)", obj.relative_filepath, match.group(0), obj.path)
            return f"`{shown}`"
        if not path.startswith("bilevel"):
            return f"`{shown}`"
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'
