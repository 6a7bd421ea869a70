"""The web page of `sagrt serve` in a real browser: Debian's chromium (never a downloaded one) driven by
Playwright against a real `sagrt serve --model tiny --backend torch` on 127.0.0.1. Each state is saved as a
screenshot in a folder the run names at its end (and copied to $SAGRT_PAGE_SCREENSHOTS when set)."""

import base64
import io
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from test_serve import Server  # noqa: E402  (one home for the server fixture's process)

from sagrt.serve.page import parse_infotext  # noqa: E402

CHROMIUM = shutil.which("chromium")
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # --max-queue 2: a compare of three scales behind a running job gets one 429
    srv = Server(tmp_path_factory.mktemp("page-serve"), "--max-queue", "2", "--max-steps", "1000",
                 "--max-size", "256x256", "--timeout", "120")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def shots(tmp_path_factory, request):
    """shots(page, name): a screenshot of the page's current state, kept for inspection."""
    folder = tmp_path_factory.mktemp("page-screenshots")

    def take(page, name, full_page=False):
        page.evaluate("window.scrollTo(0, 0)")  # the header (service state) in every picture
        page.screenshot(path=str(folder / f"{name}.png"), full_page=full_page)

    yield take
    target = os.environ.get("SAGRT_PAGE_SCREENSHOTS")
    if target:
        shutil.copytree(folder, target, dirs_exist_ok=True)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"page screenshots: {target or folder}")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("needs the system browser: apt-get update && apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


class Tab:
    """One page in its own browser context, with what it logged and fetched."""

    def __init__(self, browser, url, viewport=DESKTOP):
        self.context = browser.new_context(viewport=viewport, accept_downloads=True)
        self.page = self.context.new_page()
        self.console, self.crashes, self.requests = [], [], []
        self.page.on("console", lambda msg: msg.type == "error" and self.console.append(msg.text))
        self.page.on("pageerror", lambda err: self.crashes.append(str(err)))
        self.page.on("request", lambda req: self.requests.append(req.url))
        self.page.goto(url + "/")
        self.page.wait_for_selector("#state[data-state='ready']", timeout=20_000)

    def fill(self, **fields):
        for field, value in fields.items():
            self.page.fill(f"#{field}", str(value))

    def watch_progress(self):
        """Records every value the progress bar takes from now on (window.progressSeen)."""
        self.page.evaluate("""() => {
            const bar = document.getElementById('progress');
            window.progressSeen = [];
            new MutationObserver(() => window.progressSeen.push([bar.value, bar.max]))
                .observe(bar, {attributes: true});
        }""")

    def close(self):
        assert not self.crashes, f"uncaught errors in the page: {self.crashes}"
        self.context.close()


@pytest.fixture
def tab(browser, server):
    opened = Tab(browser, server.url)
    yield opened
    opened.close()


def data_image(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")).astype(np.int16)


def test_page_loads_without_console_errors(tab, server, shots):
    page = tab.page
    assert page.title().startswith("sagrt")
    assert page.text_content("#model") == "tiny" and page.text_content("#backend") == "torch"
    assert page.text_content("#state") == "ready"
    assert page.input_value("#width") == "64" and page.input_value("#height") == "64"  # the model's size
    schedulers = page.eval_on_selector_all("#scheduler option", "options => options.map(o => o.value)")
    assert "euler-a" in schedulers and "ddim" in schedulers
    page.wait_for_timeout(300)
    shots(page, "01-loaded")
    assert tab.console == []
    foreign = [url for url in tab.requests if not url.startswith((server.url, "data:"))]
    assert foreign == [], "the page must load nothing from another site"


def test_enter_shows_progress_then_image_with_parameters(tab, shots):
    page = tab.page
    tab.fill(width=64, height=96, num_inference_steps=60, seed=31)
    page.click("#prompt")
    page.keyboard.type("a red house")
    tab.watch_progress()
    page.keyboard.press("Enter")  # Enter in the prompt generates
    page.wait_for_function("document.getElementById('progress').value > 0", timeout=20_000)
    shots(page, "02-progress")
    image = page.wait_for_selector(".run img", timeout=30_000)
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 96]
    seen = page.evaluate("window.progressSeen")
    assert any(0 < value < total for value, total in seen), f"no intermediate progress in {seen}"
    assert page.text_content("#progress-label").startswith("done")
    with page.expect_download() as download:
        page.click(".run .card a[download]")
    png = Image.open(download.value.path())
    assert png.size == (64, 96)
    assert png.info["parameters"].startswith("a red house\n")
    assert "Seed: 31" in png.info["parameters"] and "Size: 64x96" in png.info["parameters"]
    assert download.value.suggested_filename == "sagrt-31-sag0.75.png"
    shots(page, "03-image")

    tab.fill(prompt="something else", seed=-1, width=128, num_inference_steps=5)  # the file brings its settings back
    page.set_input_files("#load-png", download.value.path())
    page.wait_for_selector("#run-message[data-kind='ok']", timeout=5_000)
    assert page.text_content("#run-message").endswith("(not used here: Model)")
    assert [page.input_value(f"#{field}") for field in ("prompt", "seed", "width", "height", "num_inference_steps",
                                                       "scheduler", "sag_scale")] == \
        ["a red house", "31", "64", "96", "60", "ddim", "0.75"]


def test_compare_differs_and_mask_toggle_draws_overlay(tab, shots):
    page = tab.page
    tab.fill(prompt="a bowl of fruit", seed=1234, num_inference_steps=12)
    page.click("#compare")
    page.wait_for_function("document.querySelectorAll('.run.compare img').length === 2", timeout=30_000)
    labels = page.eval_on_selector_all(".run.compare .label", "spans => spans.map(s => s.textContent)")
    assert labels == ["SAG off", "SAG 0.75"]
    off, on = (data_image(src) for src in page.eval_on_selector_all(".run.compare img", "imgs => imgs.map(i => i.src)"))
    assert off.shape == on.shape == (64, 64, 3)
    assert np.abs(off - on).mean() > 1.0, "SAG off and on gave the same image"
    shots(page, "04-compare")

    page.check("#show-mask")
    page.fill("#mask-step", "6")
    page.wait_for_function("document.querySelectorAll('.card canvas.mask[data-mask]').length === 1", timeout=5_000)
    overlay = page.locator(".card").nth(1).locator("canvas.mask")
    assert overlay.is_visible()
    painted = overlay.evaluate("""c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return [n, c.width, c.height]; }""")
    assert painted[1:] == [8, 8] and 0 < painted[0] < 64, painted  # latent-resolution mask, partly on
    assert not page.locator(".card").nth(0).locator("canvas.mask").is_visible()
    notes = page.eval_on_selector_all(".run.compare .mask-note", "spans => spans.map(s => s.textContent)")
    assert notes == ["no mask: SAG off", "mask of step 6"]
    shots(page, "05-mask")
    page.uncheck("#show-mask")
    assert not overlay.is_visible()


def test_bad_size_shows_the_services_message(tab, server, shots):
    page = tab.page
    tab.fill(prompt="a red house", width=100)
    page.click("#generate")
    error = page.locator(".error[data-for='width']")
    error.wait_for(state="visible", timeout=10_000)
    expected = httpx.post(server.url + "/v1/generate", json={"prompt": "a red house", "width": 100},
                          timeout=10).json()["detail"][0]["msg"]
    assert error.text_content() == expected and "multiple of 8" in expected
    assert page.get_attribute("#width", "aria-invalid") == "true"
    assert page.text_content("#run-message") == "The service refused width: see the field."
    assert page.locator(".run").count() == 0
    shots(page, "06-bad-size")
    page.fill("#width", "64")  # editing the field clears the complaint
    assert not error.is_visible()


def test_cancel_stops_a_job_and_a_full_queue_is_shown(tab, browser, server, shots):
    page = tab.page
    tab.fill(prompt="a long job", num_inference_steps=900)
    page.click("#generate")
    page.wait_for_function("document.getElementById('progress').value > 0", timeout=20_000)
    assert page.is_enabled("#cancel") and page.is_disabled("#generate")

    other = Tab(browser, server.url)  # a second user: three scales behind the running job, the queue holds two
    try:
        other.fill(prompt="a queued compare", num_inference_steps=2, compare_scales="0, 0.5, 1")
        other.page.click("#compare")
        other.page.wait_for_function("document.getElementById('progress-label').textContent.startsWith('queued')")

        page.click("#cancel")
        page.wait_for_selector("#run-message[data-kind='info']", timeout=10_000)
        message = page.text_content("#run-message")
        assert message.startswith("Cancelled at step ")
        assert int(message.split()[3]) < 900
        assert page.text_content("#progress-label") == "cancelled"
        assert page.locator(".run").count() == 0 and page.is_enabled("#generate")
        deadline = time.monotonic() + 10
        while any(job["steps"] == 900 for job in httpx.get(server.url + "/v1/status").json()["running"]):
            assert time.monotonic() < deadline, "the cancelled job kept running"
            time.sleep(0.1)
        shots(page, "07-cancelled")

        other.page.wait_for_selector("#run-message[data-kind='error']", timeout=20_000)
        assert other.page.text_content("#run-message").startswith("the queue is full: retry in ")
        assert other.page.locator(".run.compare img").count() == 2  # the two that were queued still came
        shots(other.page, "08-queue-full")
    finally:
        other.close()


def test_phone_width_and_keyboard_alone(browser, server, shots):
    tab = Tab(browser, server.url, viewport=PHONE)
    try:
        page = tab.page
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], "sideways scrolling"
        box = page.locator("#generate").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
        page.keyboard.press("Tab")  # the prompt is the first stop
        assert page.evaluate("document.activeElement.id") == "prompt"
        page.keyboard.type("a blue car")
        page.keyboard.press("Shift+Enter")  # a new line, not a request
        page.keyboard.type("at night")
        assert page.input_value("#prompt") == "a blue car\nat night"
        assert page.locator(".run").count() == 0
        page.keyboard.press("Enter")
        page.wait_for_selector(".run img", timeout=30_000)
        # one column: the page brings the new images into view
        page.wait_for_function("(box => box.top >= 0 && box.bottom <= innerHeight)"
                               "(document.querySelector('.run img').getBoundingClientRect())")
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        seed = page.text_content(".run .label").removeprefix("seed ")
        page.click("#last-seed")  # the last image's seed, ready to vary the prompt
        assert page.input_value("#seed") == seed
        shots(page, "09-phone", full_page=True)
    finally:
        tab.close()


def test_settings_from_an_a1111_png_with_compressed_utf8_text(tab, tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()  # A1111 writes iTXt when the prompt is not latin-1; zip=True: the compressed form
    info.add_itxt("parameters", "café au lait ☕\nNegative prompt: tea\nSteps: 25, Sampler: DPM++ 2M Karras, "
                                "CFG scale: 5, Seed: 77, Size: 48x80, Model hash: 1234abcd", zip=True)
    made = tmp_path / "a1111.png"
    Image.new("RGB", (48, 80)).save(made, pnginfo=info)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    page = tab.page
    page.set_input_files("#load-png", str(made))
    page.wait_for_selector("#run-message[data-kind='ok']", timeout=5_000)
    assert [page.input_value(f"#{field}") for field in ("prompt", "negative_prompt", "num_inference_steps",
                                                       "scheduler", "guidance_scale", "seed", "width", "height")] \
        == ["café au lait ☕", "tea", "25", "dpm++2m", "5", "77", "48", "80"]
    assert page.is_checked("#karras_sigmas")
    page.set_input_files("#load-png", str(tmp_path / "plain.png"))
    page.wait_for_selector("#run-message[data-kind='error']", timeout=5_000)
    assert page.text_content("#run-message") == 'plain.png has no "parameters" text: it was not made by sagrt or ' \
                                                "AUTOMATIC1111"


def test_parameters_text_back_to_fields():
    """A1111's infotext (quoted values, multi-line prompts, Schedule type) -> /v1/generate's fields."""
    text = ('a cat, "quoted"\non a sofa\nNegative prompt: blurry,\nugly\n'
            'Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 123, Size: 512x768, '
            'Model hash: abc, Lora hashes: "a: 1, b: 2", SAG scale: 0.5, SAG window: 0.0:0.8, SAG blur kernel: 7')
    parsed = parse_infotext(text)
    assert parsed["fields"] == {"prompt": 'a cat, "quoted"\non a sofa', "negative_prompt": "blurry,\nugly",
                                "num_inference_steps": 30, "scheduler": "dpm++2m", "karras_sigmas": True,
                                "guidance_scale": 6.5, "seed": 123, "width": 512, "height": 768, "sag_scale": 0.5,
                                "sag_window": [0.0, 0.8], "sag_blur_kernel": 7}
    assert parsed["ignored"] == ["Model hash", "Lora hashes"]
    assert parse_infotext("just a prompt\nSteps: many, Sampler: Nope") == \
        {"fields": {"prompt": "just a prompt", "negative_prompt": None}, "ignored": ["Steps", "Sampler"]}
