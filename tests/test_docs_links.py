"""The documentation is self-contained: every relative link resolves.

Checks, for README.md and every Markdown file under docs/, benchmarks/ and examples/:

* every relative link ``[text](path)`` / ``![alt](path)`` / ``[label]: path`` points to an
  existing file or folder, and a ``#anchor`` to a heading of the target Markdown file
  (GitHub's anchor rules) or an explicit ``id``/``name`` HTML anchor;

for the Python sources (src/, tests/, examples/, benchmarks/): every ``docs/….md#anchor``
they cite (paths relative to the repository root) exists;

and that no file cites documents that are not part of the repository.

Run as a script to print the problems: ``python tests/test_docs_links.py``.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SKIP_DIRS = {"__pycache__", ".pytest_cache", ".git", "node_modules", ".venv", "runs", "build", "dist"}
# names of documents that readers of the repository do not have; spelled in pieces so
# that this file does not match its own check
FORBIDDEN = ("ALGORITHMS" + ".md", "DESIGN" + ".md", "../" + "shared", "/work/" + "shared")

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^\s)]*)(?:\s+[\"'(][^)]*)?\s*\)")
_REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_HTML_ANCHOR = re.compile(r"<a\s[^>]*?(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
_SOURCE_DOC_REF = re.compile(r"(?<![\w/.-])(docs/[\w./-]+?\.md)(#[^\s)`'\",;\]]+)?")


def github_slug(text: str) -> str:
    """The anchor GitHub gives a heading: rendered text, lower case, punctuation dropped,
    spaces to hyphens (no collapsing)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch in " -" or category[0] in "LMN" or category == "Pc":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def _strip_code_spans(line: str) -> str:
    return _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


def markdown_lines(text: str):
    """``(line number, line)`` outside fenced code blocks, code spans blanked."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, _strip_code_spans(line)


def anchors(path: Path) -> set:
    """Every anchor of a Markdown file: heading slugs (with GitHub's ``-1``, ``-2`` for
    repeated headings) and explicit HTML ``id``/``name`` anchors."""
    text = path.read_text(encoding="utf-8")
    found, seen = set(), {}
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        found.update(_HTML_ANCHOR.findall(line))
        match = _HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def _check_target(source: Path, base: Path, target: str, cache: dict) -> str | None:
    """A problem with ``target`` (relative to ``base``) cited in ``source``, or ``None``."""
    path_part, _, anchor = target.partition("#")
    resolved = (base / path_part).resolve() if path_part else source.resolve()
    if not resolved.exists():
        return f"{target}: no such file {resolved}"
    if anchor and resolved.is_file() and resolved.suffix.lower() == ".md":
        if resolved not in cache:
            cache[resolved] = anchors(resolved)
        if anchor.lower() not in cache[resolved]:
            return f"{target}: no heading with anchor #{anchor} in {resolved.name}"
    return None


def markdown_link_problems(files) -> list:
    """``"file:line: problem"`` for each broken relative link of the Markdown ``files``."""
    problems, cache = [], {}
    for path in files:
        path = Path(path)
        for number, line in markdown_lines(path.read_text(encoding="utf-8")):
            targets = [m.group(1) for m in _INLINE_LINK.finditer(line)]
            definition = _REFERENCE_DEF.match(line)
            if definition:
                targets.append(definition.group(1))
            for target in targets:
                target = target.strip("<>").strip()
                if not target or _is_external(target):
                    continue
                problem = _check_target(path, path.parent, target, cache)
                if problem:
                    problems.append(f"{path}:{number}: {problem}")
    return problems


def source_reference_problems(files, root: Path = ROOT) -> list:
    """Broken ``docs/….md#anchor`` citations in source files (paths from ``root``)."""
    problems, cache = [], {}
    for path in files:
        path = Path(path)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in _SOURCE_DOC_REF.finditer(line):
                target = match.group(1) + (match.group(2) or "").rstrip(".:")
                problem = _check_target(path, root, target, cache)
                if problem:
                    problems.append(f"{path}:{number}: {problem}")
    return problems


def forbidden_mentions(files) -> list:
    """``"file:line: name"`` for each mention of a document outside the repository."""
    problems = []
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for name in FORBIDDEN:
                if name in line:
                    problems.append(f"{path}:{number}: {name}")
    return problems


def _walk(folder: Path, suffixes=None):
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if any(p in SKIP_DIRS or p.endswith(".egg-info") for p in parts):
            continue
        if path.is_file() and (suffixes is None or path.suffix in suffixes):
            out.append(path)
    return out


def markdown_files(root: Path = ROOT) -> list:
    files = [root / "README.md"]
    for folder in ("docs", "benchmarks", "examples"):
        files += _walk(root / folder, {".md"})
    return [f for f in files if f.exists()]


def source_files(root: Path = ROOT) -> list:
    files = []
    for folder in ("src", "tests", "examples", "benchmarks"):
        files += _walk(root / folder, {".py"})
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


def project_files(root: Path = ROOT) -> list:
    files = [root / "README.md"]
    for folder in ("src", "docs", "examples", "benchmarks", "tests"):
        files += _walk(root / folder)
    return [f for f in files if f.exists() and f.resolve() != Path(__file__).resolve()]


# ---------------------------------------------------------------- the repository's docs


def test_every_relative_markdown_link_resolves():
    problems = markdown_link_problems(markdown_files())
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_reference_in_the_sources_resolves():
    problems = source_reference_problems(source_files())
    assert not problems, "broken docs/ references:\n" + "\n".join(problems)


def test_no_file_cites_documents_outside_the_repository():
    problems = forbidden_mentions(project_files())
    assert not problems, "references to documents readers do not have:\n" + "\n".join(problems)


def test_the_documents_the_sources_cite_exist():
    for name in ("algorithms.md", "design.md", "methods/galet.md", "methods/slbamm.md", "methods/bagdc.md"):
        assert (ROOT / "docs" / name).is_file(), name


# ---------------------------------------------------------------- the checker itself


def test_github_slug_follows_githubs_rules():
    assert github_slug("Toy problems") == "toy-problems"
    assert github_slug("sl-BAMM official-code quirks") == "sl-bamm-official-code-quirks"
    assert github_slug("GALET — generalized alternating method") == "galet--generalized-alternating-method"
    assert github_slug("2a. float64 check of the `CG` difference") == "2a-float64-check-of-the-cg-difference"
    assert github_slug("Side by side with [BOAT](https://x.y) 1.1.1 (same data)") == "side-by-side-with-boat-111-same-data"
    assert github_slug("Compilation (`bilevel.compile`, opt-in)") == "compilation-bilevelcompile-opt-in"


def test_checker_reports_dangling_links_and_anchors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "target.md").write_text('# Title\n\n## Good heading\n\n## Good heading\n\n<a id="custom"></a>\n')
    bad = tmp_path / "bad.md"
    bad.write_text(
        "\n".join(
            [
                "# Bad",
                "[fine](sub/target.md) [fine anchor](sub/target.md#good-heading) [repeat](sub/target.md#good-heading-1)",
                "[html anchor](sub/target.md#custom) [self](#bad) ![folder](sub) [web](https://example.org/x.md)",
                "[missing file](sub/nothing.md)",
                "[missing anchor](sub/target.md#no-such-heading)",
                "[missing self anchor](#nowhere)",
                "`[in code](nothing.md)`",
                "```",
                "[in a fence](nothing.md)",
                "```",
                "[ref]: sub/also-missing.md",
            ]
        )
        + "\n"
    )
    problems = markdown_link_problems([bad])
    assert len(problems) == 4, problems
    assert [p.split(":")[1] for p in problems] == ["4", "5", "6", "11"]
    assert "no such file" in problems[0] and "nothing.md" in problems[0]
    assert "#no-such-heading" in problems[1]
    assert "#nowhere" in problems[2]
    assert "also-missing.md" in problems[3]


def test_checker_reports_dangling_docs_references_in_sources(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## A section\n")
    source = tmp_path / "module.py"
    source.write_text(
        '"""See docs/page.md#a-section, docs/page.md and (docs/page.md#a-section).\n'
        "Broken: docs/page.md#b-section and docs/other.md.\n"
        '"""\n'
    )
    problems = source_reference_problems([source], root=tmp_path)
    assert len(problems) == 2, problems
    assert "#b-section" in problems[0] and "other.md" in problems[1]


def test_checker_reports_forbidden_mentions(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("ok\nsee " + FORBIDDEN[0] + " §3\nsee " + FORBIDDEN[2] + "/x\n")
    assert [p.split(":")[-2:] for p in forbidden_mentions([source])] == [
        ["2", " " + FORBIDDEN[0]],
        ["3", " " + FORBIDDEN[2]],
    ]


if __name__ == "__main__":
    found = markdown_link_problems(markdown_files()) + source_reference_problems(source_files()) + forbidden_mentions(project_files())
    print("\n".join(found) or "all links resolve")
    sys.exit(1 if found else 0)
