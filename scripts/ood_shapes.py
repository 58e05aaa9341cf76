"""An out-of-distribution test of image to text: shapes drawn by other code than flowtok's renderer.

    python scripts/ood_shapes.py                                  # the bundled model, 200 + 100 images
    python scripts/ood_shapes.py --model runs/new-model --out docs/results/ood.json --save-images /tmp/ood

The images are drawn here with PIL's ImageDraw, from geometry written apart from
flowtok.shapes.render: another palette (matplotlib's "tab" colours and gold, each jittered by up to
+-16 per channel), other proportions (a 0.40 inner radius for the star, an equilateral triangle, a
thicker cross, a narrower diamond), radii from 0.06 to 0.20 of the side (the world's "large" stops
at 0.145), centres anywhere the shape fits, up to 12 degrees of rotation, white or light grey or
light tinted backgrounds, 4x supersampled or aliased edges, canvases of 96 to 256 pixels, and JPEG
at quality 60 to 90. Set ``single``: one object per image; set ``multi``: two or three objects,
placed apart. Scored: the caption parses (flowtok.shapes.parse) for every image; for single objects,
the caption names the object's colour and shape (size and region reported too, not required).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from flowtok.config import atomic_write_text
from flowtok.errors import InvalidInputError
from flowtok.pipelines import FlowTokPipeline
from flowtok.shapes import parse

PALETTE = {"red": (214, 39, 40), "orange": (255, 127, 14), "yellow": (255, 215, 0), "green": (44, 160, 44),
           "blue": (31, 119, 180), "purple": (148, 103, 189), "pink": (227, 119, 194), "brown": (140, 86, 75)}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")


def _outline(shape: str) -> list[tuple[float, float]]:
    """The shape's outline in unit radius, point up, y down (the circle is drawn as an ellipse)."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(math.sin(a), -math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "diamond":
        return [(0, -1), (0.68, 0), (0, 1), (-0.68, 0)]
    if shape == "star":
        return [((1.0 if k % 2 == 0 else 0.4) * math.sin(k * math.pi / 5),
                 -(1.0 if k % 2 == 0 else 0.4) * math.cos(k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        t = 0.36
        return [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t),
                (-1, -t), (-t, -t)]
    raise ValueError(shape)


def draw(objects: list[dict], side: int, background: tuple[int, int, int], supersample: int) -> Image.Image:
    big = side * supersample
    image = Image.new("RGB", (big, big), background)
    pen = ImageDraw.Draw(image)
    for o in objects:
        cx, cy, r = o["x"] * big, o["y"] * big, o["radius"] * big
        if o["shape"] == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o["rgb"])
            continue
        a = math.radians(o["angle"])
        pts = [(cx + r * (x * math.cos(a) - y * math.sin(a)), cy + r * (x * math.sin(a) + y * math.cos(a)))
               for x, y in _outline(o["shape"])]
        pen.polygon(pts, fill=o["rgb"])
    return image.resize((side, side), Image.LANCZOS) if supersample > 1 else image


def sample_image(rng: np.random.Generator, count: int) -> tuple[Image.Image, list[dict]]:
    """One image of ``count`` objects that do not touch, and their descriptions."""
    while True:
        objects: list[dict] = []
        for _ in range(count):
            color, shape = list(PALETTE)[rng.integers(8)], SHAPES[rng.integers(6)]
            radius = float(rng.uniform(0.06, 0.20 if count == 1 else 0.13))
            rgb = tuple(int(np.clip(c + rng.integers(-16, 17), 0, 255)) for c in PALETTE[color])
            x, y = (float(rng.uniform(radius + 0.02, 0.98 - radius)) for _ in range(2))
            objects.append({"color": color, "shape": shape, "radius": radius, "x": x, "y": y,
                            "angle": float(rng.uniform(-12, 12)), "rgb": rgb})
        if all(math.hypot(a["x"] - b["x"], a["y"] - b["y"]) > a["radius"] + b["radius"] + 0.05
               for i, a in enumerate(objects) for b in objects[i + 1:]):
            break
    kind = rng.integers(3)
    background = ((255, 255, 255) if kind == 0 else (int(rng.integers(225, 246)),) * 3 if kind == 1
                  else tuple(int(rng.integers(230, 256)) for _ in range(3)))
    side = int(rng.choice([96, 128, 160, 200, 256]))
    image = draw(objects, side, background, supersample=4 if rng.random() < 0.7 else 1)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(rng.integers(60, 91)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), objects


def ood_set(n_single: int, n_multi: int, seed: int = 0) -> list[tuple[str, Image.Image, list[dict]]]:
    rng = np.random.default_rng([seed, 2026])
    out = [("single", *sample_image(rng, 1)) for _ in range(n_single)]
    return out + [("multi", *sample_image(rng, int(rng.integers(2, 4)))) for _ in range(n_multi)]


def _shown(path) -> str:
    """The model path relative to the working directory when below it (no machine paths in records)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the bundled model)")
    ap.add_argument("--n-single", type=int, default=200)
    ap.add_argument("--n-multi", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--raw", action="store_true", help="argmax captions instead of the grammar-constrained ones")
    ap.add_argument("--save-images", default=None, help="also write the images (PNG of the JPEG) here")
    ap.add_argument("--out", default=None, help="results JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = FlowTokPipeline.from_pretrained(args.model, device="cpu")
    if args.raw:
        pipe.defaults.pop("caption_grammar", None)
    items = ood_set(args.n_single, args.n_multi, args.seed)
    t0 = time.perf_counter()
    captions: list[str] = []
    for i in range(0, len(items), args.batch_size):
        captions += pipe.image_to_text([im for _, im, _ in items[i:i + args.batch_size]])
    records, parsed, named = [], {"single": 0, "multi": 0}, 0
    for k, ((group, image, objects), text) in enumerate(zip(items, captions)):
        try:
            scene = parse(text)
        except InvalidInputError:
            scene = None
        parsed[group] += scene is not None
        hit = (group == "single" and scene is not None and scene.num_objects == 1
               and (scene.objects[0].color, scene.objects[0].shape) == (objects[0]["color"], objects[0]["shape"]))
        named += hit
        records.append({"group": group, "caption": text, "parses": scene is not None, "named": hit,
                        "objects": [{k2: v for k2, v in o.items() if k2 != "rgb"} | {"rgb": list(o["rgb"])}
                                    for o in objects]})
        if args.save_images:
            Path(args.save_images).mkdir(parents=True, exist_ok=True)
            image.save(Path(args.save_images) / f"{k:04d}-{group}.png")
    result = {"protocol": {"script": "scripts/ood_shapes.py", "seed": args.seed, "n_single": args.n_single,
                           "n_multi": args.n_multi, "model": _shown(pipe.model_path),
                           "decoding": "argmax" if args.raw else pipe.defaults.caption_grammar or "argmax"},
              "single_named_color_and_shape": named / max(1, args.n_single),
              "single_parses": parsed["single"] / max(1, args.n_single),
              "multi_parses": parsed["multi"] / max(1, args.n_multi),
              "caption_s": round(time.perf_counter() - t0, 1), "records": records}
    print(f"single objects: colour and shape named {100 * result['single_named_color_and_shape']:.1f}%, "
          f"parse {100 * result['single_parses']:.1f}%; multi: parse {100 * result['multi_parses']:.1f}% "
          f"({result['caption_s']} s)")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
