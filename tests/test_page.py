"""The page at / in a real browser: Debian's chromium driven by Playwright (never
`playwright install`: scripts/setup.sh installs the chromium package). A photo from the shared
set goes through the page and the pixels it shows are /enhance's own; a slider sends a new
request with its value; the factor map shows with its legend; a text file gets the 415 in
words; with SGZ_API_KEY set the page asks for the key and then works. No CSP violations.

SGZ_PAGE_SCREENSHOT=docs/page.png makes the first test save the screenshot the docs show.
"""

import base64
import io
import os

import httpx
import numpy as np
import pytest
from PIL import Image
from sgz_server import BROWSER, Server, photo

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium: apt-get install chromium")
KEY = "k3y-for-the-page"
PNG = {"content-type": "image/png"}
# the page's factor colours (page.js RAMP)
RAMP_X = [-1, -0.5, 0, 0.5, 1]
RAMP_RGB = [(103, 0, 31), (214, 96, 77), (247, 247, 247), (67, 147, 195), (5, 48, 97)]
OPTIONS = {"strength": "1", "denoise": "1", "exposure": "auto"}  # the page's defaults


@pytest.fixture(scope="module")
def server():
    with Server() as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    pg.csp_errors = []
    pg.on("console", lambda m: "Content Security Policy" in m.text and pg.csp_errors.append(m.text))
    yield pg
    context.close()
    assert not pg.csp_errors, pg.csp_errors


def canvas_pixels(page, selector: str) -> np.ndarray:
    url = page.eval_on_selector(selector, "c => c.toDataURL('image/png')")
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def open_with_photo(page, url: str, path) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready]", state="attached")
    page.set_input_files("#file", str(path))


def wait_done(page) -> None:
    page.wait_for_selector("#viewer[data-state=done]", state="attached")


def test_the_page_shows_enhance_s_own_pixels_and_re_enhances_on_a_slider(server, page):
    source = photo((512, 512))
    open_with_photo(page, server.url, source)
    wait_done(page)
    expected = httpx.post(
        f"{server.url}/enhance",
        params=OPTIONS,
        content=source.read_bytes(),
        headers=PNG,
        timeout=60,
    )
    assert expected.status_code == 200
    want = np.asarray(Image.open(io.BytesIO(expected.content)).convert("RGB"))
    assert np.array_equal(canvas_pixels(page, "#after"), want)
    before = np.asarray(Image.open(source).convert("RGB"))
    assert np.array_equal(canvas_pixels(page, "#before"), before)
    assert page.text_content("#info-size") == "512 × 512 px"
    assert "inference" in page.text_content("#info-timing")
    if os.environ.get("SGZ_PAGE_SCREENSHOT"):
        page.check("#show-factor")
        page.wait_for_selector("#viewer[data-factor=shown]", state="attached")
        page.fill("#factor-opacity", "0.45")
        page.dispatch_event("#factor-opacity", "input")
        page.set_viewport_size({"width": 760, "height": 1275})
        page.eval_on_selector(
            "#split", "s => { s.value = 40; s.dispatchEvent(new Event('input')); }"
        )
        page.screenshot(path=os.environ["SGZ_PAGE_SCREENSHOT"], full_page=False)
        page.uncheck("#show-factor")

    # the keyboard moves the strength slider; a new request goes out with its value
    page.focus("#strength")
    with page.expect_request(lambda r: "/enhance?" in r.url and "strength=0.9&" in r.url) as req:
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("ArrowLeft")
    assert req.value.method == "POST"
    assert page.text_content("#strength-out") == "0.9"
    wait_done(page)
    weaker = httpx.post(
        f"{server.url}/enhance",
        params={**OPTIONS, "strength": "0.9"},
        content=source.read_bytes(),
        headers=PNG,
        timeout=60,
    )
    assert np.array_equal(
        canvas_pixels(page, "#after"),
        np.asarray(Image.open(io.BytesIO(weaker.content)).convert("RGB")),
    )


def test_the_factor_map_shows_as_a_heat_map_with_a_legend(server, page):
    open_with_photo(page, server.url, photo((512, 512)))
    wait_done(page)
    assert page.is_hidden("#legend") and page.is_hidden("#factor")
    with page.expect_request(lambda r: "/factor/" in r.url and "format=png" in r.url):
        page.check("#show-factor")
    page.wait_for_selector("#viewer[data-factor=shown]", state="attached")
    assert page.is_visible("#legend") and page.is_visible("#factor")
    assert "brightening" in page.text_content("#legend")
    heat = canvas_pixels(page, "#factor").astype(int)
    factor_id = page.get_attribute("#viewer", "data-factor-id")
    grey = np.asarray(
        Image.open(
            io.BytesIO(
                httpx.get(f"{server.url}/factor/{factor_id}", params={"format": "png"}).content
            )
        ).convert("RGB")
    )
    x_r = np.round(grey.astype(int).sum(-1) / 3) / 127.5 - 1  # the picture: -1 black, +1 white
    want = np.stack([np.interp(x_r, RAMP_X, [c[k] for c in RAMP_RGB]) for k in range(3)], -1)
    assert heat.shape == want.shape == (512, 512, 3)
    assert np.abs(heat - want).max() <= 1  # the page's colour ramp, rounded
    page.uncheck("#show-factor")
    assert page.is_hidden("#legend")


def test_an_unsupported_file_is_refused_in_words(server, page):
    page.goto(server.url)
    page.wait_for_selector("body[data-ready]", state="attached")
    with page.expect_response(lambda r: "/enhance" in r.url) as answer:
        page.set_input_files(
            "#file",
            files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a photo"}],
        )
    assert answer.value.status == 415
    page.wait_for_selector("#message:not([hidden])")
    assert "Not a file type this service reads" in page.text_content("#message")


def test_with_an_api_key_the_page_asks_for_it_then_works(page):
    guarded = Server({"SGZ_API_KEY": KEY})
    try:
        guarded.wait_ready()
        assert httpx.get(guarded.url).status_code == 200  # the page itself is public
        assert httpx.get(f"{guarded.url}/static/page.js").status_code == 200
        open_with_photo(page, guarded.url, photo((512, 512)))
        page.wait_for_selector("#key-panel:not([hidden])")
        assert "API key" in page.text_content("#message")
        with page.expect_response(lambda r: "/enhance" in r.url) as answer:
            page.fill("#api-key", KEY)
            page.press("#api-key", "Enter")
        assert answer.value.status == 200
        assert answer.value.request.headers["x-api-key"] == KEY
        wait_done(page)
        assert page.is_hidden("#key-panel") and page.is_hidden("#message")
        assert page.evaluate("sessionStorage.getItem('sgz-api-key')") == KEY
        assert page.evaluate("localStorage.length") == 0
    finally:
        guarded.close()


def test_a_video_goes_through_a_job_and_comes_back_to_play(server, page, tmp_path):
    """Upload a small real video: the progress bar fills from the job's status, then the
    result plays from a blob, and its download is an enhanced video of the same frames."""
    from video_files import make_video

    src = tmp_path / "night.mp4"
    make_video(src, width=96, height=64, frames=12)
    page.goto(server.url)
    page.wait_for_selector("body[data-ready]", state="attached")
    page.set_input_files("#video-file", str(src))
    with page.expect_request(lambda r: r.method == "POST" and "/jobs" in r.url):
        page.click("#video-form button[type=submit]")
    page.wait_for_selector("#video-result:not([hidden])", timeout=120_000)
    assert page.eval_on_selector("#video-progress", "p => p.value") == 1
    assert "done" in page.inner_text("#video-status")
    with page.expect_download() as download:
        page.click("#video-download")
    saved = download.value.path()
    assert download.value.suggested_filename == "night-sgz.mp4"
    import av

    with av.open(str(saved)) as c:
        frames = list(c.decode(video=0))
        assert len(frames) == 12 and (frames[0].width, frames[0].height) == (96, 64)
        out = np.mean([f.to_ndarray(format="rgb24").mean() for f in frames])
    with av.open(str(src)) as c:
        before = np.mean([f.to_ndarray(format="rgb24").mean() for f in c.decode(video=0)])
    assert out > before + 20  # enhanced
    assert page.eval_on_selector("#video", "v => v.src.startsWith('blob:')")
