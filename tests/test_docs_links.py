"""README.md and docs/*.md: every link resolves inside the repository (the file exists, and a ``#fragment`` names a
heading of the linked Markdown file, by GitHub's heading slugs; nothing points outside the clone), and every code
fence closes."""

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


def unbalanced_fences(text: str) -> list[int]:
    """Line numbers where a code fence is wrong: one with a language tag while a block is open (it would show as
    text, and everything up to the next fence as code), or a block left open at the end."""
    wrong, open_at = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("```"):
            continue
        if open_at is None:
            open_at = number
        elif line.strip() == "```":
            open_at = None
        else:
            wrong.append(number)
    return wrong + ([open_at] if open_at is not None else [])


def test_unbalanced_fences_are_found():
    assert unbalanced_fences("```bash\nx\n```python\ny\n```\n") == [3]
    assert unbalanced_fences("```\nx\n```\n```python\ny\n") == [4]
    assert unbalanced_fences("```bash\nx\n```\n\n```python\ny\n```\n") == []


def test_every_code_fence_closes():
    assert {
        str(p.relative_to(REPO)): unbalanced_fences(p.read_text()) for p in DOCS if unbalanced_fences(p.read_text())
    } == {}
