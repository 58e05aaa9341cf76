"""Which image degradations make the shapes judge misread a scene, and in which attribute.

    python scripts/judge_robustness.py                        # 200 held-out v2 scenes, every degradation
    python scripts/judge_robustness.py --n 100 --only blur,flat --out /tmp/robust.json
    python scripts/judge_robustness.py --tokenizer runs/shapes/tokenizer/final   # another tokenizer's recons

Scenes: ``drawn_at(seed, i, "test", None, world)`` for i < n (the held-out split, 1-3 objects, the
images ``shapes_batch`` gives), at 128 px. Each degradation is one an autoencoder typically adds:
Gaussian blur (PIL radius = sigma in pixels), a global colour shift (a random RGB direction of the
given length), contrast loss towards the image mean, smooth low-frequency error (a 4 x 4 random
field, bicubic), patch seams (a constant error per 8 x 8 patch), per-pixel noise, ringing (an ideal
low-pass: Gibbs oscillation along edges), halos (unsharp masking), desaturation, the background
flattened (texture and noise removed: the same drawing without them), JPEG, mixes of these on the
flattened background, and a tokenizer's reconstructions (the bundled one by default). Reported per
degradation: PSNR against the clean render (the mean of per-image PSNRs, as the tokenizer stage and
``flowtok eval recon`` report it), the judge's exact rate, and the share of scenes with the wrong
object count, and, among scenes whose count is right, with a wrong colour / shape / size (any
object), region (1 object) or relation (2-3 objects). The judge reads no background attribute: a
background misread shows up as a wrong count (a stray blob or a lost object).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from flowtok.shapes import judge_batch, render_batch, tensor_to_pil
from flowtok.shapes.stream import drawn_at
from flowtok.shapes.world import Scene

Degrade = Callable[[torch.Tensor], torch.Tensor]
BUNDLED_TOKENIZER = "src/flowtok/pretrained/flowtok-shapes/tokenizer"


def _per_pil(images: torch.Tensor, fn: Callable[[Image.Image], Image.Image]) -> torch.Tensor:
    out = [torch.from_numpy(np.asarray(fn(tensor_to_pil(im)), dtype=np.uint8).copy()) for im in images]
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255.0


def blur(radius: float) -> Degrade:
    return lambda x: _per_pil(x, lambda p: p.filter(ImageFilter.GaussianBlur(radius)))


def jpeg(quality: int) -> Degrade:
    def one(p: Image.Image) -> Image.Image:
        p.save(buf := io.BytesIO(), format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return lambda x: _per_pil(x, one)


def shift(length: float) -> Degrade:
    def fn(x: torch.Tensor) -> torch.Tensor:
        d = torch.randn(x.shape[0], 3, 1, 1, generator=torch.Generator().manual_seed(1))
        return x + length * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return fn


def contrast(c: float) -> Degrade:
    return lambda x: c * x + (1 - c) * x.mean((1, 2, 3), keepdim=True)


def field(std: float, cells: int, mode: str = "bicubic") -> Degrade:
    """Additive error: a random ``cells`` x ``cells`` field per channel, upsampled (``nearest``:
    a constant error per patch, like a patch-wise decoder's seams)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        g = torch.randn(x.shape[0], 3, cells, cells, generator=torch.Generator().manual_seed(cells))
        return x + std * F.interpolate(g, size=x.shape[-2:], mode=mode)
    return fn


def ringing(cutoff: int) -> Degrade:
    """Ideal low-pass keeping spatial frequencies below ``cutoff`` cycles per image."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        f = torch.fft.fftfreq(x.shape[-1]).abs() * x.shape[-1]
        keep = ((f.view(1, -1) ** 2 + f.view(-1, 1) ** 2).sqrt() <= cutoff).float()
        return torch.fft.ifft2(torch.fft.fft2(x) * keep).real
    return fn


def halo(amount: float) -> Degrade:
    return lambda x: x + amount * (x - blur(2.0)(x))


def desaturate(amount: float) -> Degrade:
    return lambda x: x + amount * ((0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]) - x)


def chain(*fns: Degrade) -> Degrade:
    def fn(x: torch.Tensor) -> torch.Tensor:
        for f in fns:
            x = f(x).clamp(0, 1)
        return x
    return fn


def tokenizer_recon(path: str) -> Degrade:
    from flowtok.tokenizer import ImageTokenizer

    tok = ImageTokenizer.from_pretrained(path, device="cpu").eval()
    return lambda x: torch.cat([tok.reconstruct(b) for b in x.split(16)])


def degradations(tokenizer: str) -> dict[str, Degrade | None]:
    """Name -> function; ``None`` marks the flat-background render (drawn, not computed)."""
    d: dict[str, Degrade | None] = {"clean": lambda x: x}
    d |= {f"blur r{r}": blur(r) for r in (1.0, 1.5, 2.0, 2.5, 3.0)}
    d |= {f"shift {s}": shift(s) for s in (0.05, 0.1, 0.15)}
    d |= {f"contrast x{c}": contrast(c) for c in (0.8, 0.6)}
    d |= {f"lowfreq std {s}": field(s, 4) for s in (0.02, 0.04, 0.08)}
    d |= {f"patch seams std {s}": field(s, 16, "nearest") for s in (0.02, 0.04)}
    d |= {f"noise std {s}": field(s, 128, "nearest") for s in (0.05, 0.1)}
    d |= {f"ringing lp{c}": ringing(c) for c in (32, 20)}
    d |= {f"halo {a}": halo(a) for a in (0.5, 1.0)}
    d |= {f"desaturate {a}": desaturate(a) for a in (0.25, 0.5)}
    d["flat"] = None
    d |= {f"jpeg q{q}": jpeg(q) for q in (30, 50)}
    d["flat+blur r1.5+shift 0.05+lowfreq 0.02"] = chain(blur(1.5), shift(0.05), field(0.02, 4))
    d["flat+blur r2+shift 0.05+lowfreq 0.02+seams 0.02"] = chain(blur(2.0), shift(0.05), field(0.02, 4),
                                                                  field(0.02, 16, "nearest"))
    d["flat+blur r2.5+shift 0.1"] = chain(blur(2.5), shift(0.1))
    if tokenizer:
        d[f"tokenizer {tokenizer}"] = tokenizer_recon(tokenizer)
    return d


def score(truth: list[Scene], read: list[Scene | None]) -> dict[str, float]:
    n = len(truth)
    tally = dict.fromkeys(("exact", "count", "color", "shape", "size", "region", "relation"), 0)
    for t, r in zip(truth, read):
        tally["exact"] += r == t
        if r is None or r.num_objects != t.num_objects:
            tally["count"] += 1
            continue
        pairs = list(zip(r.objects, t.objects))
        for attr in ("color", "shape", "size"):
            tally[attr] += any(getattr(a, attr) != getattr(b, attr) for a, b in pairs)
        tally["region" if t.num_objects == 1 else "relation"] += r.layout != t.layout
    return {k: v / n for k, v in tally.items()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--world", choices=("v1", "v2"), default="v2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test")
    p.add_argument("--tokenizer", default=BUNDLED_TOKENIZER, help="tokenizer folder ('' for none)")
    p.add_argument("--only", default="", help="comma-separated substrings of degradation names")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    samples = [drawn_at(args.seed, i, args.split, None, args.world) for i in range(args.n)]
    scenes, drawings = [s[0] for s in samples], [s[2] for s in samples]
    clean = render_batch(scenes, 128, drawings=drawings)
    flat_drawings = [dataclasses.replace(d, texture=0.0, noise=0.0) for d in drawings]
    flat = render_batch(scenes, 128, drawings=flat_drawings)
    rows = []
    print(f"{args.n} {args.split} scenes of {args.world} at 128 px; rates in % of scenes "
          "(attribute errors among scenes whose count is right)")
    print(f"{'degradation':44s} {'PSNR':>6s} {'exact':>6s} {'count':>6s} {'color':>6s} {'shape':>6s} "
          f"{'size':>6s} {'region':>6s} {'relat':>6s}")
    wanted = [w for w in args.only.split(",") if w]
    for name, fn in degradations(args.tokenizer if not wanted or "tokenizer" in wanted else "").items():
        if wanted and not any(w in name for w in wanted) and name != "clean":
            continue
        t0 = time.perf_counter()
        base = flat if name.startswith("flat") else clean
        images = base if fn is None else fn(base).clamp(0, 1)
        rates = score(scenes, judge_batch(images))
        row = {"name": name, "psnr": round(psnr(images, clean), 2), **{k: round(100 * v, 1) for k, v in rates.items()},
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        psnr_s = f"{row['psnr']:6.1f}" if row["psnr"] < 99 else "   inf"
        print(f"{name[:44]:44s} {psnr_s} " + " ".join(f"{row[k]:6.1f}" for k in
              ("exact", "count", "color", "shape", "size", "region", "relation")), flush=True)
    result = {"n": args.n, "world": args.world, "split": args.split, "seed": args.seed, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
