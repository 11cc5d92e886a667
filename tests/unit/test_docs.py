"""The repository explains itself: every document the code, the help and the docs cite is in
the repository, every invariant cited by number is in docs/architecture.md, and every section
cited by name is a heading of its page."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEXT_SUFFIXES = {".py", ".pyi", ".c", ".js", ".conf", ".yml", ".yaml", ".md", ".toml", ".ini",
                 ".sh", ".cfg", ""}


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    return [REPO / name for name in listed
            if Path(name).suffix in TEXT_SUFFIXES and (REPO / name).is_file()
            and not name.startswith(("build/", ".tox/"))]


FILES = tracked_text_files()


def occurrences(pattern: str) -> list[tuple[str, str]]:
    found = []
    for path in FILES:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for match in re.finditer(pattern, text):
            found.append((str(path.relative_to(REPO)), match.group(0)))
    return found


def test_no_document_outside_the_repository_is_cited():
    outside = occurrences(r"\b(?:DESIGN|FINDINGS|CONTEST|STYLE)\.md\b")
    assert outside == []


def test_every_cited_page_of_docs_exists():
    cited = occurrences(r"docs/[\w.-]+\.md")
    assert cited
    missing = [(where, page) for where, page in cited if not (REPO / page).exists()]
    assert missing == []


def invariants() -> set[int]:
    text = (REPO / "docs/architecture.md").read_text()
    section = text.split("## Invariants", 1)[1].split("\n## ", 1)[0]
    return {int(n) for n in re.findall(r"^(\d+)\. \*\*", section, re.MULTILINE)}


def test_every_invariant_cited_by_number_is_written_down():
    numbered = invariants()
    assert numbered == set(range(1, len(numbered) + 1))
    cited = occurrences(r"[Ii]nvariants? (\d+)")
    assert cited
    unknown = [(where, text) for where, text in cited
               if int(re.search(r"\d+", text).group(0)) not in numbered]
    assert unknown == []


def headings(page: str) -> list[str]:
    return [line.lstrip("#").strip().lower()
            for line in (REPO / page).read_text().splitlines() if line.startswith("#")]


def test_every_section_cited_by_name_is_a_heading_of_its_page():
    cited = occurrences(r'docs/[\w.-]+\.md,\s+(?:#\s*)?"[^"]+"')
    assert cited
    for where, text in cited:
        page = re.match(r"docs/[\w.-]+\.md", text).group(0)
        section = re.search(r'"([^"]+)"', text).group(1).lower()
        section = " ".join(section.replace("//", " ").replace("#", " ").split())
        assert any(section in heading for heading in headings(page)), (where, text)


@pytest.mark.parametrize("page", sorted(p.name for p in (REPO / "docs").glob("*.md")))
def test_paths_a_doc_names_exist(page):
    text = (REPO / "docs" / page).read_text()
    named = re.findall(r"`((?:rinha|rinha_lab|native_ledger|benchmarks|tests|scripts)/[\w./-]+)`",
                       text)
    missing = [path for path in named if not (REPO / path).exists()]
    assert missing == []
