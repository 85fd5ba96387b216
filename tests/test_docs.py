"""Every citation of the method and design documents in the code resolves to a section or id that
exists in ``docs/`` (the repository is self-contained: what the code cites, it contains), and the
user documentation (README.md, docs/*.md, benchmarks/README.md) names only files that exist:
every relative link, anchor and backticked repository path."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = (ROOT / "docs" / "method.md").read_text()
DESIGN = (ROOT / "docs" / "design.md").read_text()
DOCS = [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md")), ROOT / "benchmarks" / "README.md"]
SOURCES = [*ROOT.glob("mgm_fast/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/*.py"), *DOCS]
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


# ---------------------------------------------------------------------------------------------
# links and paths in the documentation

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# backticked tokens that start with one of these are paths from the repository root
REPO_ROOTS = ("mgm_fast/", "csrc/", "tests/", "benchmarks/", "docs/", "requirements/", ".ci/")


def _prose(path: Path) -> str:
    """The document without its fenced code blocks (commands and sample output, not references),
    blanked rather than removed so that offsets still give the right line."""
    return FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), path.read_text())


def _where(path: Path, text: str, offset: int) -> str:
    return f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, offset) + 1}"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 ...
    for repeats."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", _prose(path), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _repo_path_exists(token: str) -> bool:
    """A path from the repository root; ``*`` and ``<placeholder>`` parts match any name."""
    pattern = re.sub(r"<[^>/]+>", "*", token).rstrip("/")
    if "*" in pattern:
        return any(ROOT.glob(pattern))
    return (ROOT / pattern).exists()


def test_documentation_pages_are_checked():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "docs/method.md", "docs/design.md", "docs/ops.md", "docs/performance.md"} <= names
    assert all(p.is_file() for p in DOCS)


def test_every_relative_link_resolves():
    """Links to files and folders of the repository exist; an anchor names a heading of its page."""
    broken, checked = [], 0
    for doc in DOCS:
        text = _prose(doc)
        for match in LINK.finditer(text):
            target = match.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto: ...
            checked += 1
            file_part, _, anchor = target.partition("#")
            page = (doc.parent / file_part).resolve() if file_part else doc
            if not page.exists() or ROOT not in (page, *page.parents):
                broken.append(f"{_where(doc, text, match.start())}: link to {target!r}: no such file in the repository")
            elif anchor and page.suffix == ".md" and anchor not in _anchors(page):
                broken.append(f"{_where(doc, text, match.start())}: link to {target!r}: "
                              f"{page.relative_to(ROOT)} has no heading with anchor #{anchor}")
    assert checked >= 30  # the pattern finds the links
    assert not broken, "broken links in the documentation:\n" + "\n".join(broken)


def test_every_backticked_repository_path_exists():
    """`mgm_fast/...`, `csrc/...`, `tests/...` and the like, alone or inside a command, name files
    or folders that exist (``*`` and ``<name>`` match any name)."""
    missing, checked = [], 0
    for doc in DOCS:
        text = _prose(doc)
        for span in CODE_SPAN.finditer(text):
            for token in span.group(1).split():
                token = token.split("::")[0].rstrip(".,;:)")
                if not token.startswith(REPO_ROOTS):
                    continue
                checked += 1
                if not _repo_path_exists(token):
                    missing.append(f"{_where(doc, text, span.start())}: `{token}` does not exist")
    assert checked >= 100  # the pattern finds the paths
    assert not missing, "paths named in the documentation that are not in the repository:\n" + "\n".join(missing)
