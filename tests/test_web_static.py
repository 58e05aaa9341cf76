"""The in-browser page (``flowtok demo --static``) in headless Chromium, with the bundled model.

No inference on the server: it serves files only. Type a prompt, get an image the shapes judge reads
back; drop an image, get its caption. Needs Debian's Chromium (``make browser``) and onnxruntime-web
(``make web``); ``make test`` does both.
"""

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from flowtok import shapes
from flowtok.export.runtime import OnnxFlowTokPipeline
from flowtok.serving.static import build_site, find_onnxruntime_web, serve

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync"]
TIMEOUT_MS = 300_000  # the first call downloads and compiles the graphs; 2 shared cores are slow


@pytest.fixture(scope="module")
def site_url(bundled_onnx, tmp_path_factory):
    find_onnxruntime_web()  # a clear message (run `make web`) when it is missing
    site = build_site(bundled_onnx, tmp_path_factory.mktemp("site"), precision="fp16")
    server = serve(site, port=0, block=False)
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


@pytest.fixture(scope="module")
def page(site_url):
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: run `make browser`"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(site_url)
        page.wait_for_function("window.flowtok && window.flowtok.ready")
        yield page
        assert not errors, errors
        browser.close()


def test_prompt_gives_an_image_the_judge_reads(page):
    page.fill("#prompt", "a large red circle in the top left")
    page.click("#generate")
    page.wait_for_function("window.flowtok.timings.textToImage > 0")
    data = page.evaluate("document.getElementById('image').toDataURL('image/png')")
    image = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB")
    assert image.size == (128, 128)
    assert shapes.judge(image) == shapes.parse("a large red circle in the top left")


def _drop(page, path: Path) -> str:
    """A real drop: a DataTransfer holding the file, dispatched on the drop zone; returns the caption shown."""
    page.evaluate("window.flowtok.timings.imageToText = 0")
    payload = base64.b64encode(path.read_bytes()).decode()
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'scene.png', {type: 'image/png'}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }""", payload)
    page.wait_for_function("window.flowtok.timings.imageToText > 0")
    return page.eval_on_selector("#caption", "e => e.value")


def test_dropped_image_gets_its_caption(page, tmp_path, bundled_onnx):
    scene = shapes.sample_scene(np.random.default_rng(3), num_objects=2, split="test")
    path = tmp_path / "scene.png"
    shapes.render(scene, size=128).save(path)
    caption = _drop(page, path)
    assert shapes.scene_matches(shapes.parse(caption), scene), caption
    # The page's grammar decoding gives the torch-free runtime's caption (the same fp16 graphs).
    assert caption == OnnxFlowTokPipeline.from_pretrained(bundled_onnx, precision="fp16").image_to_text(str(path))[0]


def test_captions_of_any_image_parse(page, tmp_path):
    """The page decodes under the bundle's grammar: even noise gets a caption of the shapes world."""
    assert page.evaluate("window.flowtok.web.manifest.defaults.caption_grammar") == "shapes"
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 160, 3), dtype=np.uint8)).save(path)
    shapes.parse(_drop(page, path))


def test_page_grammar_decoding_matches_the_python_one(page, bundled_onnx):
    """grammar.js against flowtok.caption_grammar on the export's own table: random scores, ties included."""
    runtime = OnnxFlowTokPipeline.from_pretrained(bundled_onnx)
    grammar = runtime.grammar
    assert grammar is not None and page.evaluate("window.flowtok.web.grammar.vocab.length") == len(grammar.vocab)
    rng = np.random.default_rng(0)
    scores = (rng.normal(size=(30, grammar.length, len(grammar.vocab))) * 4).astype(np.float32)
    scores[:10] = scores[:10].round()  # many exact ties, between words and between skeletons
    got = page.evaluate("([s, b, l]) => window.flowtok.web.grammar.decodeScores(s, b, l)",
                        [scores.astype(float).ravel().tolist(), scores.shape[0], scores.shape[1]])
    want = grammar.decode_scores(scores)
    assert got == want
    assert all(shapes.parse(c) for c in got) and len(set(got)) == len(got)


def test_page_tokenizer_matches_the_python_one(page, bundled_onnx):
    texts = ["a large red circle in the top left", "Héllo   wörld!  I can't, 42 cats?", "[SEP] 漢字 naïve café",
             "x" * 150, "tab\tand\nnewline", "ÅNGSTRÖM’s “quotes” — dash"]
    runtime = OnnxFlowTokPipeline.from_pretrained(bundled_onnx)
    for text in texts:
        want = [runtime.text_tokenizer.encode(text, add_special_tokens=False).ids]
        got = page.evaluate("t => window.flowtok.web.wordpiece.encode(t)", text)
        assert got == want[0], text
    rng = np.random.default_rng(0)
    common = [1037, 2312, 2417, 4418, 1999, 1996, 2327, 2187, 1010, 1012, 1005, 1055, 2321, 2484, 2106, 2025, 102, 0]
    rows = rng.choice(common, (60, 12)).tolist() + rng.integers(999, 30522, (20, 12)).tolist()
    got = page.evaluate("rows => rows.map(r => window.flowtok.web.decodeIds(r))", rows)
    assert got == runtime.decode_ids(np.array(rows))


def test_empty_prompt_shows_a_message(page):
    page.fill("#prompt", "   ")
    page.click("#generate")
    page.wait_for_function("document.getElementById('t2i-info').className == 'error'")
    assert page.locator("#t2i-info").text_content() == "Please enter a prompt."
