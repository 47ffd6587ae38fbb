"""Every link in README.md and docs/*.md resolves inside the repository: the file exists, and a ``#fragment`` names a
heading of the linked Markdown file (GitHub's heading slugs); nothing points outside the clone."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"```.*?```", re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces as ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {heading_slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.M)}


def broken_links(path: Path) -> list[str]:
    """The links of ``path`` that do not resolve (web addresses are not checked)."""
    broken = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, fragment = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists() or REPO not in (resolved, *resolved.parents):
            broken.append(f"{target} (no such file in the repository)")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target} (no such heading)")
    return broken


def test_heading_slug():
    assert heading_slug("7. Equivalences the tests pin (float64, random weights, one tolerance)") == (
        "7-equivalences-the-tests-pin-float64-random-weights-one-tolerance"
    )


def test_a_missing_file_and_a_missing_heading_are_reported(tmp_path):
    page = REPO / "docs" / "design.md"
    probe = tmp_path / "probe.md"
    probe.write_text(f"[a]({page}#no-such-heading) [b](missing.md) [c](https://example.org/x)\n")
    assert len(broken_links(probe)) == 2


def test_every_link_resolves():
    assert {str(p.relative_to(REPO)): broken_links(p) for p in DOCS if broken_links(p)} == {}
