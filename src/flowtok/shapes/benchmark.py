"""Benchmarks on the shapes world, where every prompt has an exact answer.

The functions take plain callables, so they score any model (or a fake one in tests):

* ``generate_fn(prompts, generator) -> [B, 3, H, W]`` in [0, 1] for :func:`evaluate_t2i`;
* ``caption_fn(images [B, 3, H, W]) -> list[str]`` for :func:`evaluate_i2t`;
* ``reconstruct_fn(images) -> images`` for :func:`evaluate_recon`;
* ``round_trip_fn(prompts) -> list[str]`` (text -> text latent -> caption) for :func:`evaluate_text`.

Prompts come in groups of (object count) x (split): ``seen`` scenes follow the training rule,
``held_out`` scenes contain a colour-shape pair or a relation never shown in training
(:func:`flowtok.shapes.scene_split`), so the two are always reported apart. Scenes of group
``(k, split)`` come from ``numpy.random.default_rng([seed, k, split_index])``: a group's prompts do
not change when other groups are added or removed. ``world`` picks how scenes are drawn
(:mod:`flowtok.shapes.world`): ``"v2"`` (the default) draws each scene with the variation of the
world, from ``default_rng([seed, k, split_index, 1])``, and ``"v1"`` the original canonical way; both
worlds use the same scenes, and the prompts differ only where v1's would call a tinted background white.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from ..errors import InvalidInputError
from ..eval import captions as caplib
from ..eval import fid as fidlib
from ..eval.recon import PROTOCOL as RECON_PROTOCOL
from ..eval.recon import psnr, ssim
from .captions import all_captions, caption, parse
from .judge import attribute_matches, judge_batch, scene_matches
from .render import render_batch
from .stream import sample_at, shapes_batch
from .world import DEFAULT_WORLD, Drawing, Scene, check_world, draw_scene, sample_scene

logger = logging.getLogger(__name__)

GenerateFn = Callable[[list[str], torch.Generator], torch.Tensor]
CaptionFn = Callable[[torch.Tensor], list[str]]
ReconstructFn = Callable[[torch.Tensor], torch.Tensor]
RoundTripFn = Callable[[list[str]], list[str]]

SPLIT_NAMES = {"train": "seen", "test": "held_out"}
ATTRIBUTES = ("count", "color", "shape", "size", "position")
# Real images for the FID reference come from their own stream, never from the prompts scored.
FID_REFERENCE_SEED = 20_250_313


@dataclass
class BenchItem:
    """One prompt of the benchmark with its ground truth."""

    num_objects: int
    split: str  # "train" or "test" (flowtok.shapes.scene_split)
    scene: Scene
    prompt: str
    references: list[str] = field(default_factory=list)
    drawing: Drawing | None = None  # how the scene is drawn for image to text (None: v1's drawing)

    @property
    def group(self) -> str:
        return f"{self.num_objects}-{SPLIT_NAMES[self.split]}"


def _check_groups(objects: Sequence[int], splits: Sequence[str]) -> None:
    bad = [k for k in objects if k not in (1, 2, 3)]
    if bad or not objects:
        raise InvalidInputError(f"object counts must be among 1, 2, 3, got {list(objects)}")
    bad_s = [s for s in splits if s not in SPLIT_NAMES]
    if bad_s or not splits:
        raise InvalidInputError(f"splits must be among 'train' (seen) and 'test' (held out), got {list(splits)}")


def benchmark_items(n_per_group: int, seed: int = 0, objects: Sequence[int] = (1, 2, 3),
                    splits: Sequence[str] = ("train", "test"), world: str = DEFAULT_WORLD) -> list[BenchItem]:
    """``n_per_group`` prompts for every (object count, split) group, with every paraphrase as reference."""
    if n_per_group < 1:
        raise InvalidInputError(f"the number of prompts per group must be >= 1, got {n_per_group}")
    _check_groups(objects, splits)
    check_world(world)
    items = []
    for k in objects:
        for split in splits:
            rng = np.random.default_rng([seed, k, list(SPLIT_NAMES).index(split)])
            draw_rng = np.random.default_rng([seed, k, list(SPLIT_NAMES).index(split), 1])
            for _ in range(n_per_group):
                scene = sample_scene(rng, num_objects=k, split=split)
                drawing = draw_scene(scene, world, draw_rng)
                text = caption(scene, rng, white_background=drawing.plain_white)
                items.append(BenchItem(k, split, scene, text, all_captions(scene), drawing))
    return items


def _accuracy(preds: Sequence[Scene | None], truths: Sequence[Scene]) -> dict:
    """Exact-scene and per-attribute accuracy (fractions) plus the share of unreadable outputs."""
    n = len(truths)
    matches = [attribute_matches(p, t) for p, t in zip(preds, truths)]
    out: dict = {"n": n, "exact": sum(scene_matches(p, t) for p, t in zip(preds, truths)) / n}
    for a in ATTRIBUTES:
        out[a] = sum(m[a] for m in matches) / n
    out["unreadable"] = sum(p is None for p in preds) / n
    return out


def _breakdown(items: Sequence[BenchItem], preds: Sequence[Scene | None]) -> dict:
    """Accuracy per split (seen / held_out), each with its total and per object count."""
    out: dict = {}
    for split, name in SPLIT_NAMES.items():
        idx = [i for i, it in enumerate(items) if it.split == split]
        if not idx:
            continue
        block: dict = {"all": _accuracy([preds[i] for i in idx], [items[i].scene for i in idx]), "objects": {}}
        for k in sorted({items[i].num_objects for i in idx}):
            sub = [i for i in idx if items[i].num_objects == k]
            block["objects"][str(k)] = _accuracy([preds[i] for i in sub], [items[i].scene for i in sub])
        out[name] = block
    return out


def confusions(items: Sequence[BenchItem], preds: Sequence[Scene | None], top: int = 20) -> list[dict]:
    """The most frequent object-level misreadings: for every scene read with the right object count, each
    object whose (size, colour, shape) differs from the truth's object in the same place, counted per
    split as ``{"split", "truth", "read", "n"}`` (e.g. "large yellow diamond" read as "large yellow cross"),
    most frequent first. Says *which* combinations fail where the accuracy table says how often."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for it, pred in zip(items, preds):
        if pred is None or pred.num_objects != it.scene.num_objects:
            continue
        for t, p in zip(it.scene.objects, pred.objects):
            if (t.size, t.color, t.shape) != (p.size, p.color, p.shape):
                counts[(SPLIT_NAMES[it.split], f"{t.size} {t.color} {t.shape}", f"{p.size} {p.color} {p.shape}")] += 1
    return [{"split": sp, "truth": t, "read": r, "n": n} for (sp, t, r), n in counts.most_common(top)]


def _check_images(images: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[:2] != (n, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidInputError(f"{what} must return a [{n}, 3, H, W] tensor, got {shape}")
    return images.detach().float().cpu().clamp(0, 1)


def _batched(seq: Sequence, batch_size: int) -> Iterable[Sequence]:
    if batch_size < 1:
        raise InvalidInputError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, len(seq), batch_size):
        yield seq[start:start + batch_size]


def _generate(generate_fn: GenerateFn, prompts: Sequence[str], generator: torch.Generator,
              batch_size: int) -> torch.Tensor:
    out = []
    for chunk in _batched(list(prompts), batch_size):
        out.append(_check_images(generate_fn(list(chunk), generator), len(chunk), "generate_fn"))
    return torch.cat(out)


def shapes_reference_stats(extractor: fidlib.InceptionFeatures, n: int, size: int, batch_size: int = 32,
                           split: str = "train", cache_dir: str | None = None,
                           world: str = DEFAULT_WORLD) -> tuple[fidlib.FIDStats, dict]:
    """Inception statistics of ``n`` real shapes images (cached), and a description of the set."""
    key = f"shapes-{split}-seed{FID_REFERENCE_SEED}-n{n}-{size}px" + ("" if world == "v1" else f"-{world}")

    def batches() -> Iterable[torch.Tensor]:
        for start in range(0, n, batch_size):
            yield shapes_batch(FID_REFERENCE_SEED, start, min(batch_size, n - start), split=split,
                               size=size, world=world)[0]

    stats, path = fidlib.cached_stats(key, extractor, batches, cache_dir)
    return stats, {"reference_set": key, "reference_n": n, "reference_size": size, "stats_file": str(path)}


def generated_fid(generate_fn: GenerateFn, prompts: Sequence[str], generator: torch.Generator,
                  batch_size: int = 16, extractor: fidlib.InceptionFeatures | None = None,
                  reference: fidlib.FIDStats | None = None, reference_info: dict | None = None,
                  reference_fn: Callable[[int], tuple[fidlib.FIDStats, dict]] | None = None) -> dict:
    """FID (and KID) of images generated for ``prompts`` against reference statistics.

    The reference is ``reference``, or ``reference_fn(image_size)`` once the generated size is
    known, or by default real shapes renders at that size (cached).
    """
    prompts = list(prompts)
    if len(prompts) < 2:
        raise InvalidInputError(f"FID needs at least 2 prompts, got {len(prompts)}")
    extractor = extractor if extractor is not None else fidlib.InceptionFeatures()
    t0 = time.perf_counter()
    size = 0

    def batches() -> Iterable[torch.Tensor]:
        nonlocal size
        for chunk in _batched(prompts, batch_size):
            images = _generate(generate_fn, chunk, generator, batch_size)
            size = int(images.shape[-1])
            yield images

    gen_stats = fidlib.stats_from_batches(extractor, batches())
    gen_s = time.perf_counter() - t0
    if reference is None:
        if reference_fn is None:
            reference, reference_info = shapes_reference_stats(extractor, len(prompts), size, batch_size)
        else:
            reference, reference_info = reference_fn(size)
    kid = None
    if reference.features is not None and gen_stats.features is not None:
        kid = fidlib.kernel_inception_distance(gen_stats.features, reference.features)
    return {"fid": fidlib.fid_from_stats(gen_stats, reference), "kid": kid, "generated_n": gen_stats.n,
            "generated_size": size, **(reference_info or {}), "inception": extractor.protocol(),
            "generate_and_features_s": round(gen_s, 3), "total_s": round(time.perf_counter() - t0, 3)}


def evaluate_t2i(generate_fn: GenerateFn, n_per_group: int = 16, seed: int = 0,
                 objects: Sequence[int] = (1, 2, 3), splits: Sequence[str] = ("train", "test"),
                 batch_size: int = 16, fid_n: int = 0, extractor: fidlib.InceptionFeatures | None = None,
                 generator_device: str | torch.device = "cpu", world: str = DEFAULT_WORLD) -> dict:
    """Judge accuracy of generated images per group and attribute, and optionally FID.

    The judge (:func:`flowtok.shapes.judge`) reads each generated image back into a scene,
    compared with the scene the prompt describes. With ``fid_n > 0``, ``fid_n`` more images are
    generated from fresh seen-split prompts and compared with as many real renders (cached stats).
    One ``torch.Generator`` seeded with ``seed`` feeds every call in order, so results depend on
    ``batch_size`` as well as ``seed``; both are recorded.
    """
    items = benchmark_items(n_per_group, seed, objects, splits, world)
    generator = torch.Generator(generator_device).manual_seed(seed)
    t0 = time.perf_counter()
    images = _generate(generate_fn, [it.prompt for it in items], generator, batch_size)
    gen_s = time.perf_counter() - t0
    preds = judge_batch(images)
    results: dict = {
        "task": "t2i",
        "protocol": {
            "benchmark": "flowtok shapes world, judge-exact accuracy", "world": world,
            "n_per_group": n_per_group, "seed": seed, "objects": list(objects),
            "splits": [SPLIT_NAMES[s] for s in splits], "n_prompts": len(items), "batch_size": batch_size,
            "generator": f"torch.Generator('{generator_device}').manual_seed(seed), shared across batches",
            "judge": "flowtok.shapes.judge (exact colour, shape, size, position)",
            "image_size": int(images.shape[-1]),
        },
        "accuracy": _breakdown(items, preds),
        "confusions": confusions(items, preds),
        "timing": {"generate_s": round(gen_s, 3), "images": len(items)},
    }
    if fid_n > 0:
        prompts = [sample_at(seed, i, "train", world=world)[1] for i in range(fid_n)]
        ext = extractor if extractor is not None else fidlib.InceptionFeatures()
        results["fid"] = generated_fid(generate_fn, prompts, generator, batch_size, ext, reference_fn=lambda size:
                                       shapes_reference_stats(ext, fid_n, size, batch_size, world=world))
        results["fid"]["prompts"] = f"shapes seen-split stream seed {seed}, samples 0..{fid_n - 1}"
    return results


def _read_caption(text: str) -> Scene | None:
    try:
        return parse(text)
    except InvalidInputError:
        return None


def _check_captions(out: object, n: int, what: str) -> list[str]:
    if not isinstance(out, (list, tuple)) or len(out) != n or not all(isinstance(c, str) for c in out):
        raise InvalidInputError(f"{what} must return {n} strings, got {out!r:.80}")
    return list(out)


def evaluate_i2t(caption_fn: CaptionFn, n_per_group: int = 16, seed: int = 0,
                 objects: Sequence[int] = (1, 2, 3), splits: Sequence[str] = ("train", "test"),
                 batch_size: int = 16, image_size: int = 128, metrics: bool = True, spice: bool = True,
                 world: str = DEFAULT_WORLD, jpeg_quality: int | None = None) -> dict:
    """Caption rendered scenes: exact-scene accuracy (via :func:`~flowtok.shapes.parse`) and COCO metrics.

    Each image's references are all paraphrases of its scene (:func:`~flowtok.shapes.all_captions`),
    so a caption that describes the scene correctly in any template scores BLEU-1 = 1. Images are
    drawn in ``world``, and with ``jpeg_quality`` passed through JPEG at that quality first.
    """
    items = benchmark_items(n_per_group, seed, objects, splits, world)
    preds: list[str] = []
    t0 = time.perf_counter()
    for chunk in _batched(items, batch_size):
        images = render_batch([it.scene for it in chunk], image_size, drawings=[it.drawing for it in chunk])
        if jpeg_quality is not None:
            images = jpeg_round_trip(images, jpeg_quality)
        preds.extend(_check_captions(caption_fn(images), len(chunk), "caption_fn"))
    cap_s = time.perf_counter() - t0

    scenes = [_read_caption(p) for p in preds]
    results: dict = {
        "task": "i2t",
        "protocol": {
            "benchmark": "flowtok shapes world, exact-scene accuracy of parsed captions", "world": world,
            "jpeg_quality": jpeg_quality, "n_per_group": n_per_group, "seed": seed, "objects": list(objects),
            "splits": [SPLIT_NAMES[s] for s in splits], "n_images": len(items), "batch_size": batch_size,
            "image_size": image_size, "references": "all paraphrases of the scene (flowtok.shapes.all_captions)",
            "parser": "flowtok.shapes.parse (unparseable caption = every attribute wrong)",
        },
        "accuracy": _breakdown(items, scenes),
        "confusions": confusions(items, scenes),
        "timing": {"caption_s": round(cap_s, 3), "images": len(items)},
        "examples": [{"group": it.group, "prompt_scene": it.prompt, "caption": p}
                     for it, p in list(zip(items, preds))[:: max(1, len(items) // 6)]],
    }
    if metrics:
        results["protocol"]["caption_metrics"] = caplib.protocol()
        results["caption_metrics"] = {}
        for split, name in SPLIT_NAMES.items():
            idx = [i for i, it in enumerate(items) if it.split == split]
            if idx:
                results["caption_metrics"][name] = caplib.caption_metrics(
                    [preds[i] for i in idx], [items[i].references for i in idx], spice=spice)
    return results


def evaluate_text(round_trip_fn: RoundTripFn, n_per_group: int = 16, seed: int = 0,
                  objects: Sequence[int] = (1, 2, 3), splits: Sequence[str] = ("train", "test"),
                  batch_size: int = 16, world: str = DEFAULT_WORLD) -> dict:
    """The text side alone: each benchmark prompt through the text projector and back through the text
    decoder (``round_trip_fn(prompts) -> captions``), scored like image to text (parsed, exact-scene).

    Image to text ends in the same decoder, so this is what it reaches when its flow lands exactly on the
    projector's latent: a pair that does not survive the round trip is not captioned right. ``verbatim``
    counts outputs equal to the prompt word for word (a paraphrase of the same scene is still exact)."""
    items = benchmark_items(n_per_group, seed, objects, splits, world)
    preds: list[str] = []
    t0 = time.perf_counter()
    for chunk in _batched(items, batch_size):
        preds.extend(_check_captions(round_trip_fn([it.prompt for it in chunk]), len(chunk), "round_trip_fn"))
    seconds = time.perf_counter() - t0
    scenes = [_read_caption(p) for p in preds]
    return {
        "task": "text",
        "protocol": {
            "benchmark": "flowtok shapes world, text -> text latent -> text decoder, exact-scene accuracy",
            "world": world, "n_per_group": n_per_group, "seed": seed, "objects": list(objects),
            "splits": [SPLIT_NAMES[s] for s in splits], "n_prompts": len(items), "batch_size": batch_size,
            "parser": "flowtok.shapes.parse (unparseable caption = every attribute wrong)",
        },
        "accuracy": _breakdown(items, scenes),
        "confusions": confusions(items, scenes),
        "verbatim": sum(p == it.prompt for p, it in zip(preds, items)) / len(items),
        "timing": {"round_trip_s": round(seconds, 3), "prompts": len(items)},
        "examples": [{"group": it.group, "prompt": it.prompt, "caption": p}
                     for it, p in list(zip(items, preds))[:: max(1, len(items) // 6)]],
    }


def shapes_image_batches(n: int, seed: int = 0, image_size: int = 128, batch_size: int = 16,
                         world: str = DEFAULT_WORLD) -> Iterable[torch.Tensor]:
    """``n`` rendered shapes images (any split) from the stream ``seed``, in batches."""
    for start in range(0, n, batch_size):
        yield shapes_batch(seed, start, min(batch_size, n - start), split="any", size=image_size, world=world)[0]


def jpeg_round_trip(images: torch.Tensor, quality: int) -> torch.Tensor:
    """``[B, 3, H, W]`` images in [0, 1] encoded as JPEG at ``quality`` (PIL) and decoded again."""
    import io

    from PIL import Image

    from .render import tensor_to_pil

    out = []
    for image in images:
        buf = io.BytesIO()
        tensor_to_pil(image).save(buf, format="JPEG", quality=quality)
        arr = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.uint8)
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)


def evaluate_recon(reconstruct_fn: ReconstructFn, images: Iterable[torch.Tensor] | None = None,
                   n: int = 64, seed: int = 0, image_size: int = 128, batch_size: int = 16, fid: bool = True,
                   extractor: fidlib.InceptionFeatures | None = None, source: str | None = None,
                   world: str = DEFAULT_WORLD) -> dict:
    """PSNR, SSIM and rFID of ``reconstruct_fn`` over ``images`` (batches) or ``n`` shapes renders.

    rFID is the FID between the originals and their reconstructions (both sets of the same size,
    so it is biased upwards for small ``n``: compare values only at equal ``n``).
    """
    from_shapes = images is None
    if images is None:
        images = shapes_image_batches(n, seed, image_size, batch_size, world)
        source = source or f"shapes world {world} (any split), stream seed {seed}, {image_size}px"
    if fid and extractor is None:
        extractor = fidlib.InceptionFeatures()
    psnrs, ssims, feats_real, feats_rec = [], [], [], []
    count, t_rec, t0 = 0, 0.0, time.perf_counter()
    for batch in images:
        batch = batch.float().clamp(0, 1)
        t1 = time.perf_counter()
        rec = _check_images(reconstruct_fn(batch), batch.shape[0], "reconstruct_fn")
        t_rec += time.perf_counter() - t1
        if rec.shape != batch.shape:
            raise InvalidInputError(f"reconstruct_fn changed the image shape {tuple(batch.shape)} -> {tuple(rec.shape)}")
        psnrs.append(psnr(rec, batch))
        ssims.append(ssim(rec, batch))
        if fid and extractor is not None:
            feats_real.append(extractor.features(batch))
            feats_rec.append(extractor.features(rec))
        count += batch.shape[0]
    if count == 0:
        raise InvalidInputError("no images to reconstruct")
    p, s = torch.cat(psnrs), torch.cat(ssims)
    results: dict = {
        "task": "recon",
        "protocol": {"source": source or "user images", "n": count, "batch_size": batch_size,
                     "image_size": image_size if from_shapes else None, **RECON_PROTOCOL},
        "psnr": float(p.mean()), "psnr_std": float(p.std()) if count > 1 and torch.isfinite(p).all() else 0.0,
        "ssim": float(s.mean()), "ssim_std": float(s.std()) if count > 1 else 0.0,
        "timing": {"reconstruct_s": round(t_rec, 3), "total_s": None},
    }
    if fid and extractor is not None:
        a = fidlib.FIDStats.from_features(np.concatenate(feats_real))
        b = fidlib.FIDStats.from_features(np.concatenate(feats_rec))
        results["rfid"] = fidlib.fid_from_stats(a, b)
        # from_features keeps the features by default.
        results["rkid"] = fidlib.kernel_inception_distance(cast(np.ndarray, a.features), cast(np.ndarray, b.features))
        results["protocol"]["rfid"] = {"n": count, "inception": extractor.protocol()}
    results["timing"]["total_s"] = round(time.perf_counter() - t0, 3)
    return results
