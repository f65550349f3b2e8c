"""Every ``docs/science.md §N`` citation in the repository names a section that exists.

The science document is the reference of docstrings, tests, configs and the README; a
citation of a missing section (a renumbering, a typo) fails here with the file and line.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCIENCE = ROOT / "docs" / "science.md"
# "docs/science.md §7", "§7.4", "§1-2", "§2-5", "§1, §8" (every § after the file name counts)
CITATION = re.compile(r"science\.md((?:[ ,;and]*§\d+(?:\.\d+)?(?:-\d+)?)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)(?:-(\d+))?")
SOURCES = ("nclightning", "tests", "benchmarks", "docs", "README.md", ".ci")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ""}


def _headings() -> set[str]:
    """Section numbers of ``## N.`` and ``### N.M`` headings."""
    found = set()
    for line in SCIENCE.read_text().splitlines():
        m = re.match(r"#{2,3} (\d+(?:\.\d+)?)\.? ", line)
        if m:
            found.add(m.group(1))
    return found


def _files():
    for name in SOURCES:
        path = ROOT / name
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from (p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


def _cited(text: str):
    for m in CITATION.finditer(text):
        for sec in SECTION.finditer(m.group(1)):
            first, last = sec.group(1), sec.group(2)
            if last is None:
                yield first
            else:  # a range "§2-5": every top-level section in it
                yield from (str(n) for n in range(int(first), int(last) + 1))


def test_the_document_has_sections_1_to_10():
    headings = _headings()
    assert {str(n) for n in range(1, 11)} <= headings, sorted(headings)


def test_every_citation_points_at_an_existing_section():
    headings = _headings()
    missing, count = [], 0
    for path in _files():
        if path == SCIENCE or "__pycache__" in path.parts:
            continue
        text = path.read_text(errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            for sec in _cited(line):
                count += 1
                if sec not in headings:
                    missing.append(f"{path.relative_to(ROOT)}:{lineno}: §{sec}")
    assert count > 50  # the scan finds the citations (not vacuous)
    assert not missing, missing


def test_the_documents_own_cross_references_exist():
    text = SCIENCE.read_text()
    refs = {m.group(1) for m in re.finditer(r"§(\d+(?:\.\d+)?)", text)}
    assert len(refs) > 20
    assert refs <= _headings(), sorted(refs - _headings())


def test_nothing_cites_the_external_notes():
    offenders = [
        str(p.relative_to(ROOT))
        for p in _files()
        if p != Path(__file__) and "SCIENCE.md" in p.read_text(errors="replace")
    ]
    assert not offenders, offenders
