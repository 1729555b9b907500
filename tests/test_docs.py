"""The user documents: BENCHMARKS.md stays a reference, no document names the project's issues, every link and
repository path they (and the package's help texts and scripts) name exists, and docs/ holds pages, not inputs."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: What a user reads: the README, the benchmarks, the contributor guide and the pages under docs/.
USER_DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
#: "issue 45", "issues 37", "#72"; not a markdown anchor "(#1-...)", an HTML entity or a heading's "##".
ISSUE_NUMBER = re.compile(r"\b[Ii]ssues? #?\d+|(?<![\w&/#])#\d+(?![\w-])")
#: A path inside the repository, as the documents and help texts write it.
REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|dit_accel|tests)/[\w./-]*\w)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_benchmarks_is_a_reference_of_at_most_800_lines():
    lines = (REPO / "BENCHMARKS.md").read_text().splitlines()
    assert len(lines) <= 800, f"BENCHMARKS.md has {len(lines)} lines; keep the current figures, git keeps the rest"
    assert lines[0] == "# Benchmarks" and "## Summary" in lines[:12], "the summary table comes first"


def test_the_user_documents_name_no_issue_numbers():
    found = [f"{path.relative_to(REPO)}:{i}: {m.group(0)!r}" for path in USER_DOCS
             for i, line in enumerate(path.read_text().splitlines(), 1) for m in ISSUE_NUMBER.finditer(line)]
    assert not found, "issue numbers in user documents:\n" + "\n".join(found)


def test_the_pattern_finds_issue_numbers_and_nothing_else():
    assert ISSUE_NUMBER.search("as issue 45 asks") and ISSUE_NUMBER.search("Issues 37 and 45")
    assert ISSUE_NUMBER.search("fixed in #72.") and ISSUE_NUMBER.search("(#72)")
    for clean in ("[1](#1-block-sparse-attention)", "## 8. The models", "&#8212;", "a call makes 4 launches"):
        assert not ISSUE_NUMBER.search(clean), clean


def test_the_benchmarks_links_resolve():
    text = (REPO / "BENCHMARKS.md").read_text()
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("#"):
            assert target[1:] in anchors, f"BENCHMARKS.md links to a missing section {target}"
        elif "://" not in target:
            assert (REPO / target.split("#")[0]).exists(), f"BENCHMARKS.md links to a missing file {target}"


def test_every_repository_path_the_docs_and_help_texts_name_exists():
    """A file moved (docs/ inputs into docs/scripts/, say) is found by every command that names it."""
    sources = [*USER_DOCS, *sorted((REPO / "dit_accel").rglob("*.py")),
               *sorted(p for p in (REPO / "docs" / "scripts").iterdir() if p.is_file())]
    missing = sorted({f"{src.relative_to(REPO)}: {m.group(1)}" for src in sources
                      for m in REPO_PATH.finditer(src.read_text()) if not (REPO / m.group(1)).exists()})
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


def test_docs_holds_pages_and_the_scripts_hold_their_inputs():
    loose = sorted(p.name for p in (REPO / "docs").iterdir() if p.is_file() and p.suffix != ".md")
    assert not loose, f"inputs of scripts belong in docs/scripts/, beside the scripts that read them: {loose}"


def test_the_readme_counts_the_supported_classes():
    """The README's count of transformer classes is the presets' (a family added updates it, or this fails)."""
    from dit_accel.pipelines.presets import SUPPORTED

    text = (REPO / "README.md").read_text()
    counts = re.findall(r"(\d+) transformer classes", text)
    assert counts and set(counts) == {str(len(SUPPORTED))}, (counts, len(SUPPORTED))
