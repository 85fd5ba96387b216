"""Every citation of the method and design documents in the code resolves to a section or id that
exists in ``docs/`` (the repository is self-contained: what the code cites, it contains)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = (ROOT / "docs" / "method.md").read_text()
DESIGN = (ROOT / "docs" / "design.md").read_text()
SOURCES = [*ROOT.glob("mgm_fast/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/*.py"),
           ROOT / "README.md"]
CITE = re.compile(r"docs/method\.md[ ,]*(?:section )?((?:\d+(?:\.\d+)?|[BID]\d+)(?:(?:, | and |/)(?:\d+(?:\.\d+)?|[BID]\d+))*)")


def _sections() -> set[str]:
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", METHOD, flags=re.M))


def _ids() -> set[str]:
    return set(re.findall(r"\*\*([BID]\d+)\b", METHOD)) | set(re.findall(r"^[-*|] *`?([BID]\d+)\b", METHOD, re.M))


def test_every_method_citation_resolves():
    sections, ids = _sections(), _ids()
    assert {"1.4", "3.2", "7.3"} <= sections and {"B2", "I3"} <= ids  # the parser reads the document
    cited, missing = 0, []
    for path in SOURCES:
        text = path.read_text()
        for match in CITE.finditer(text):
            for ref in re.split(r", | and |/", match.group(1)):
                cited += 1
                known = ref in ids if ref[0] in "BID" else ref in sections
                if not known:
                    missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert cited >= 30
    assert not missing, f"citations of docs/method.md that do not resolve: {missing}"


def test_no_citation_points_outside_the_repository():
    pattern = re.compile("mgm_" + r"method|(?<!docs/)DESIGN\.md|shared/" + "reference")  # split: not a hit here
    stale = [f"{p.relative_to(ROOT)}" for p in SOURCES if pattern.search(p.read_text())]
    assert not stale, f"citations of documents that are not in the repository: {stale}"


def test_design_principles_cited_exist():
    principles = set(re.findall(r"^(\d+)\. \*\*", DESIGN, flags=re.M))
    for path in SOURCES:
        for n in re.findall(r"docs/design\.md principle (\d+)", path.read_text()):
            assert n in principles, f"{path.relative_to(ROOT)} cites docs/design.md principle {n}"
