"""The documentation's relative links and #anchors lead somewhere: README.md, experiments/README.md and docs/ link
into each other by heading anchors, which change whenever a results heading is retitled."""

from __future__ import annotations

import pathlib
import re
import unicodedata

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted(str(p.relative_to(ROOT)) for pattern in ("README.md", "experiments/README.md", "docs/*.md",
                                                      "benchmarks/results/*/README.md") for p in ROOT.glob(pattern))
LINK = re.compile(r"\]\(([^()\s]*(?:\([^()\s]*\)[^()\s]*)*)\)")  # [text](target), one level of () inside
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (html-pipeline's TableOfContentsFilter: lower case, every character that is
    not \\p{Word}, '-' or ' ' dropped, spaces turned into hyphens; \\p{Word} is letters, marks, decimal digits, '_')."""
    kept = "".join(c for c in heading.strip().lower()
                   if c in " -_" or unicodedata.category(c)[0] in "LM" or unicodedata.category(c) == "Nd")
    return kept.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's anchor in a Markdown text, repeated headings numbered as GitHub does (-1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", markdown).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(path: pathlib.Path) -> list[str]:
    """'target: why' for each relative link in a Markdown file whose file or heading anchor does not exist."""
    problems = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{target}: {file_part} does not exist")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            problems.append(f"{target}: no heading in {linked.name} has the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("heading, slug", [
    # worked by hand from the rule: '²' is not a decimal digit, '×' and '–' are not word characters
    ("Three ways to use nucjax", "three-ways-to-use-nucjax"),
    ("`maskrcnn` at the U-Nets' number of crops (seeds 0, 1 and 2, 2,400 steps, 2026-11-26)",
     "maskrcnn-at-the-u-nets-number-of-crops-seeds-0-1-and-2-2400-steps-2026-11-26"),
    ("Test-time augmentation (`predict.tta`)? Yes", "test-time-augmentation-predicttta-yes"),
    ("1. Train from the command line", "1-train-from-the-command-line"),
    ("What limits `maskrcnn` at strict IoU (the `cpu` budget's three runs)",
     "what-limits-maskrcnn-at-strict-iou-the-cpu-budgets-three-runs"),
    ("Crops: 128² × 8 – fast", "crops-128--8--fast"),
    ("snake_case stays", "snake_case-stays"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_repeated_headings_are_numbered():
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### A b\n") == {"a", "a-1", "a-b"}


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Results (seed 0)\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](other.md#results-seed-0) [self](#top) [gone](missing.md) [moved](other.md#results) "
                   "[web](https://example.org/#x)\n# Top\n```\n[in code](nowhere.md)\n```\n")
    assert broken_links(doc) == ["missing.md: missing.md does not exist",
                                 "other.md#results: no heading in other.md has the anchor #results"]


@pytest.mark.parametrize("name", DOCS)
def test_links_and_anchors_resolve(name):
    assert broken_links(ROOT / name) == []
