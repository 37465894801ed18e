"""The documentation stands: README stays short, every relative link in README, SECURITY and docs/ resolves
(file and heading), and the settings page is the one the settings class makes."""

from __future__ import annotations

import re
from pathlib import Path

from fewstep.service.settings import configuration_markdown
from tests.conftest import ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").rglob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = FENCE.sub("", page.read_text())
    headings = re.findall(r"^#{1,6} (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_resolves_to_a_file_and_a_heading() -> None:
    broken = []
    for page in pages():
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # an absolute URL (the docs name none, but it would not be a file here)
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or not dest.is_relative_to(ROOT):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_checker_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A heading\n\n[here](#a-heading) [gone](#nowhere)\n")
    assert anchors(page) == {"a-heading"}
    assert [t for t in LINK.findall(page.read_text()) if t.partition("#")[2] not in anchors(page)] == ["#nowhere"]


def test_the_readme_is_read_in_five_minutes() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_the_configuration_page_is_the_one_the_settings_class_makes() -> None:
    """`make docs` writes it; a setting added or changed without it fails here."""
    assert (ROOT / "docs" / "configuration.md").read_text() == configuration_markdown()
