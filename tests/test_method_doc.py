"""Every citation of the method document resolves: ``docs/method.md §N`` names a section that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"docs/method\.md §(\d+)")
SECTIONS = [f"§{n} " for n in range(1, 8)]


def cited_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "configs").glob("*.yaml"))]
    for folder in ("src", "tests", "benchmarks"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml") and p.is_file())
    return files


def test_method_doc_has_the_numbered_sections():
    headings = [line[3:] for line in (ROOT / "docs" / "method.md").read_text().splitlines() if line.startswith("## ")]
    assert [h[: len(s)] for h, s in zip(headings, SECTIONS)] == SECTIONS


def test_every_citation_names_an_existing_section():
    headings = {
        int(m.group(1))
        for m in re.finditer(r"^## §(\d+) ", (ROOT / "docs" / "method.md").read_text(), flags=re.MULTILINE)
    }
    cited: dict[int, list[str]] = {}
    stale = []
    for path in cited_files():
        text = path.read_text(encoding="utf-8")
        for number in CITED.findall(text):
            cited.setdefault(int(number), []).append(str(path.relative_to(ROOT)))
        if "METHOD §" in text and path != Path(__file__).resolve():  # this file names the form it forbids
            stale.append(str(path.relative_to(ROOT)))
    assert cited, "no docs/method.md citation found: the scan is looking in the wrong place"
    missing = {n: files for n, files in cited.items() if n not in headings}
    assert not missing, f"citations of sections that docs/method.md lacks: {missing}"
    assert not stale, f"'METHOD §N' cites a document outside the repository; use docs/method.md §N in: {stale}"
