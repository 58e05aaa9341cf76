"""The web demo's server: user errors come back as one-line messages, limits hold under a burst."""

import importlib.util
import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import gradio as gr
import httpx
import pytest
from PIL import Image

from flowtok.pipelines import FlowTokPipeline
from flowtok.serving.demo import _upload_path, build_app, serve

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_load.py"
MAX_UPLOAD_MB = 0.5


def _load_bench():
    spec = importlib.util.spec_from_file_location("demo_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo_load = _load_bench()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return demo_load.build_untrained_pipeline(tmp_path_factory.mktemp("demo"), "tiny")


@pytest.fixture(scope="module")
def base_url(tiny_model):
    pipe = FlowTokPipeline.from_pretrained(tiny_model, device="cpu")
    app = build_app(pipe, max_upload_mb=MAX_UPLOAD_MB, queue_size=4, concurrency=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve(app, port=port, max_upload_mb=MAX_UPLOAD_MB, block=False, quiet=True)
    yield f"http://127.0.0.1:{port}"
    app.close()


def _call(base: str, api: str, data: list) -> tuple[str, object]:
    """('complete', outputs) or ('error', message) for one call of a demo endpoint."""
    join = httpx.post(f"{base}/gradio_api/call/{api}", json={"data": data}, timeout=30)
    assert join.status_code == 200, join.text
    event = None
    with httpx.stream("GET", f"{base}/gradio_api/call/{api}/{join.json()['event_id']}", timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line.split(":", 1)[1])
                return event, payload if event == "complete" else payload["error"]
    raise AssertionError("no result")


def _upload(base: str, name: str, content: bytes) -> httpx.Response:
    return httpx.post(f"{base}/gradio_api/upload", files={"files": (name, content, "image/png")}, timeout=30)


def _file(path: str, name: str) -> dict:
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def _png(size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (30, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_both_directions_over_http(base_url):
    event, out = _call(base_url, "generate", ["a red circle", 2, 1.0, 3, 2])
    assert event == "complete" and len(out[0]) == 2  # two gallery items
    image = httpx.get(out[0][0]["image"]["url"], timeout=10)
    assert Image.open(io.BytesIO(image.content)).size == (32, 32)
    up = _upload(base_url, "blue.png", _png())
    assert up.status_code == 200
    event, out = _call(base_url, "caption", [_file(up.json()[0], "blue.png"), 2])
    assert event == "complete" and isinstance(out[0], str) and out[0].strip()


@pytest.mark.parametrize(("data", "message"), [
    (["", 2, 1.0, 0, 1], "Please enter a prompt."),
    (["   \n", 2, 1.0, 0, 1], "Please enter a prompt."),
    (["a red circle", 0, 1.0, 0, 1], "Steps must be a whole number from 1 to 100, got 0"),
    (["a red circle", 2.5, 1.0, 0, 1], "Steps must be a whole number"),
    (["a red circle", 2, 1.0, 0, 99], "Number of images must be a whole number from 1 to 4, got 99"),
    ([None, 2, 1.0, 0, 1], "Please enter a prompt."),
    (["a red circle", 2, "strong", 0, 1], "Guidance must be a number, got 'strong'"),
    (["a red circle", 2, 25, 0, 1], "Guidance must be from 0 to 20, got 25"),
    (["a red circle", 2, 1.0, -1, 1], "Seed must be a whole number"),
    (["x" * 5000, 2, 1.0, 0, 1], "5000 characters"),
])
def test_text_to_image_user_errors(base_url, data, message):
    event, text = _call(base_url, "generate", data)
    assert event == "error" and message in text and "\n" not in text and "Traceback" not in text


def test_image_to_text_user_errors(base_url):
    up = _upload(base_url, "notes.png", b"meeting notes, not pixels")
    event, text = _call(base_url, "caption", [_file(up.json()[0], "notes.png"), 2])
    assert event == "error" and text.startswith("Not an image the demo can read: notes.png: not a readable image file")
    event, text = _call(base_url, "caption", [None, 2])
    assert event == "error" and text == "Please upload an image first."
    good = _upload(base_url, "blue.png", _png())
    event, text = _call(base_url, "caption", [_file(good.json()[0], "blue.png"), 0])
    assert event == "error" and text == "Steps must be a whole number from 1 to 100, got 0"
    big = _upload(base_url, "huge.png", _png() + b"\0" * int(MAX_UPLOAD_MB * 2**20 + 1))
    assert big.status_code == 413 and "File size exceeded maximum allowed size" in big.text
    # A path the client made up is refused by gradio before the handler, and nothing of it leaks.
    join = httpx.post(f"{base_url}/gradio_api/call/caption", json={"data": [_file("/etc/passwd", "x.png"), 2]})
    if join.status_code == 200:
        stream = httpx.get(f"{base_url}/gradio_api/call/caption/{join.json()['event_id']}", timeout=30).text
        assert "event: error" in stream and "root:" not in stream
    else:
        assert join.status_code in (400, 403, 422)


def test_handler_checks_size_and_content(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(_png() + b"\0" * (3 * 2**19))
    with pytest.raises(gr.Error, match=r"The file is 1.5 MB; the limit is 1 MB."):
        _upload_path({"path": str(big), "orig_name": "big.png"}, max_bytes=2**20, upload_root=str(tmp_path))
    good = tmp_path / "good.png"
    good.write_bytes(_png())
    assert _upload_path({"path": str(good)}, max_bytes=2**20, upload_root=str(tmp_path)) == str(good)
    with pytest.raises(gr.Error, match="upload the image again"):
        _upload_path({"path": "https://example.com/cat.png"}, max_bytes=2**20, upload_root=str(tmp_path))
    with pytest.raises(gr.Error, match="upload the image again"):  # a real image, but never uploaded
        _upload_path({"path": str(good)}, max_bytes=2**20, upload_root=str(tmp_path / "uploads"))
    eps = tmp_path / "photo.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n")
    with pytest.raises(gr.Error, match="not a readable image file"):
        _upload_path({"path": str(eps)}, max_bytes=2**20, upload_root=str(tmp_path))


@pytest.mark.parametrize(("api", "data", "message"), [
    ("caption", [_file("/etc/passwd", "x.png"), 2], "upload the image again"),
    ("caption", [{"path": "/etc/hostname"}, 2], "upload the image again"),
    ("caption", ["/etc/passwd", 2], "Malformed request: an input is not in the form"),
    ("caption", ["hello", 2], "Malformed request"),
    ("caption", [], "Malformed request: expected 2 input values, got 0."),
    ("generate", ["a red circle"], "Malformed request: expected 5 input values, got 1."),
    ("generate", [{"a": 1}, 2, 1.0, 0, 1], "Please enter a prompt."),
])
def test_malformed_api_calls_get_a_message_and_leave_no_traceback(base_url, capfd, api, data, message):
    capfd.readouterr()
    event, text = _call(base_url, api, data)
    assert event == "error" and text and message in text and "\n" not in text
    logged = capfd.readouterr()
    assert "Traceback" not in logged.err + logged.out


def test_build_app_rejects_bad_limits(tiny_model):
    pipe = FlowTokPipeline.from_pretrained(tiny_model, device="cpu")
    with pytest.raises(ValueError, match="queue_size"):
        build_app(pipe, queue_size=0)
    with pytest.raises(ValueError, match="max_upload_mb"):
        build_app(pipe, max_upload_mb=0)


def test_burst_of_200_requests_is_served_or_refused_clearly(tiny_model, tmp_path):
    """The CI-sized version of benchmarks/demo_load.py: 200 requests at once on a queue of 8."""
    s = demo_load.run_load(tiny_model, requests=200, queue_size=8, concurrency=1, max_upload_mb=1.0,
                           timeout=120, log_dir=tmp_path)
    print(json.dumps(s, indent=2))
    log_tail = Path(s["server_log"]).read_text(errors="replace")[-3000:]
    assert s["failed"] == 0, (s["example_messages"], log_tail)
    assert s["served"] + s["busy"] + s["too_large"] + s["rejected"] == 200
    assert s["served"] > 0 and s["busy"] > 0
    assert s["by_kind"]["oversized_upload"] == {"too_large": 50}
    assert set(s["by_kind"]["text_to_image"]) <= {"served", "busy"}
    assert set(s["by_kind"]["not_an_image"]) <= {"rejected", "busy"}
    assert s["example_messages"]["busy"].startswith("Queue is full")
    assert s["after_burst"] == "served" and s["server_alive"]
    assert 0 < s["idle_rss_mb"] <= s["peak_rss_mb"] < 4096


def test_hostile_burst_gets_answers_and_leaves_no_traceback(tiny_model, tmp_path):
    """Bombs, an EPS named .png and malformed API calls mixed into a burst: each is answered, nothing
    escapes as a traceback in the server log, memory stays bounded."""
    s = demo_load.run_load(tiny_model, requests=100, queue_size=8, concurrency=1, max_upload_mb=1.0,
                           timeout=120, log_dir=tmp_path, hostile=True)
    log_tail = Path(s["server_log"]).read_text(errors="replace")[-3000:]
    assert s["failed"] == 0 and s["tracebacks_in_log"] == 0, (s["example_messages"], log_tail)
    for kind in ("eps_upload", "never_uploaded", "bare_string", "too_few_inputs", "bomb_upload"):
        assert set(s["by_kind"][kind]) <= {"rejected", "busy"}, (kind, s["by_kind"][kind])
    assert s["after_burst"] == "served" and s["server_alive"]
    assert s["peak_rss_mb"] < 4096


def test_library_never_imports_the_demo():
    code = ("import sys, flowtok, flowtok.pipelines, flowtok.cli, flowtok.commands, flowtok.training, flowtok.eval; "
            "bad = [m for m in sys.modules if m.startswith(('gradio', 'flowtok.serving'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
