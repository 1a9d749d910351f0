"""Every citation of the specification names a file of docs/ and a numbered heading in it.

Code, tests, benchmarks, examples and notebooks cite the mathematics as `docs/spec.md §1b`,
`docs/spec-mixers.md §7` or `docs/spec-layouts.md §3`; a list goes on with `, §2`, `/§3`,
`-§1d` (a range) or `and §4`. A heading `## 1. Title` is §1 and `### 1b. Title` is §1b.
In those folders a citation that names no file (`spec §3`, `spec 1d`, a `§` outside a citation)
fails, and so does one whose file or heading does not exist. The documentation pages cite their
own sections with a bare `§`, so there only the citations that name a spec file are resolved
(`spec.md §7` relative to docs/) and a bare `spec §N` fails.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

from tests.support import ROOT

CODE = ("lens_alti", "tests", "tests_tl3", "benchmarks", "examples", "notebooks")
SUFFIXES = {".py", ".pyi", ".c", ".h", ".md", ".txt", ".ipynb", ".toml", ".sh"}
PAGES = ("README.md", "CONTRIBUTING.md", "CHANGELOG.md")

ID = r"[0-9]+[a-z]?"
SEP = r"(?:\s*(?:, and|,|/|-|–|and)\s*)"
# A spec file (any path ending in a name with "spec" in it), optional closing backticks, then §ids.
CITATION = re.compile(rf"(?P<file>[\w./-]*spec[\w-]*\.md)`*\s?(?P<ids>§\s?{ID}(?:{SEP}§\s?{ID})*)")
SECTION = re.compile(rf"§\s?({ID})")
HEADING = re.compile(rf"^#{{2,6}}\s+({ID})\.\s", re.M)
# Citations that name no file: "spec §3", "Spec §4", "spec-mixers §5", "spec 1d", "spec 1a-1d".
BARE = re.compile(rf"(?<![\w./-])[Ss]pec(?:-[a-z]+)?(?:\s?§|\s{ID}\b)")


def _files(folder: str) -> list[Path]:
    """The text files of `folder` (this file excepted: its examples are wrong on purpose)."""
    return sorted(
        p
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts and p != Path(__file__).resolve()
    )


PAGE_FILES = [ROOT / name for name in PAGES] + sorted((ROOT / "docs").rglob("*.md"))


@cache
def sections(path: Path) -> frozenset[str]:
    """The section ids of a spec page: `## 1. ...` → "1", `### 1b. ...` → "1b"."""
    return frozenset(HEADING.findall(path.read_text(encoding="utf-8")))


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def problems(path: Path, text: str, *, code: bool) -> list[str]:
    """What is wrong with the spec citations of one file (empty when every one resolves)."""
    where = path.relative_to(ROOT)
    found: list[str] = []
    covered: list[tuple[int, int]] = []
    for m in CITATION.finditer(text):
        covered.append(m.span())
        name = m["file"]
        if code and not name.startswith("docs/"):
            fix = f"docs/{Path(name).name}"
            found.append(f"{where}:{_line(text, m.start())}: {m[0]!r} names no file of docs/ (write {fix})")
            continue
        target = ROOT / name if name.startswith("docs/") else ROOT / "docs" / Path(name).name
        if not target.is_file():
            found.append(f"{where}:{_line(text, m.start())}: {m[0]!r} cites {name}, which does not exist")
            continue
        missing = [s for s in SECTION.findall(m["ids"]) if s not in sections(target)]
        if missing:
            found.append(f"{where}:{_line(text, m.start())}: {m[0]!r}: no section {', '.join(missing)} in {name}")
    for m in BARE.finditer(text):
        found.append(f"{where}:{_line(text, m.start())}: {m[0]!r} names no file (write docs/spec.md §N)")
    if code:
        for m in re.finditer("§", text):
            if not any(a <= m.start() < b for a, b in covered):
                context = text[max(0, m.start() - 20) : m.start() + 10].replace("\n", " ")
                found.append(f"{where}:{_line(text, m.start())}: a § outside a docs/spec*.md citation: {context!r}")
    return found


@pytest.mark.parametrize("folder", CODE)
def test_code_citations_name_a_file_and_an_existing_section(folder: str) -> None:
    bad = [p for path in _files(folder) for p in problems(path, path.read_text(encoding="utf-8"), code=True)]
    assert not bad, "\n".join(bad)


def test_page_citations_resolve() -> None:
    bad = [p for path in PAGE_FILES for p in problems(path, path.read_text(encoding="utf-8"), code=False)]
    assert not bad, "\n".join(bad)


def test_the_spec_pages_have_numbered_sections() -> None:
    cited = {"1", "1a", "1b", "1c", "1d", "1e", "1f", "2", "3", "4", "5", "6", "7", "8"}
    assert cited <= sections(ROOT / "docs" / "spec.md")
    assert {"5", "7"} <= sections(ROOT / "docs" / "spec-mixers.md")
    assert {"1", "2", "3"} <= sections(ROOT / "docs" / "spec-layouts.md")


def test_the_checker_catches_what_it_should() -> None:
    """The rules themselves, on made-up text: resolved, wrong section, wrong file, no file."""
    fake = ROOT / "lens_alti" / "fake.py"
    ok = "see docs/spec.md §1b, §2/§3, §1a-§1d and §4; `docs/spec-mixers.md` §7"
    assert problems(fake, ok, code=True) == []
    assert len(problems(fake, "docs/spec.md §1z", code=True)) == 1  # no such section
    assert len(problems(fake, "docs/spec.md §2, §99", code=True)) == 1  # one of a list
    assert len(problems(fake, "docs/alti-spec.md §1", code=True)) == 1  # no such file
    assert len(problems(fake, "spec-mixers.md §5", code=True)) == 1  # not under docs/
    for bare in ("spec §3", "(Spec §4 steps)", "spec-mixers §5", "spec 1d", "spec 1a-1d, 2"):
        assert problems(fake, bare, code=True), bare
    assert len(problems(fake, "a lone §3", code=True)) == 1
    page = ROOT / "docs" / "page.md"
    assert problems(page, "[spec.md §7d](spec.md#7d) and this page's §2", code=False) == []
    assert len(problems(page, "as spec §7 says", code=False)) == 1
