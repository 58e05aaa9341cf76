"""The web demo: a gradio app with a text-to-image tab and an image-to-text tab.

Launch it with ``flowtok demo`` (bundled model, http://127.0.0.1:7860) or from Python::

    from flowtok.pipelines import FlowTokPipeline
    from flowtok.serving.demo import build_app, serve

    app = build_app(FlowTokPipeline.from_pretrained(), max_upload_mb=10, queue_size=32, concurrency=1)
    serve(app, host="127.0.0.1", port=7860, max_upload_mb=10)

Limits, all enforced on the server (an API client can skip the browser's sliders):

- ``queue_size``: requests waiting beyond this are refused at once with gradio's "Queue is full"
  (HTTP 503) instead of piling up memory and latency.
- ``concurrency``: model calls running at once, shared by both tabs (one gradio concurrency group),
  because both directions compete for the same cores or GPU.
- ``max_upload_mb``: gradio refuses a larger upload (HTTP 413) before it reaches the disk; the
  caption handler checks the size again for files that arrive by other routes.
- steps, number of images and guidance are bounded, so one request cannot hold the model for long.

Mistakes (empty prompt, a file that is not an image, an oversized upload) come back as one-line
``gr.Error`` messages; a traceback never reaches the page. Nothing in :mod:`flowtok` imports this module.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ..data.readers import load_image  # noqa: E402
from ..errors import FlowTokError, InvalidInputError  # noqa: E402
from ..pipelines import FlowTokPipeline  # noqa: E402
from ..processing import MAX_PROMPT_CHARS  # noqa: E402

log = logging.getLogger(__name__)

MAX_STEPS = 100
MAX_IMAGES = 4
MAX_GUIDANCE = 20.0
EXAMPLE_PROMPTS = [
    "a large red circle in the top left",
    "a small blue square at the center",
    "a yellow star to the left of a purple circle",
]
# Shapes-world images are small (32-128 px); the browser would blur them when it scales them up.
_CSS = "#gallery img, #upload img { image-rendering: pixelated; }"


def _user_error(message: str) -> gr.Error:
    # A mistake in the request, not a fault of the server: keep its traceback out of the server log.
    return gr.Error(message, print_exception=False)


def _int_in(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _user_error(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise _user_error(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


def _guidance(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _user_error(f"Guidance must be a number, got {value!r}") from None
    if not math.isfinite(number) or not 0.0 <= number <= MAX_GUIDANCE:
        raise _user_error(f"Guidance must be from 0 to {MAX_GUIDANCE:g}, got {value!r}")
    return number


def _upload_path(upload: Any, max_bytes: int, upload_root: str | None = None) -> str:
    """The local file of an image upload, checked for lying in gradio's upload folder, for size and
    for being an image."""
    if upload is None:
        raise _user_error("Please upload an image first.")
    path = upload.get("path") if isinstance(upload, dict) else upload
    # A URL means a remote reference, which this demo does not fetch; a path outside gradio's upload
    # folder was never uploaded (an API client can name any file on the server).
    root = Path(upload_root or gr.utils.get_upload_folder()).resolve()
    if not isinstance(path, str) or "://" in path or not Path(path).resolve().is_relative_to(root) \
            or not Path(path).is_file():
        raise _user_error("The upload could not be read; please upload the image again.")
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise _user_error(f"The file is {size / 2**20:.3g} MB; the limit is {max_bytes / 2**20:.3g} MB.")
    name = upload.get("orig_name") if isinstance(upload, dict) else None
    try:
        load_image(path, name=name or Path(path).name)  # decodes fully: a broken file fails here
    except FlowTokError as exc:
        raise _user_error(f"Not an image the demo can read: {exc}") from None
    return path


def _refuse_malformed_calls(app: gr.Blocks) -> None:
    """Answer an API call gradio cannot even hand to a handler (too few inputs, a bare string where a
    file belongs, a path that was never uploaded) with a one-line message and no server traceback.

    gradio checks these in ``Blocks.preprocess_data`` before any handler runs and reports them as an
    error without a message plus a traceback in the log; this wraps that one method of this app.
    """
    original = app.preprocess_data

    async def preprocess_data(block_fn, inputs, state, explicit_call=False):
        try:
            return await original(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever gradio refuses here is the request's fault
            wanted = len(block_fn.inputs)
            if not isinstance(inputs, list) or len(inputs) != wanted:
                got = len(inputs) if isinstance(inputs, list) else type(inputs).__name__
                raise _user_error(f"Malformed request: expected {wanted} input values, got {got}.") from None
            if isinstance(exc, gr.exceptions.InvalidPathError):
                raise _user_error("The upload could not be read; please upload the image again.") from None
            raise _user_error("Malformed request: an input is not in the form this API expects (an image is "
                              "{'path': ..., 'meta': {'_type': 'gradio.FileData'}} from /gradio_api/upload).") from None

    app.preprocess_data = preprocess_data  # type: ignore[method-assign]


def build_app(pipeline: FlowTokPipeline, max_upload_mb: float = 10.0, queue_size: int = 32,
              concurrency: int = 1) -> gr.Blocks:
    """The demo's gradio app for ``pipeline``; start it with :func:`serve`."""
    if not (math.isfinite(max_upload_mb) and max_upload_mb > 0):
        raise InvalidInputError(f"max_upload_mb must be a positive number, got {max_upload_mb}")
    if queue_size < 1 or concurrency < 1:
        raise InvalidInputError(f"queue_size and concurrency must be at least 1, got {queue_size}, {concurrency}")
    max_bytes = int(max_upload_mb * 2**20)
    default_steps = min(pipeline.defaults.num_inference_steps, MAX_STEPS)
    default_guidance = float(pipeline.defaults.guidance_scale)

    def text_to_image(prompt: str, steps: float, guidance: float, seed: float, n: float) -> list[Image.Image]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise _user_error("Please enter a prompt.")
        steps_i = _int_in(steps, "Steps", 1, MAX_STEPS)
        n_i = _int_in(n, "Number of images", 1, MAX_IMAGES)
        seed_i = _int_in(0 if seed is None else seed, "Seed", 0, 2**63 - 1)
        generator = torch.Generator(device=pipeline.device).manual_seed(seed_i)
        try:
            # output_type "pil" (the default): a list of PIL images.
            return cast(list[Image.Image], pipeline.text_to_image([prompt] * n_i, num_inference_steps=steps_i,
                                                                  guidance_scale=_guidance(guidance),
                                                                  generator=generator))
        except FlowTokError as exc:
            raise _user_error(str(exc)) from None

    def image_to_text(upload: Any, steps: float) -> str:
        path = _upload_path(upload, max_bytes)
        steps_i = _int_in(steps, "Steps", 1, MAX_STEPS)
        try:
            return pipeline.image_to_text(path, num_inference_steps=steps_i)[0]
        except FlowTokError as exc:
            raise _user_error(str(exc)) from None

    name = pipeline.model_path.name if pipeline.model_path else "in-memory model"
    with gr.Blocks(title="flowtok demo", analytics_enabled=False) as app:
        gr.Markdown(f"# flowtok\nText to image and image to text by flow matching between text tokens and "
                    f"1D image tokens ([FlowTok](https://arxiv.org/abs/2503.10772)). Model: `{name}`.")
        with gr.Tab("Text to image", id="t2i"):
            prompt = gr.Textbox(label="Prompt", placeholder=EXAMPLE_PROMPTS[0], max_length=MAX_PROMPT_CHARS,
                                elem_id="prompt")
            with gr.Row():
                steps = gr.Slider(1, MAX_STEPS, value=default_steps, step=1, label="Steps")
                guidance = gr.Slider(0.0, MAX_GUIDANCE, value=default_guidance, step=0.5, label="Guidance")
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                n_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Number of images")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            gallery = gr.Gallery(label="Images", columns=MAX_IMAGES, height=320, object_fit="contain",
                                 preview=False, fit_columns=False, format="png", elem_id="gallery")
            gr.Examples(EXAMPLE_PROMPTS, inputs=prompt)
            inputs = [prompt, steps, guidance, seed, n_images]
            # preprocess=False here and below: the handlers check every raw value themselves, so a
            # malformed API request gets the same clear message as a slip in the browser, where
            # gradio's own checks would answer a bare "Error".
            generate.click(text_to_image, inputs, gallery, api_name="generate", preprocess=False,
                           concurrency_limit=concurrency, concurrency_id="model")
            prompt.submit(text_to_image, inputs, gallery, api_visibility="private", preprocess=False,
                          concurrency_limit=concurrency, concurrency_id="model")
        with gr.Tab("Image to text", id="i2t"):
            with gr.Row():
                image = gr.Image(label=f"Image (up to {max_upload_mb:g} MB)", type="filepath",
                                 sources=["upload", "clipboard"], height=320, elem_id="upload")
                with gr.Column():
                    caption_steps = gr.Slider(1, MAX_STEPS, value=default_steps, step=1, label="Steps")
                    caption_button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                    caption = gr.Textbox(label="Caption", interactive=False, elem_id="caption")
            # The handler decodes the file itself: a file that is not an image gets a clear message.
            caption_button.click(image_to_text, [image, caption_steps], caption, api_name="caption",
                                 preprocess=False, concurrency_limit=concurrency, concurrency_id="model")
    app.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    _refuse_malformed_calls(app)
    return app


def serve(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 10.0,
          block: bool = True, quiet: bool = False) -> None:
    """Start ``app``; with ``block=False`` return once it is listening (stop it with ``app.close()``)."""
    app.launch(server_name=host, server_port=port, max_file_size=int(max_upload_mb * 2**20),
               prevent_thread_lock=not block, share=False, inbrowser=False, ssr_mode=False, pwa=False,
               mcp_server=False, enable_monitoring=False, run_history=False, footer_links=["api"],
               show_error=False, quiet=quiet, css=_CSS)


def launch(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
           max_upload_mb: float = 10.0, queue_size: int = 32, concurrency: int = 1) -> None:
    """Load ``model`` (a pipeline folder, a Hub id, or None for the bundled one) and serve the demo."""
    pipeline = FlowTokPipeline.from_pretrained(model, device=device)
    app = build_app(pipeline, max_upload_mb=max_upload_mb, queue_size=queue_size, concurrency=concurrency)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the demo listens on %s: anyone who can reach this address can use it", host)
    serve(app, host=host, port=port, max_upload_mb=max_upload_mb)
