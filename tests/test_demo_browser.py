"""The web demo end to end in headless Chromium: a prompt gives an image, an upload gives a caption.

Needs Debian's Chromium at /usr/bin/chromium (``make browser``; ``make test`` runs it first).
The screenshots land in the test's tmp folder; set FLOWTOK_SCREENSHOTS=<dir> to keep them.
"""

import importlib.util
import io
import os
import socket
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from flowtok.pipelines import FlowTokPipeline
from flowtok.serving.demo import build_app, serve

CHROMIUM = "/usr/bin/chromium"
# No sandbox (tests may run as root in a container), no GPU, and nothing that phones home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


def _build_untrained_pipeline(folder: Path) -> Path:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_load.py"
    spec = importlib.util.spec_from_file_location("demo_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_untrained_pipeline(folder, "tiny")


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    pipe = FlowTokPipeline.from_pretrained(_build_untrained_pipeline(tmp_path_factory.mktemp("demo")), device="cpu")
    app = build_app(pipe, max_upload_mb=1, queue_size=4, concurrency=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve(app, port=port, max_upload_mb=1, block=False, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture
def page(demo_url):
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: run `make browser`"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(demo_url)
        yield page
        browser.close()


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("FLOWTOK_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    assert Image.open(path).size[0] > 0
    return path


def test_prompt_gives_an_image(page, tmp_path):
    page.locator("#prompt textarea").fill("a large red circle in the top left")
    page.locator("#generate").click()
    image = page.locator("#gallery img").first
    expect(image).to_be_visible()
    # The image must really have arrived from the server, not be a broken placeholder.
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    src = image.get_attribute("src")
    data = page.request.get(src).body()
    assert Image.open(io.BytesIO(data)).size == (32, 32)
    _screenshot(page, tmp_path, "demo-text-to-image.png")


def test_empty_prompt_shows_a_message(page):
    page.locator("#generate").click()
    expect(page.get_by_text("Please enter a prompt.")).to_be_visible()
    expect(page.get_by_text("Traceback")).to_have_count(0)


def _upload_tab(page, tmp_path: Path, name: str, content: bytes) -> None:
    page.get_by_role("tab", name="Image to text").click()
    path = tmp_path / name
    path.write_bytes(content)
    page.locator("#upload input[type=file]").set_input_files(str(path))


def test_upload_gives_a_caption(page, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (30, 90, 200)).save(buf, format="PNG")
    _upload_tab(page, tmp_path, "blue.png", buf.getvalue())
    expect(page.locator("#upload img").first).to_be_visible()  # the preview of the upload
    page.locator("#caption-button").click()
    caption = page.locator("#caption textarea")
    expect(caption).not_to_have_value("")
    assert caption.input_value().strip()
    _screenshot(page, tmp_path, "demo-image-to-text.png")


def test_oversized_upload_shows_a_message(page, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (30, 90, 200)).save(buf, format="PNG")
    _upload_tab(page, tmp_path, "huge.png", buf.getvalue() + b"\0" * (2 * 2**20))
    expect(page.get_by_text("exceed the maximum allowed size of 1.0 Mb")).to_be_visible()
    _screenshot(page, tmp_path, "demo-too-large.png")


def test_not_an_image_shows_a_message(page, tmp_path):
    _upload_tab(page, tmp_path, "notes.png", b"meeting notes, not pixels")
    page.locator("#caption-button").click()
    expect(page.get_by_text("Not an image the demo can read: notes.png")).to_be_visible()
    expect(page.locator("#caption textarea")).to_have_value("")
