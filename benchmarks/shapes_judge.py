"""How often the shapes judge reads a rendered scene back exactly, clean and after JPEG.

    python benchmarks/shapes_judge.py                          # 5,000 v2 scenes, clean and JPEG q75
    python benchmarks/shapes_judge.py --world v1 --n 5000      # the original world
    python benchmarks/shapes_judge.py --n 200 --out /tmp/j.json

Scenes are the stream ``flowtok.shapes.drawn_at(seed, i, split="any")`` for i < n (1 to 3 objects,
every drawing style, background and rotation of the world), rendered at ``--size``. JPEG images are
encoded and decoded with PIL at ``--quality``. The judge's target: >= 99.5% exact on both.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import Results, env_info, log  # noqa: E402

from flowtok.shapes import judge_batch, render_batch, tensor_to_pil  # noqa: E402
from flowtok.shapes.stream import drawn_at  # noqa: E402


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def measure(n: int, world: str, size: int = 128, quality: int = 75, seed: int = 0,
            batch: int = 250) -> dict[str, Any]:
    """Exact-read rates (clean, JPEG) over the first ``n`` scenes of the stream, with the first misses."""
    hits = {"clean": 0, "jpeg": 0}
    misses: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        samples = [drawn_at(seed, i, "any", None, world) for i in range(start, min(n, start + batch))]
        scenes = [s[0] for s in samples]
        images = render_batch(scenes, size, drawings=[s[2] for s in samples])
        pils = [tensor_to_pil(im) for im in images]
        for name, inputs in (("clean", pils), ("jpeg", [_jpeg(p, quality) for p in pils])):
            for k, (scene, read) in enumerate(zip(scenes, judge_batch(inputs))):
                if read == scene:
                    hits[name] += 1
                elif len(misses) < 20:
                    misses.append({"index": start + k, "input": name, "truth": scene.to_dict(),
                                   "read": None if read is None else read.to_dict(),
                                   "style": samples[k][2].style})
    return {"n": n, "world": world, "size": size, "jpeg_quality": quality, "seed": seed,
            "clean_exact": hits["clean"] / n, "jpeg_exact": hits["jpeg"] / n,
            "seconds": round(time.perf_counter() - t0, 1), "first_misses": misses}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--world", choices=("v1", "v2"), default="v2")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--quality", type=int, default=75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = Results(args.out, env_info(torch.device("cpu")), vars(args))
    item = measure(args.n, args.world, args.size, args.quality, args.seed)
    results.add({"name": f"judge {args.world} {args.size}px", "status": "ok", **item})
    log(f"{args.world}, {args.n} scenes at {args.size}px: clean {100 * item['clean_exact']:.2f}%, "
        f"JPEG q{args.quality} {100 * item['jpeg_exact']:.2f}% ({item['seconds']} s)")
    for m in item["first_misses"][:8]:
        log(f"  miss #{m['index']} ({m['input']}, {m['style']}): {m['truth']} read as {m['read']}")
    return results.data


if __name__ == "__main__":
    main()
