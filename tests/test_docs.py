"""The README and docs/ stay true as the project grows: every relative link reaches a file and,
where it names one, a heading; the README opens with the two set-up commands, and CI runs the
second one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading (GitHub's rule)."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def without_fences(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1))
            for m in re.finditer(r"^#+ (.+)$", without_fences(page.read_text()), flags=re.M)}


def relative_links(page: Path) -> list[str]:
    prose = re.sub(r"`[^`\n]*`", "", without_fences(page.read_text()))
    return [t for t in LINK.findall(prose) if not re.match(r"[a-z]+:", t)]


def test_slug_follows_the_renderers_rule():
    assert slug("CPU defaults, and why") == "cpu-defaults-and-why"
    assert slug("The cache at run time (`QuantizedKVCache`)") == \
        "the-cache-at-run-time-quantizedkvcache"
    assert slug("Weight+activation mode (W4A4..W8A8)") == "weightactivation-mode-w4a4w8a8"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_reaches_a_file_and_heading(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '{anchor}' in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    lines = (ROOT / "README.md").read_text().splitlines()
    fence = lines.index("```bash")
    run, test = lines[fence + 1], lines[fence + 2]
    assert lines[fence + 3] == "```"
    assert run.endswith("quept quantize") and "torch==2.13.0" in run
    assert test.endswith("python3 -m pytest -q") and "torch==2.13.0" in test
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()


API_EXTRAS = ("export", "load_packed", "save_compact", "load_compact", "plan_candidates")
"""Public functions of quept.api that the package does not re-export (docs/api.md)."""


def call_form(name: str, fn) -> str:
    """``name(a, b=1, *, c=None)``: the call a reader writes, arguments and defaults only."""
    import inspect

    parts, star = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.kind == p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return f"{name}({', '.join(parts)})"


def test_the_api_page_lists_every_public_function_with_its_arguments():
    import inspect

    import quept
    from quept import api

    page = (ROOT / "docs" / "api.md").read_text()
    headings = set(re.findall(r"^### `(.+)`$", page, flags=re.M))
    expected = {call_form(f"quept.{n}", getattr(quept, n)) for n in quept.__all__
                if inspect.isfunction(getattr(quept, n))}
    expected |= {call_form(f"quept.api.{n}", getattr(api, n)) for n in API_EXTRAS}
    assert not expected - headings, f"docs/api.md lacks or misstates {sorted(expected - headings)}"
    assert not headings - expected, f"docs/api.md names what is not there: {headings - expected}"
    unnamed = [n for n in quept.__all__ if not inspect.isfunction(getattr(quept, n))
               and f"`quept.{n}`" not in page]
    assert not unnamed, f"docs/api.md does not name {unnamed}"
