"""The shipped docs stand on their own: no link leaves the repository, every relative link
resolves, and every runbook can be reached from the docs."""

import re
from pathlib import Path

import pytest

from .conftest import ROOT

DOCS = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").rglob("*.md")])
RUNBOOKS = ROOT / "docs" / "runbooks"

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
AUTOLINK = re.compile(r"<([a-z][a-z0-9+.-]*:[^>\s]+)>", re.I)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def links(text: str) -> list[str]:
    """Link targets of a markdown text; code blocks and code spans hold no links."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return [m.group(1) for pattern in (INLINE_LINK, REFERENCE, AUTOLINK) for m in pattern.finditer(prose)]


def broken(doc: Path, target: str) -> str | None:
    """Why ``target`` (a link in ``doc``) is not a file or folder of the repository, or None."""
    if SCHEME.match(target):
        return "leaves the repository"
    path = target.split("#", 1)[0]
    if not path:
        return None  # an anchor in the same document
    resolved = (doc.parent / path).resolve()
    if not resolved.is_relative_to(ROOT):
        return "points outside the repository"
    if not resolved.exists():
        return "does not exist"
    return None


def linked_files() -> set[Path]:
    """Every file some doc links to; a link to a folder reaches its README.md."""
    found = set()
    for doc in DOCS:
        for target in links(doc.read_text(encoding="utf-8")):
            if broken(doc, target) is None and target.split("#", 1)[0]:
                resolved = (doc.parent / target.split("#", 1)[0]).resolve()
                found.add(resolved / "README.md" if resolved.is_dir() else resolved)
    return found


def test_the_link_finder_sees_every_kind_of_link_and_skips_code():
    text = ('See [a](docs/a.md#x) and ![img](b.png "title"), <https://example.com>.\n'
            "[ref]: ../c.md\n`[not](code.md)`\n```\n[nor](fence.md)\n```\n")
    assert links(text) == ["docs/a.md#x", "b.png", "../c.md", "https://example.com"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(ROOT)))
def test_every_link_stays_in_the_repository_and_resolves(doc):
    text = doc.read_text(encoding="utf-8")
    problems = [f"{target}: {why}" for target in links(text) if (why := broken(doc, target))]
    assert not problems, f"{doc.relative_to(ROOT)}: {problems}"
    assert "../shared" not in text, f"{doc.relative_to(ROOT)} points at ../shared, which is not shipped"


def test_every_runbook_is_linked_from_the_docs():
    reached = linked_files()
    unlinked = [str(path.relative_to(ROOT)) for path in sorted(RUNBOOKS.rglob("*.md")) if path not in reached]
    assert not unlinked, f"runbooks no doc links to: {unlinked}"
