"""The playground page's files and route, in process: what is served, with which headers, and that the
page references only what exists (the browser tests in `test_playground_browser.py` use it for real)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path

import httpx
import pytest

from fewstep.service.routes.playground import FILES
from tests.service.gateway import in_process, settings

pytestmark = pytest.mark.anyio
STATIC = files("fewstep.service").joinpath("static")


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def client(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with in_process(settings(tmp_path_factory.mktemp("page"), api_keys="k" * 24)) as c:
        yield c


class Page(HTMLParser):
    """The ids, labels, controls and references of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.label_for: set[str] = set()
        self.controls: list[str] = []
        self.wrapped: set[str] = set()
        self.refs: list[tuple[str, str]] = []
        self.urls: list[str] = []
        self._labels = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "label":
            self._labels += 1
            if "for" in a:
                self.label_for.add(a["for"])
        if tag in ("input", "select", "textarea", "canvas", "progress"):
            self.controls.append(a.get("id", f"<{tag} without id>"))
            if self._labels:
                self.wrapped.add(a.get("id", ""))
            if "aria-label" in a:
                self.wrapped.add(a.get("id", ""))
        for attr in ("aria-controls", "aria-labelledby", "for"):
            if attr in a:
                self.refs.append((attr, a[attr]))
        for attr in ("src", "href"):
            if attr in a:
                self.urls.append(a[attr])

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self._labels -= 1


def _page() -> Page:
    page = Page()
    page.feed(STATIC.joinpath("index.html").read_text())
    return page


async def test_the_page_and_its_files_are_served_with_a_same_origin_policy(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert "media-src blob:;" in csp  # the videos' MP4s, fetched with the key, play from blob: URLs only
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, media in FILES.items():
        r = await client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media
        assert r.content == STATIC.joinpath(name).read_bytes()
    assert (await client.head("/")).status_code == 200


async def test_the_page_needs_no_key_but_the_api_still_does(client: httpx.AsyncClient) -> None:
    assert (await client.get("/")).status_code == 200
    assert (await client.get("/v1/models")).status_code == 401


@pytest.mark.parametrize("name", ["index.html", "../settings.py", "..%2Fsettings.py", "missing.js"])
async def test_only_the_listed_static_files_are_served(client: httpx.AsyncClient, name: str) -> None:
    r = await client.get(f"/static/{name}")
    assert r.status_code == 404


async def test_the_page_can_be_turned_off(tmp_path: Path) -> None:
    async with in_process(settings(tmp_path, playground=False)) as c:
        r = await c.get("/")
        assert r.status_code == 404 and "FEWSTEP_PLAYGROUND" in r.json()["error"]["message"]
        assert (await c.get("/static/playground.js")).status_code == 404


def test_every_control_has_a_label_and_every_reference_exists() -> None:
    page = _page()
    unlabelled = [c for c in page.controls if c not in page.label_for and c not in page.wrapped]
    assert not unlabelled, f"controls without a label: {unlabelled}"
    dangling = [(attr, ref) for attr, ref in page.refs if ref not in page.ids]
    assert not dangling, f"references to missing ids: {dangling}"


def test_the_script_uses_only_ids_the_page_has() -> None:
    page = _page()
    script = STATIC.joinpath("playground.js").read_text()
    used = set(re.findall(r'\$\("([\w-]+)"\)', script))
    for template in re.findall(r"\$\(`\$\{\w+\}-([\w-]+)`\)", script):  # `${prefix}-steps` and the like
        panels = ("image", "seeds", "video", "videos", "jobs")
        used |= {f"{p}-{template}" for p in panels if f"{p}-{template}" in page.ids}
        assert any(i.endswith(f"-{template}") for i in page.ids), template
    missing = sorted(used - page.ids)
    assert not missing, f"the script looks up ids the page lacks: {missing}"


def test_nothing_is_fetched_from_outside_the_server() -> None:
    page = _page()
    assert page.urls and all(not re.match(r"^(?:[a-z]+:)?//", u) for u in page.urls), page.urls
    for name in FILES:
        text = STATIC.joinpath(name).read_text()
        assert not re.search(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}", text), name
        assert "@import" not in text and "localStorage" not in text  # the key stays in memory or sessionStorage
