"""The playground page in a real browser (Debian's headless chromium, driven by Playwright) against a real
`fewstep serve` on the shipped models: every panel used as a person would, with auth off and on.

Each panel's screenshot is written to `FEWSTEP_SCREENSHOTS` when set (`make screenshots` sets it to
`docs/img/`, which docs/api.md shows), else to a temporary folder: a test run rewrites no tracked file.
Waits are on page state (what is drawn, what the page says), with generous limits: no timing is asserted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Route, expect, sync_playwright

from fewstep.errors import Overloaded
from fewstep.models.importing import import_pipeline
from fewstep.models.registry import Registry
from fewstep.models.sampling import Handoff
from fewstep.service.errors import error_response
from tests.conftest import CHECKPOINTS, Server, start_server, stop_server

pytestmark = pytest.mark.slow
WAIT_MS = 90_000
# The shipped pair's hand-off: 2 evaluations (CFG) per teacher step.
HYBRID_TEACHER_NFE = (
    2 * Handoff.from_manifest(json.loads((CHECKPOINTS / "shapes" / "manifest.json").read_text())).teacher_steps
)
expect.set_options(timeout=WAIT_MS)  # its default, 5 s, is short for a model call on 2 loaded cores
SHOTS = Path(os.environ.get("FEWSTEP_SCREENSHOTS") or tempfile.mkdtemp(prefix="fewstep-screenshots-"))
KEY = "playground-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    exe = os.environ.get("FEWSTEP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(exe).is_file(), "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, tiny_pipelines: dict[str, Path]) -> Iterator[Server]:
    """A server with API keys that also serves an imported pipeline taking sizes, CFG and negative prompts
    (a tiny SD pipeline as an LCM-LoRA-merged student) besides the shipped models."""
    tmp = tmp_path_factory.mktemp("secured")
    import_pipeline(tiny_pipelines["sd"], "tiny-lcm", Registry(tmp / "registry"), family="lcm")
    env = {"FEWSTEP_API_KEYS": KEY, "FEWSTEP_IMAGE_MIN_SIDE": "32", "FEWSTEP_IMAGE_MAX_SIDE": "128"}
    s = start_server(tmp, env)
    yield s
    stop_server(s)


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    with opened(browser, server.url) as pg:
        yield pg


@contextmanager
def opened(browser: Browser, url: str, width: int = 1100, height: int = 820) -> Iterator[Page]:
    """The page at `url` in a fresh browser context; fails if the page threw or logged an error."""
    context = browser.new_context(viewport={"width": width, "height": height})
    pg = context.new_page()
    problems: list[str] = []

    def console(m: ConsoleMessage) -> None:
        # Failed API calls are logged by the browser too; the page shows those itself (tested below).
        if m.type == "error" and "Failed to load resource" not in m.text:
            problems.append(m.text)

    pg.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
    pg.on("console", console)
    pg.set_default_timeout(WAIT_MS)
    pg.goto(url + "/")
    yield pg
    context.close()
    assert not problems, problems


def _ready(pg: Page) -> None:
    pg.wait_for_selector("body[data-ready=true]")


def _field(pg: Page, panel: str, field: str) -> str:
    return pg.inner_text(f"#{panel}-meta dd[data-field={field}]")


def _shot(pg: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / f"playground-{name}.png"), full_page=True)


def _set_steps(pg: Page, panel: str, steps: int) -> None:
    """Move the steps slider with the keyboard (Home, then one ArrowRight per step after the first)."""
    slider = pg.locator(f"#{panel}-steps")
    slider.focus()
    pg.keyboard.press("Home")
    for _ in range(steps - 1):
        pg.keyboard.press("ArrowRight")
    expect(pg.locator(f"#{panel}-steps-out")).to_have_text(str(steps))


def test_an_image_appears_and_its_nfe_follows_the_steps(page: Page) -> None:
    _ready(page)
    page.fill("#image-prompt", "a blue square on a black background")
    _set_steps(page, "image", 1)
    page.click("#image-go")
    expect(page.locator("#image-meta dd[data-field=nfe]")).to_have_text("1")
    first = page.get_attribute("#image-out", "src")
    assert first and first.startswith("data:image/png;base64,")
    assert _field(page, "image", "version").startswith("shapes v")

    _set_steps(page, "image", 3)
    page.focus("#image-prompt")
    page.keyboard.press("Enter")  # the form submits from the keyboard
    expect(page.locator("#image-meta dd[data-field=nfe]")).to_have_text("3")
    assert _field(page, "image", "steps") == "3"
    assert page.get_attribute("#image-out", "src") != first

    page.check("#image-hybrid")
    page.click("#image-go")
    expect(page.locator("#image-meta dd[data-field=hybrid]")).to_have_text("yes")
    # The teacher's steps (2 evaluations each, as the pair's hand-off says) on top of the student's other two.
    assert _field(page, "image", "nfe") == str(HYBRID_TEACHER_NFE + 2)
    _set_steps(page, "image", 2)
    page.uncheck("#image-hybrid")
    page.click("#image-go")
    expect(page.locator("#image-meta dd[data-field=nfe]")).to_have_text("2")
    _shot(page, "image")


def test_streamed_partial_images_arrive_before_the_final_one(page: Page) -> None:
    _ready(page)
    # Every value the alt takes, in order: each change's old value, then the last one. (Reading `img.alt` once
    # per observer callback would miss values: several changes can land before the callback runs, as they do
    # when a loaded machine delivers the partials in one burst.)
    page.evaluate(
        """() => { const img = document.querySelector('#image-out'); window.olds = [];
               new MutationObserver((records) => records.forEach((r) => window.olds.push(r.oldValue)))
                 .observe(img, { attributes: true, attributeFilter: ['alt'], attributeOldValue: true }); }"""
    )
    _set_steps(page, "image", 4)
    page.check("#image-partials")
    page.click("#image-go")
    expect(page.locator("#image-meta dd[data-field=partials]")).to_have_text("3")
    assert _field(page, "image", "nfe") == "4"
    shown = page.evaluate("window.olds.slice(1).concat([document.querySelector('#image-out').alt])")
    partial = [a for a in shown if ": partial image " in a]
    assert partial[:3] == [f"a red circle on a white background: partial image {i}" for i in (1, 2, 3)], shown
    assert shown[-1].endswith("4 steps)")  # the final image last


def test_the_seed_grid_shows_eight_different_images_for_student_and_hybrid(page: Page) -> None:
    _ready(page)
    page.focus("#tab-image")
    page.keyboard.press("ArrowRight")  # tabs move with the arrow keys
    expect(page.locator("#panel-seeds")).to_be_visible()
    _set_steps(page, "seeds", 2)
    page.fill("#seeds-base", "100")
    page.click("#seeds-go")
    for mode in ("student", "hybrid"):
        row = page.locator(f".seed-row[data-mode={mode}] img")
        expect(row).to_have_count(8)
        assert len({row.nth(i).get_attribute("src") for i in range(8)}) == 8  # 8 seeds, 8 different images
    captions = page.locator(".seed-row[data-mode=student] figcaption").all_inner_texts()
    assert captions == [f"seed {s}" for s in range(100, 108)]
    assert f"NFE {HYBRID_TEACHER_NFE + 1}" in page.inner_text(".seed-row[data-mode=hybrid] h2")
    _shot(page, "seeds")


def test_a_video_streams_into_the_canvas_and_takes_a_new_prompt(page: Page) -> None:
    _ready(page)
    page.click("#tab-video")
    frames, steered = 96, "a green triangle moving up slowly"
    page.fill("#video-frames", str(frames))
    page.fill("#steer-prompt", steered)
    page.click("#video-go")
    page.wait_for_selector("#video-canvas[data-state=streaming]:not([data-frames-drawn='0'])")
    page.click("#steer-go")
    page.wait_for_selector("#video-canvas[data-state=done]")
    assert page.get_attribute("#video-canvas", "data-frames-drawn") == str(frames)
    assert _field(page, "video", "frame") == f"{frames} / {frames}"
    assert _field(page, "video", "prompt") == steered  # the server's word on the prompt it ended with
    assert _field(page, "video", "ttff").endswith(" ms") and _field(page, "video", "fps") != "–"
    # the canvas holds a drawn frame, not the blank it started as
    painted = page.evaluate(
        "() => { const c = document.querySelector('#video-canvas');"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n / (d.length / 4); }"
    )
    assert painted == 1.0
    _shot(page, "video")


CAUSAL = "tiny-self-forcing"


@pytest.fixture(scope="module")
def causal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server streaming a user's causal video student: a tiny WanPipeline imported by `fewstep import` as a
    Self-Forcing student (64 × 64 frames, streams of at most 30 latent frames: 117 pixel frames, long enough on
    this machine for a person's prompt change to land mid-stream)."""
    from fewstep.models.importing import import_causal_video
    from tests import pipelines

    home = tmp_path_factory.mktemp("causal")
    src = pipelines.wan(tmp_path_factory.mktemp("wan") / "wan")
    import_causal_video(src, CAUSAL, Registry(home / "registry"), "self-forcing", size=(64, 64), max_frames=30,
                        max_tokens=32)  # fmt: skip
    env = {"FEWSTEP_VIDEO_GATE_STREAMS": "1", "FEWSTEP_VIDEO_GATE_FRAMES": "9"}
    s = start_server(home, env)
    yield s
    stop_server(s)


def test_an_imported_causal_student_streams_into_the_canvas_and_takes_a_new_prompt(
    browser: Browser, causal: Server
) -> None:
    with opened(browser, causal.url) as pg:
        _ready(pg)
        pg.click("#tab-video")
        pg.select_option("#video-model", CAUSAL)
        frames, steered = 117, "a boat on a lake at night"
        pg.fill("#video-frames", str(frames))
        pg.fill("#steer-prompt", steered)
        pg.click("#video-go")
        pg.wait_for_selector("#video-canvas[data-state=streaming]:not([data-frames-drawn='0'])")
        pg.click("#steer-go")
        pg.wait_for_selector("#video-canvas[data-state=done]")
        assert pg.get_attribute("#video-canvas", "data-frames-drawn") == str(frames)
        assert _field(pg, "video", "frame") == f"{frames} / {frames}"
        assert _field(pg, "video", "prompt") == steered  # the server took the new prompt mid-stream
        assert _field(pg, "video", "version") == f"{CAUSAL} v1"


def _video_model(server: Server) -> dict[str, Any]:
    cards = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
    return next(c for c in cards if c["id"] == "shapes-video")


def test_a_video_is_made_followed_to_completed_and_played_from_its_mp4(page: Page, server: Server) -> None:
    card = _video_model(server)
    width, height = (int(side) for side in card["size"].split("x"))
    seconds = 2
    frames = round(seconds * card["fps"])
    _ready(page)
    page.click("#tab-videos")
    expect(page.locator("#videos-model")).to_have_value("shapes-video")
    page.fill("#videos-seconds", str(seconds))
    expect(page.locator("#videos-frames")).to_have_text(f"{frames} frames at {card['fps']:g} fps")
    _set_steps(page, "videos", 2)
    page.click("#videos-go")
    expect(page.locator("#videos-cancel")).to_be_enabled()
    page.wait_for_selector("#videos-out[data-state=loaded]")  # the MP4's metadata, decoded by the browser
    media = page.evaluate(
        "() => { const v = document.querySelector('#videos-out');"
        " return { ready: v.readyState, width: v.videoWidth, height: v.videoHeight, duration: v.duration }; }"
    )
    assert media["ready"] >= 1 and (media["width"], media["height"]) == (width, height), media
    assert media["duration"] == pytest.approx(frames / card["fps"], abs=0.5 / card["fps"]), media
    status = page.locator("#videos-status")
    expect(status).to_have_attribute("data-status", "completed")
    assert page.get_attribute("#videos-status", "data-seen").split()[-1] == "completed"  # type: ignore[union-attr]
    expect(status).to_contain_text("completed, 100%")
    assert page.evaluate("() => document.querySelector('#videos-progress').value") == 100
    expect(page.locator("#videos-cancel")).to_be_disabled()
    assert page.get_attribute("#videos-out", "src").startswith("blob:")  # type: ignore[union-attr]
    expect(page.locator("#videos-recent button")).to_have_count(1)
    expect(page.locator("#videos-error")).to_be_hidden()
    _shot(page, "videos")


def test_a_refused_video_shows_the_servers_words_and_a_running_one_can_be_cancelled(page: Page, server: Server) -> None:
    card = _video_model(server)
    most = card["max_frames"] / card["fps"]
    _ready(page)
    page.click("#tab-videos")
    seconds = page.locator("#videos-seconds")
    expect(seconds).to_have_attribute("max", f"{most:g}")
    page.fill("#videos-seconds", str(int(most) * 2))
    assert seconds.evaluate("e => e.validity.rangeOverflow")  # the form itself holds the model's bound
    seconds.evaluate("e => e.removeAttribute('max')")  # as a page whose bound is stale would send it
    page.click("#videos-go")
    error = page.locator("#videos-error")
    expect(error).to_contain_text(f"`seconds` must be between {1 / card['fps']:g} and {most:g}")
    expect(page.locator("#videos-status")).to_have_text("No video yet.")

    page.fill("#videos-seconds", f"{most:g}")  # the longest clip: long enough to be cancelled while it runs
    page.click("#videos-go")
    expect(error).to_be_hidden()
    status = page.locator("#videos-status")
    expect(status).to_have_attribute("data-status", re.compile("queued|in_progress"))
    page.click("#videos-cancel")
    expect(status).to_have_attribute("data-status", "failed")
    expect(status).to_contain_text("cancelled")
    expect(page.locator("#videos-go")).to_be_enabled()
    expect(page.locator("#videos-out")).to_be_hidden()
    expect(error).to_be_hidden()  # a cancelled video is the viewer's doing, not an error


def test_a_job_shows_progress_and_results_and_can_be_cancelled(page: Page) -> None:
    _ready(page)
    page.click("#tab-jobs")
    page.fill("#jobs-prompts", "a red circle\na blue square\na yellow star")
    page.fill("#jobs-n", "2")
    page.click("#jobs-go")
    page.wait_for_selector("#jobs-status[data-ended=true]")
    expect(page.locator("#jobs-status")).to_have_attribute("data-status", "succeeded")
    expect(page.locator("#jobs-out figure")).to_have_count(6)
    progress = page.evaluate("() => { const p = document.querySelector('#jobs-progress'); return [p.value, p.max]; }")
    assert progress == [6, 6]
    _shot(page, "jobs")

    page.fill("#jobs-prompts", "\n".join(f"a white star {i}" for i in range(50)))
    page.fill("#jobs-n", "8")
    _set_steps(page, "jobs", 4)
    page.click("#jobs-go")
    expect(page.locator("#jobs-cancel")).to_be_enabled()
    page.click("#jobs-cancel")
    page.wait_for_selector("#jobs-status[data-ended=true]")  # the events stream's end, after the cancel
    expect(page.locator("#jobs-status")).to_have_attribute("data-status", "cancelled")
    text = page.inner_text("#jobs-status")
    assert re.search(r"[1-9]\d* cancelled", text), text
    done = int(re.search(r"(\d+) of 400 done", text).group(1))  # type: ignore[union-attr]
    expect(page.locator("#jobs-out figure")).to_have_count(done)  # every finished image is shown


def test_api_errors_are_shown_in_the_servers_words(page: Page) -> None:
    _ready(page)
    page.fill("#image-prompt", "x" * 501)
    page.click("#image-go")
    error = page.locator("#image-error")
    expect(error).to_be_visible()
    assert "500" in error.inner_text() and "prompt" in error.inner_text()

    # A 429 exactly as the gateway writes it (its own error handler), delivered for one request.
    busy = error_response(Overloaded("the interactive lane is full (256 items queued)", retry_after=7))

    def overloaded(route: Route) -> None:
        route.fulfill(status=busy.status_code, headers=dict(busy.headers), body=bytes(busy.body))

    page.route("**/v1/images/generations", overloaded)
    page.fill("#image-prompt", "a red circle")
    page.click("#image-go")
    expect(error).to_contain_text("the interactive lane is full")
    expect(error).to_contain_text("Retry in 7 s")
    page.unroute("**/v1/images/generations")
    page.click("#image-go")
    expect(error).to_be_hidden()
    expect(page.locator("#image-out")).to_be_visible()

    page.click("#tab-video")
    page.fill("#video-frames", "100000")  # over `video_max_frames`: refused by the server, over the socket
    page.click("#video-go")
    expect(page.locator("#video-error")).to_contain_text("4096")


def test_the_status_panel_lists_the_serving_versions(page: Page) -> None:
    _ready(page)
    page.click("#tab-status")
    for model in ("shapes", "shapes-video"):
        row = page.locator(f"#status-table tr[data-model='{model}']")
        expect(row).to_contain_text("serving")
        expect(row).to_contain_text("1, 2, 3, 4")
    _shot(page, "status")


def test_every_panel_fits_a_phone(browser: Browser, server: Server) -> None:
    with opened(browser, server.url, width=390, height=844) as pg:
        _ready(pg)
        for tab in ("image", "seeds", "video", "videos", "jobs", "status"):
            pg.click(f"#tab-{tab}")
            overflow = pg.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 0, f"{tab} panel is {overflow} px wider than a phone"
        pg.click("#tab-image")
        pg.click("#image-go")
        pg.wait_for_selector("#image-out:not([hidden])")
        _shot(pg, "phone")


def test_with_auth_on_the_key_goes_in_headers_and_first_messages_never_urls(browser: Browser, secured: Server) -> None:
    with opened(browser, secured.url) as pg:
        urls: list[str] = []
        pg.on("request", lambda r: urls.append(r.url))
        notice = pg.locator("#notice")
        expect(notice).to_contain_text("API key")  # 401 before a key is entered, in words
        pg.fill("#api-key", KEY)
        pg.press("#api-key", "Enter")
        expect(notice).to_be_hidden()
        expect(pg.locator("#image-model option")).to_have_count(2)
        pg.click("#image-go")
        expect(pg.locator("#image-meta dd[data-field=nfe]")).to_have_text("1")
        for control in ("#image-size", "#image-guidance", "#image-negative"):
            expect(pg.locator(control)).to_be_hidden()  # the shipped model takes none of them

        pg.select_option("#image-model", "tiny-lcm")  # an imported student: sizes, guidance, negative prompt
        expect(pg.locator("#image-guidance-range")).to_have_text("(1–2)")
        expect(pg.locator("#image-hybrid")).to_be_disabled()
        sizes = pg.locator("#image-size option").all_inner_texts()
        assert len(sizes) > 1 and all(re.fullmatch(r"\d+x\d+", x) for x in sizes), sizes
        pg.select_option("#image-size", sizes[-1])
        pg.fill("#image-guidance", "1.5")
        pg.fill("#image-negative", "blurry")
        pg.click("#image-go")
        expect(pg.locator("#image-meta dd[data-field=size]")).to_have_text(sizes[-1])
        assert _field(pg, "image", "version").startswith("tiny-lcm v")
        pg.fill("#image-guidance", "3")  # outside the family's range: the form itself refuses to send it
        assert pg.eval_on_selector("#image-guidance", "e => e.validity.rangeOverflow")

        pg.click("#tab-video")
        pg.fill("#video-frames", "8")
        pg.click("#video-go")
        pg.wait_for_selector("#video-canvas[data-state=done]")
        assert pg.get_attribute("#video-canvas", "data-frames-drawn") == "8"

        pg.click("#tab-jobs")
        pg.fill("#jobs-prompts", "a red circle")
        pg.click("#jobs-go")
        expect(pg.locator("#jobs-status")).to_have_attribute("data-status", "succeeded")
        expect(pg.locator("#jobs-out figure")).to_have_count(2)

        pg.click("#tab-videos")  # the MP4 is fetched with the header and played from a blob: URL
        pg.fill("#videos-seconds", "1")
        pg.click("#videos-go")
        pg.wait_for_selector("#videos-out[data-state=loaded]")
        assert any(u.endswith("/content") for u in urls)

        assert urls and not [u for u in urls if KEY in u]
        assert pg.evaluate("() => sessionStorage.length") == 0  # in memory only, until asked
        pg.check("#key-remember")
        assert pg.evaluate("() => JSON.stringify(Object.values(sessionStorage))") == json.dumps([KEY])
        pg.reload()
        _ready(pg)
        assert pg.input_value("#api-key") == KEY
        pg.fill("#api-key", "wrong-key-of-some-length-0000")
        pg.press("#api-key", "Enter")
        expect(notice).to_contain_text("invalid API key")
