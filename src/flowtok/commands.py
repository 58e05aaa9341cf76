"""``flowtok generate``, ``flowtok caption``, ``flowtok showcase`` and ``flowtok demo``."""

from __future__ import annotations

import argparse
import html
import time
from pathlib import Path

from .errors import InvalidInputError

DEFAULT_SHOWCASE_PROMPTS = [
    "a large red circle in the top left",
    "a small blue square at the center",
    "a large green triangle on the right",
    "a small yellow star to the left of a large purple circle",
]


def check_device(device: str | None, option: str = "--device") -> str | None:
    """``device`` if this machine has it; else one InvalidInputError line (not torch's traceback)."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidInputError(f"{option} {device!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"{option} {device}: no CUDA GPU is available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InvalidInputError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError(f"{option} {device}: MPS is not available on this machine")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise InvalidInputError(f"{option} {device!r}: flowtok runs on cpu, cuda or mps")
    return device


def check_seed(seed: int, option: str = "--seed") -> int:
    if not 0 <= seed < 2**63:
        raise InvalidInputError(f"{option} must be from 0 to 2**63 - 1, got {seed}")
    return seed


def _pipeline(args: argparse.Namespace):
    import torch

    from .pipelines import FlowTokPipeline

    check_device(args.device)
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise InvalidInputError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    layers = fp8_layers(args)
    pipe = FlowTokPipeline.from_pretrained(args.model, device=args.device)
    mode = getattr(args, "fp8", None)
    if mode == "dynamic":
        pipe.quantize_fp8(layers=layers)
    elif mode == "static":  # calibrated on this run's own inputs: one extra pass, then the fast FP8 kernels
        prompts = [args.prompt] if getattr(args, "prompt", None) else None
        images = list(args.images) if getattr(args, "images", None) else None
        pipe.quantize_fp8(calibration_prompts=prompts, calibration_images=images, layers=layers)
    decoder_mode = getattr(args, "fp8_decoder", None)
    if decoder_mode is not None:  # static: calibrated on this run's prompt (one extra pass); else per-token
        prompt = getattr(args, "prompt", None)
        pipe.quantize_decoder_fp8(calibration_prompts=[prompt] if decoder_mode == "static" and prompt else None)
    return pipe


def fp8_layers(args: argparse.Namespace) -> tuple[str, ...] | None:
    """``--fp8-layers qkv,fc1``: the flow blocks' Linears to put in FP8 (None: all); refused without ``--fp8``
    (before the model loads; the names are checked by ``quantize_fp8``)."""
    text = getattr(args, "fp8_layers", None)
    if text is None:
        return None
    if not getattr(args, "fp8", None):
        raise InvalidInputError("--fp8-layers needs --fp8")
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_fp8_layers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fp8-layers", default=None, metavar="NAMES",
                   help="with --fp8: which Linears of the flow's blocks, comma-separated among qkv, proj, fc1, fc2 "
                        "(default: all four)")


def gemm_epilogues(args: argparse.Namespace) -> str:
    """``--gemm-epilogues``: who computes the fast path's GEMM epilogues (default ``auto``); refused without
    ``--fast`` (before the model loads)."""
    choice = getattr(args, "gemm_epilogues", None)
    if choice is not None and not getattr(args, "fast", False):
        raise InvalidInputError("--gemm-epilogues needs --fast")
    return choice or "auto"


def add_gemm_epilogues_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gemm-epilogues", choices=["auto", "pytorch", "triton"], default=None,
                   help="with --fast: who computes the fused flow's GEMM epilogues (fc1's GELU; an FP8 flow's fc2 "
                        "input and gated residual adds): auto (default: flowtok's Triton GEMMs for FP8 Linears, "
                        "cuBLAS for plain ones), pytorch (cuBLAS everywhere) or triton (flowtok's everywhere)")


def enable_fast(pipe, batch_size: int, epilogues: str = "auto") -> None:
    """``--fast``: :meth:`FlowTokPipeline.enable_fast_inference` with one CUDA graph per ``batch_size``
    (shorter batches are padded) and ``epilogues`` as its ``gemm_epilogues``. On a CPU (or MPS) nothing is
    compiled or captured: only the fused flow path, for batches large enough, and one stderr line says so."""
    import sys

    pipe.enable_fast_inference(batch_size=batch_size, gemm_epilogues=epilogues)
    fast = pipe.fast
    if not fast.cuda_graph:
        print(f"flowtok: --fast on {pipe.device.type}: torch.compile and the CUDA graph need a CUDA GPU; only the "
              f"fused flow path is on, for batches of {fast.fused_min_batch()} prompts or more", file=sys.stderr)


def _atomic_save_image(img, path: Path) -> None:
    from .errors import OutputError
    from .untrusted import write_atomically

    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only folder, a file where a folder should be
        raise OutputError(f"cannot write {path}: {exc.strerror or type(exc).__name__}") from None
    # An unpredictable temporary name opened with O_EXCL (a planted symlink is never followed), removed
    # if the encoder or the disk fails.
    write_atomically(path, lambda fh: img.save(fh, format=fmt), fsync=False)


def _output_paths(out: str, n: int) -> list[Path]:
    p = Path(out)
    if n == 1:
        return [p]
    return [p.with_name(f"{p.stem}-{i}{p.suffix or '.png'}") for i in range(n)]


def _generate(args: argparse.Namespace) -> int:
    import torch

    if (args.prompt is None) == (args.prompts_file is None):
        raise InvalidInputError("give either a prompt or --prompts-file, not both or neither")
    if args.prompts_file is not None:
        return _generate_from_file(args)
    if args.n < 1:
        raise InvalidInputError(f"--n must be at least 1, got {args.n}")
    if args.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_seed(args.seed)
    if args.steps is not None and args.steps < 1:
        raise InvalidInputError(f"--steps must be at least 1, got {args.steps}")
    if Path(args.output).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise InvalidInputError(f"output file must end in .png, .jpg or .webp: {args.output}")
    epilogues = gemm_epilogues(args)
    pipe = _pipeline(args)
    if args.fast:
        enable_fast(pipe, min(args.n, args.batch_size), epilogues)
    gen = torch.Generator(device=pipe.device).manual_seed(args.seed)
    paths = _output_paths(args.output, args.n)
    # Batch by batch: memory stays that of one batch whatever --n is, and each file appears (and is
    # printed) as soon as its batch is done.
    for start in range(0, args.n, args.batch_size):
        count = min(args.batch_size, args.n - start)
        images = pipe.text_to_image([args.prompt] * count, num_inference_steps=args.steps,
                                    guidance_scale=args.guidance, generator=gen, sampler=args.sampler)
        for img, path in zip(images, paths[start:start + count]):
            _atomic_save_image(img, path)
            print(path, flush=True)
    return 0


def _generate_from_file(args: argparse.Namespace) -> int:
    from .bulk import generate_from_file, iter_prompts

    next(iter_prompts(args.prompts_file), None)  # a missing file fails before the model loads
    if args.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    epilogues = gemm_epilogues(args)
    pipe = _pipeline(args)
    if args.fast:
        enable_fast(pipe, args.batch_size, epilogues)
    done, failed = generate_from_file(pipe, args.prompts_file, args.out_dir, _atomic_save_image,
                                      batch_size=args.batch_size, seed=args.seed, num_inference_steps=args.steps,
                                      guidance_scale=args.guidance, sampler=args.sampler)
    results = Path(args.out_dir) / "results.jsonl"
    print(f"{done} images in {args.out_dir}, {failed} prompts refused; {results}")
    if failed:
        raise InvalidInputError(f"{failed} of {done + failed} prompts in {args.prompts_file} were refused; "
                                f"their errors are in {results}")
    return 0


def _caption_folder(args: argparse.Namespace) -> int:
    from .bulk import caption_folder

    pipe = _pipeline(args)
    jsonl = args.jsonl or "captions.jsonl"
    done, failed = caption_folder(pipe, args.images[0], jsonl, batch_size=args.batch_size,
                                  num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler)
    print(f"{done} captions, {failed} files refused; {jsonl}")
    if failed:
        raise InvalidInputError(f"{failed} of {done + failed} files in {args.images[0]} could not be read; "
                                f"their errors are in {jsonl}")
    return 0


def _caption(args: argparse.Namespace) -> int:
    folders = [p for p in args.images if Path(p).is_dir()]
    if folders:
        if len(args.images) != 1:
            raise InvalidInputError("give one folder, or image files, not both")
        return _caption_folder(args)
    if args.jsonl:
        raise InvalidInputError("--jsonl is for captioning a folder")
    pipe = _pipeline(args)
    captions = pipe.image_to_text(list(args.images), num_inference_steps=args.steps,
                                  guidance_scale=args.guidance, sampler=args.sampler)
    for path, cap in zip(args.images, captions):
        print(f"{path}\t{cap}" if args.with_names else cap)
    return 0


def _page(title: str, sections: list[tuple[str, list[tuple[str, str]]]]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:8px;"
             "width:200px;vertical-align:top}img{width:192px;image-rendering:pixelated;border:1px solid #ccc}"
             "figcaption{font-size:13px}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for heading, items in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2><div>")
        for src, text in items:
            parts.append(f"<figure><img src='{html.escape(src)}'><figcaption>{html.escape(text)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _showcase(args: argparse.Namespace) -> int:
    """The README's main job: prompts -> images and images -> captions with the bundled model."""
    import numpy as np
    import torch

    from . import shapes
    from .config import atomic_write_text
    from .pipelines import BUNDLED_MODEL, PIPELINE_FILE

    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    sections = []
    model_ready = args.model is not None or (BUNDLED_MODEL / PIPELINE_FILE).is_file()
    if model_ready:
        pipe = _pipeline(args)
        prompts = args.prompts or DEFAULT_SHOWCASE_PROMPTS
        t0 = time.perf_counter()
        gen = torch.Generator(device=pipe.device).manual_seed(args.seed)
        steps = pipe.defaults.override(num_inference_steps=args.steps).num_inference_steps
        images = pipe.text_to_image(prompts, generator=gen, num_inference_steps=steps)
        t_gen = time.perf_counter() - t0
        items = []
        for i, (p, img) in enumerate(zip(prompts, images)):
            _atomic_save_image(img, out / "images" / f"t2i-{i}.png")
            items.append((f"images/t2i-{i}.png", p))
            print(f"text->image: {p!r} -> {out / 'images' / f't2i-{i}.png'}")
        sections.append((f"Text to image ({len(prompts)} images, {steps} steps, {t_gen:.1f} s)", items))
        if pipe.i2t_flow is not None and pipe.text_decoder is not None:
            rng = np.random.default_rng(args.seed)
            scenes = [shapes.sample_scene(rng, split="test") for _ in range(args.n_captions)]
            real = [shapes.render(s, size=pipe.image_tokenizer.config.image_size) for s in scenes]
            t0 = time.perf_counter()
            caps = pipe.image_to_text(real, num_inference_steps=steps)
            t_cap = time.perf_counter() - t0
            items = []
            for i, (img, cap) in enumerate(zip(real, caps)):
                _atomic_save_image(img, out / "images" / f"i2t-{i}.png")
                items.append((f"images/i2t-{i}.png", cap))
                print(f"image->text: {out / 'images' / f'i2t-{i}.png'} -> {cap!r}")
            sections.append((f"Image to text ({len(real)} captions, {t_cap:.1f} s)", items))
        title = f"flowtok showcase: {pipe.model_path.name if pipe.model_path else 'model'}"
    else:
        # No trained model yet: show the captioned-shapes world the model is trained on.
        rng = np.random.default_rng(args.seed)
        items = []
        for i in range(args.n_captions * 2):
            scene = shapes.sample_scene(rng)
            img = shapes.render(scene, size=128)
            _atomic_save_image(img, out / "images" / f"shape-{i}.png")
            items.append((f"images/shape-{i}.png", shapes.caption(scene, rng)))
        sections.append(("The captioned-shapes world (no bundled model found)", items))
        title = "flowtok showcase: the shapes world"
    atomic_write_text(out / "index.html", _page(title, sections))
    print(f"wrote {out / 'index.html'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import math

    check_device(args.device)
    if args.queue_size < 1 or args.concurrency < 1:
        raise InvalidInputError(f"--queue-size and --concurrency must be at least 1, got {args.queue_size} "
                                f"and {args.concurrency}")
    if not 1 <= args.port <= 65535:
        raise InvalidInputError(f"--port must be from 1 to 65535, got {args.port}")
    if not (math.isfinite(args.max_upload_mb) and 0 < args.max_upload_mb <= 1024):
        raise InvalidInputError(f"--max-upload-mb must be a number above 0 and at most 1024, got {args.max_upload_mb}")
    if args.static:
        from .serving.static import launch_static

        launch_static(args.model, args.onnx, args.site, args.host, args.port, args.precision, args.ort_web)
        return 0
    from .serving.demo import launch

    launch(model=args.model, host=args.host, port=args.port, device=args.device,
           max_upload_mb=args.max_upload_mb, queue_size=args.queue_size, concurrency=args.concurrency)
    return 0


def _json_option(text: str, option: str) -> dict:
    from .untrusted import parse_json

    try:
        value = parse_json(text)
    except ValueError as exc:
        raise InvalidInputError(f"{option}: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{option} must be a JSON object, got {text!r}")
    return value


def _assemble(args: argparse.Namespace) -> int:
    import torch

    from .pipelines import assemble_pipeline
    from .text import TextEncoderSpec

    comps = {name: getattr(args, name) for name in
             ("tokenizer", "text_projector", "t2i_flow", "i2t_flow", "text_decoder") if getattr(args, name)}
    defaults = _json_option(args.defaults, "--defaults") if args.defaults else None
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    text_encoder = TextEncoderSpec.parse(args.text_encoder).to_dict()
    out = assemble_pipeline(args.out, comps, text_encoder=text_encoder, defaults=defaults, dtype=dtype)
    print(out)
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="pipeline folder or Hub id (default: the bundled flowtok-shapes)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--fp8", nargs="?", const="static", choices=["static", "dynamic"], default=None,
                   help="FP8 flow transformers (needs a Hopper / Ada GPU; combines with --fast, whose fused flow path "
                        "then runs FP8); static (default): scales calibrated on this run's inputs, one extra "
                        "pass; dynamic: per-token scales, slower")
    add_fp8_layers_arg(p)


FAST_HELP = ("the fast path (pipe.enable_fast_inference): on a CUDA GPU compiled flow and decoder blocks, the fused "
             "flow path for large batches and one CUDA graph per batch size (the first batch pays the compile); "
             "on a CPU only the fused flow path, for large batches. Same images up to kernel rounding")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="text -> image",
                       description="Generate images for a prompt, or one image per line of --prompts-file.")
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--prompts-file", default=None,
                   help="a text file, one prompt per line: one image each into --out-dir, plus results.jsonl")
    p.add_argument("--out-dir", default="outputs/generate", help="folder for --prompts-file's images")
    p.add_argument("-o", "--output", default="out.png", help="output file; with --n > 1, -0, -1, ... are appended")
    p.add_argument("--n", type=int, default=1, help="number of images")
    p.add_argument("--batch-size", type=int, default=16, help="images generated at once, or prompts per batch with --prompts-file "
                   "(memory grows with it)")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=["euler", "heun", "euler-upstream"], default=None,
                   help="ODE solver (default: the model's); euler-upstream: the FlowTok release's grid, "
                        "to reproduce its samples")
    p.add_argument("--fast", action="store_true", help=FAST_HELP)
    add_gemm_epilogues_arg(p)
    p.add_argument("--fp8-decoder", nargs="?", const="static", choices=["static", "dynamic"], default=None,
                   help="the image decoder's blocks in FP8 (needs a Hopper / Ada GPU; combines with --fast); "
                        "static (default): scales calibrated on this run's prompt, one extra pass (with "
                        "--prompts-file: per-token scales); dynamic: per-token scales")
    _add_model_args(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("caption", help="image -> text",
                       description="Print one caption per image on stdout; for a folder, write a JSONL file.")
    p.add_argument("images", nargs="+", help="image files, or one folder (searched recursively)")
    p.add_argument("--jsonl", default=None, help="with a folder: the JSONL output (default captions.jsonl)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch with a folder")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--sampler", choices=["euler", "heun", "euler-upstream"], default=None,
                   help="ODE solver (default: the model's); euler-upstream: the FlowTok release's grid, "
                        "to reproduce its samples")
    p.add_argument("--with-names", action="store_true", help="print 'file<TAB>caption'")
    _add_model_args(p)
    p.set_defaults(func=_caption)

    p = sub.add_parser("showcase", help="run the bundled model on sample prompts and images; write an HTML page")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--prompts", nargs="*", default=None)
    p.add_argument("--n-captions", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    _add_model_args(p)
    p.set_defaults(func=_showcase)

    p = sub.add_parser("assemble", help="gather trained component folders into one pipeline folder")
    p.add_argument("--out", required=True)
    for name in ("tokenizer", "text_projector", "t2i_flow", "i2t_flow", "text_decoder"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=f"{name} folder")
    p.add_argument("--text-encoder", default="minilm",
                   help='text encoder: a name (minilm) or a JSON spec, e.g. \'{"name": "clip", "path": "..."}\'')
    p.add_argument("--defaults", default=None, help='JSON sampling defaults, e.g. {"guidance_scale": 2.0}')
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16", help="storage precision")
    p.set_defaults(func=_assemble)

    p = sub.add_parser("demo", help="web demo (gradio) on localhost: text to image, image to text")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=10.0)
    p.add_argument("--queue-size", type=int, default=32, help="requests waiting beyond this are refused as busy")
    p.add_argument("--concurrency", type=int, default=1, help="requests processed at once")
    p.add_argument("--static", action="store_true",
                   help="serve a static page that runs the model in the browser (onnxruntime-web); no server inference")
    p.add_argument("--onnx", default=None, help="with --static: an export from `flowtok export onnx` (default: "
                                                 "export --model once into SITE-export/)")
    p.add_argument("--site", default="outputs/web", help="with --static: where the page's files are laid out")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16",
                   help="with --static: which graph files the page downloads")
    p.add_argument("--ort-web", default=None, help="with --static: onnxruntime-web's dist folder (default: make web's)")
    _add_model_args(p)
    p.set_defaults(func=_demo)


