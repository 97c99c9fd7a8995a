"""The docs stay a short README plus pages that are current and link to files that exist."""

from __future__ import annotations

import re
from pathlib import Path

from common import config_docs

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCED = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|//|#)")


def relative_links(text: str) -> list[str]:
    """Targets of the Markdown links and images in text that point into the repository (code left out)."""
    prose = CODE_SPAN.sub("", FENCED.sub("", text))
    return [target for target in LINK.findall(prose) if not EXTERNAL.match(target)]


HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    slugs = set()
    for title in HEADING.findall(FENCED.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


def test_configuration_page_is_generated_from_the_schema():
    page = config_docs.PAGE
    assert page.exists(), f"docs/configuration.md is missing: run {config_docs.COMMAND}"
    assert page.read_text() == config_docs.render(), (
        f"docs/configuration.md is stale (the schema in common/config/ changed): run {config_docs.COMMAND}"
    )


def test_every_option_is_on_the_configuration_page():
    page = config_docs.render()
    missing = [key for key, *_ in config_docs.config.describe_options() if f"`{key}`" not in page]
    assert not missing, f"options not on the page: {missing}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail into docs/"
    )


def test_relative_links_point_to_existing_files():
    broken = []
    for page in PAGES:
        for target in relative_links(page.read_text()):
            path, _, fragment = target.split("?", 1)[0].partition("#")
            linked = (page.parent / path) if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "links to files or headings that do not exist:\n" + "\n".join(broken)


def test_headings_become_github_anchors():
    text = (
        "# Does joining pay? The strategy comparison\n## What `fedseg-client check` reports\n"
        "```\n# not a heading\n```\n"
    )
    assert anchors(text) == {"does-joining-pay-the-strategy-comparison", "what-fedseg-client-check-reports"}


def test_the_link_check_sees_links_and_skips_code():
    text = '[a](docs/x.md) ![p](img/p.png "t") [w](https://x.org) [s](#top)\n`[c](no.md)`\n```\n[d](no.md)\n```\n'
    assert relative_links(text) == ["docs/x.md", "img/p.png"]
