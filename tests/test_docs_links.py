"""Links in the README, BENCHMARKS.md and docs/*.md resolve, and the README stays a front page.

Every relative link (``[text](path)``, ``![alt](image.png)``, ``[text](page.md#heading)``,
``[text](#heading)``) must name a file or folder that exists, and every ``#anchor`` must be the
GitHub slug of a heading in the page it points into. Links to the web are not followed.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_BYTES = 8500

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # https:, mailto:, ...


def doc_pages() -> list:
    """The pages checked: README.md, BENCHMARKS.md and every docs/*.md."""
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose_lines(text: str):
    """(line number, line) outside fenced and indented code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced or line.startswith("    ") or line.startswith("\t"):
            continue
        yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, formatting and punctuation dropped,
    lower case, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set:
    """Every heading's slug in a page, duplicates numbered as GitHub numbers them (-1, -2)."""
    seen: dict = {}
    out = set()
    for _, line in _prose_lines(text):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(text: str):
    """(line number, target) of every link and image in a page's prose."""
    for number, line in _prose_lines(text):
        reference = _REFERENCE.match(line)
        if reference:
            yield number, reference.group(1)
            continue
        for match in _LINK.finditer(_INLINE_CODE.sub("", line)):
            yield number, match.group(1)


def check_links(text: str, page: Path) -> list:
    """The broken relative links of ``text`` (the contents of ``page``), one message each."""
    problems = []
    for number, target in links(text):
        if _EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        where = f"{page.name}:{number}: {target!r}"
        target_path = (page.parent / path_part).resolve() if path_part else page
        if path_part and not target_path.exists():
            problems.append(f"{where}: no file {path_part!r} (looked for {target_path})")
            continue
        if not anchor:
            continue
        if target_path.suffix != ".md":
            problems.append(f"{where}: anchor into {target_path.name}, expected a .md page")
            continue
        page_text = text if target_path == page else target_path.read_text(encoding="utf-8")
        if anchor not in anchors(page_text):
            problems.append(f"{where}: no heading with slug {anchor!r} in {target_path.name}")
    return problems


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    problems = check_links(page.read_text(encoding="utf-8"), page)

    assert problems == [], "\n".join(problems)


def test_every_docs_page_is_reachable_from_the_readme():
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        for _, target in links(page.read_text(encoding="utf-8")):
            path_part = target.partition("#")[0]
            path = (page.parent / path_part).resolve() if path_part and not _EXTERNAL.match(target) else None
            if path is not None and path.suffix == ".md" and path.is_file():
                todo.append(path)

    unreached = [str(p.relative_to(ROOT)) for p in doc_pages() if p not in reached]
    assert unreached == []


def test_readme_is_a_front_page():
    size = (ROOT / "README.md").stat().st_size

    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, expected at most {README_MAX_BYTES}"


def test_slug_matches_github():
    assert slug("Step, `--quick` (tiny Llama: B=2)") == "step---quick-tiny-llama-b2"
    assert slug("One layer: 4096 tokens, 1024 → 2752, r = 64, fp32") == "one-layer-4096-tokens-1024--2752-r--64-fp32"
    assert slug("Numerics: bf16 on [real text](x.md)") == "numerics-bf16-on-real-text"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1", "a-2"}


def test_checker_reports_bad_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Known heading\n")
    (tmp_path / "figure.png").write_bytes(b"")
    page = tmp_path / "page.md"
    text = "\n".join([
        "# Page",
        "[good](other.md#known-heading) ![img](figure.png) [self](#page) [web](https://example.com/x.md#y)",
        "[missing file](nowhere.md)",
        "[missing anchor](other.md#unknown-heading)",
        "![missing image](missing.png)",
        "[missing self anchor](#nope)",
        "`[in code](ignored.md)`",
        "```",
        "[in a fence](ignored.md)",
        "```",
    ])

    problems = check_links(text, page)

    assert len(problems) == 4, problems
    assert "no file 'nowhere.md'" in problems[0]
    assert "no heading with slug 'unknown-heading' in other.md" in problems[1]
    assert "no file 'missing.png'" in problems[2]
    assert "no heading with slug 'nope' in page.md" in problems[3]
