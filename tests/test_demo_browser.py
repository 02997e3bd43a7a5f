"""``lcmla demo`` in a real browser: Debian's chromium, driven headless by Playwright, on the tiny preset.

Screenshots of every state are kept as test artefacts in pytest's temporary folder (``.../artifacts0/``; the path is
printed), or in ``$LCMLA_TEST_ARTIFACTS`` when set.
"""

import os
from pathlib import Path

import pytest
from http_helpers import free_port

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"the browser test needs Debian's chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the dev extra)")
pytest.importorskip("gradio", reason="the web app needs gradio (the demo extra)")

from lcmla_sdk.demo.app import build  # noqa: E402
from lcmla_sdk.demo.backends import LocalBackend  # noqa: E402

# Headless, and nothing reaches out: no GPU, QUIC, sync, component updates or background requests.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
TIMEOUT_MS = 30_000
SAMPLE_FACE = Path(__file__).parents[1] / "lcmla_sdk" / "assets" / "sample_face.jpg"


@pytest.fixture(scope="module")
def url(tiny):
    page = build(LocalBackend(tiny, "tiny"))
    port = free_port()
    page.queue().launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    page.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("LCMLA_TEST_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"browser screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, args=ARGS, headless=True,
            viewport={"width": 1280, "height": 1200},
        )  # fmt: skip
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


@pytest.fixture
def page(browser, url):
    tab = browser.new_page()
    tab.goto(url)
    tab.wait_for_selector("#generate")
    yield tab
    tab.close()


def upload(page, url: str, path) -> None:
    """A fresh page per upload: once a file is in, the component shows it instead of its file input."""
    page.goto(url)
    page.wait_for_selector("#generate")
    page.set_input_files("#photos input[type=file]", str(path))


def status_shows(page, text: str) -> str:
    page.wait_for_function("t => document.querySelector('#status').innerText.includes(t)", arg=text)
    return page.locator("#status").inner_text()


def fill(page, elem_id: str, value) -> None:
    page.locator(f"#{elem_id} input").fill(str(value))


def test_upload_a_face_generate_and_see_the_gallery_at_the_requested_size(page, artifacts):
    page.set_input_files("#photos input[type=file]", str(SAMPLE_FACE))
    assert "1 face(s) found" in status_shows(page, "Identity")
    page.wait_for_selector("#faces img")
    assert ".safetensors" in page.locator("#saved").inner_text()  # the identity, ready to download
    page.screenshot(path=artifacts / "1-identity.png", full_page=True)

    fill(page, "height", 64)
    fill(page, "width", 96)
    fill(page, "num-images", 2)
    page.click("#generate")
    assert "2 image(s) of 96x64" in status_shows(page, "image(s)")
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('#gallery img')];"
        " return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0); }"
    )
    sizes = page.evaluate("[...document.querySelectorAll('#gallery img')].map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[96, 64], [96, 64]]
    assert page.locator("#downloads").inner_text().count(".png") == 2
    page.screenshot(path=artifacts / "2-gallery.png", full_page=True)


def test_a_text_file_a_photo_without_a_face_and_a_value_out_of_range_show_errors(page, url, artifacts, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    upload(page, url, notes)
    assert "Error: photos: notes.txt is not an image" in status_shows(page, "Error")
    page.screenshot(path=artifacts / "3-not-an-image.png", full_page=True)

    coffee = tmp_path / "coffee.png"
    Image.fromarray(skimage_data.coffee()).save(coffee)
    upload(page, url, coffee)
    assert "Error: face: no face found" in status_shows(page, "no face")
    page.screenshot(path=artifacts / "4-no-face.png", full_page=True)

    upload(page, url, SAMPLE_FACE)
    status_shows(page, "Identity")
    fill(page, "steps", 0)
    page.click("#generate")
    assert "Error: steps: fast mode: 0 is out of range" in status_shows(page, "Error")
    assert "Traceback" not in page.content()
    page.screenshot(path=artifacts / "5-out-of-range.png", full_page=True)

