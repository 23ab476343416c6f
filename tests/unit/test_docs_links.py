"""The documentation holds together: README.md is a front door that links every page under docs/,
no relative link in README.md or docs/*.md points at a file, or a heading, that is not there, and
the one description of the layout (docs/development.md) names every package and module of ours.

Links are Markdown inline links and images, `[text](target)` and `![alt](target)`, outside
fenced code blocks. A target with a scheme (https:, mailto:) is not checked. A `#fragment` is
checked against the headings of the page it names, slugged as GitHub slugs them (lower case,
punctuation dropped, spaces to hyphens, a repeated heading numbered -1, -2, ...).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 150          # issue 21: a front door of at most about 150 lines

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks."""
    out, fenced = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def links(page: Path) -> list[str]:
    return [m.group(1) for line in prose_lines(page) for m in LINK.finditer(line)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)      # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: Counter[str] = Counter()
    out = set()
    for line in prose_lines(page):
        m = HEADING.match(line)
        if m:
            s = slug(m.group(2))
            out.add(s if not seen[s] else f"{s}-{seen[s]}")
            seen[s] += 1
    return out


def broken(page: Path, base: Path | None = None) -> list[str]:
    """Every relative link of `page` whose file, or heading, does not exist (targets resolved
    from `base`, the page's own folder unless given)."""
    folder = page.parent if base is None else base
    bad = []
    for target in links(page):
        if SCHEME.match(target):
            continue
        path, _, fragment = target.partition("#")
        dest = (folder / path).resolve() if path else page
        if path and ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{target} (outside the repository)")
        elif not dest.exists():
            bad.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            bad.append(f"{target} (no such heading in {dest.name})")
    return bad


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve()
              for t in links(README) if not SCHEME.match(t)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages README.md does not link: {missing}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert not broken(page), f"{page.relative_to(ROOT)}: {broken(page)}"


def test_readme_is_a_front_door() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): " \
        "move the detail into a page under docs/ and link it"


@pytest.mark.parametrize("text, expected", [
    ("2. Processes and data flow", "2-processes-and-data-flow"),
    ("Issue 8 and 11 runs (2026-12-02)", "issue-8-and-11-runs-2026-12-02"),
    ("3. Classification: evidence → lane, and identity",
     "3-classification-evidence--lane-and-identity"),
    ("Moving Postfix's smtpd to 127.0.0.1:10025", "moving-postfixs-smtpd-to-12700110025"),
    ("The `queue`, in [Postfix](https://postfix.org) terms", "the-queue-in-postfix-terms"),
])
def test_slug_as_github_makes_it(text: str, expected: str) -> None:
    assert slug(text) == expected


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    """The checker itself: a missing file, a missing heading and a way out of the repository
    are reported; a good link, a link in a code block and an https link are not."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [ok](../README.md#results) [web](https://example.org/x)"
                    " ![img](../bench/results/latency.png)\n"
                    "[gone](nowhere.md) [no heading](design.md#no-such-heading) [out](../../x)\n"
                    "```\n[in code](also-nowhere.md)\n```\n", encoding="utf-8")
    assert broken(page, base=DOCS) == [            # resolved as if the page lived in docs/
        "nowhere.md (no such file)", "design.md#no-such-heading (no such heading in design.md)",
        "../../x (outside the repository)"]


def layout_block() -> str:
    """The tree under "## Layout" in docs/development.md (its first fenced block)."""
    text = (DOCS / "development.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def test_development_layout_names_every_module() -> None:
    """The layout is described once, in docs/development.md: every package of ours and every
    module in it is named there, so a module added, moved or split is added to the tree too."""
    block = layout_block()
    missing = []
    for top in ("ingress", "workers"):
        for pkg in sorted(p for p in (ROOT / top).iterdir() if (p / "__init__.py").is_file()):
            if not re.search(rf"^\s*{pkg.name}/", block, re.M):
                missing.append(f"{top}/{pkg.name}/")
            missing += [f"{top}/{pkg.name}/{m.name}" for m in sorted(pkg.glob("*.py"))
                        if m.stem != "__init__" and not re.search(rf"\b{m.stem}\b", block)]
    assert not missing, f"docs/development.md's layout does not name: {missing}"
