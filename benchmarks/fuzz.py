"""Fuzz the public API and the CLI with generated image files and mutated model folders.

    python benchmarks/fuzz.py                                   # 100,000 images, 10,000 model folders
    python benchmarks/fuzz.py --images 2000 --models 200        # a quick run
    nohup python benchmarks/fuzz.py --out fuzz.json > fuzz.log 2>&1 &

Images: seeds in every format PIL can write (the six flowtok reads and others it must refuse: EPS, IM,
DDS, QOI, PCX, TGA, ICO, SGI, PPM), bombs (20000 x 20000 headers, 1 x 60000 and 1 x 8,000,000 strips),
crafted EXIF; each file is a seed mutated at random (cut short, bytes flipped, bytes inserted, a slice
repeated, a 32-bit field overwritten with a large value), written to disk and read by
``flowtok.data.load_image`` then cropped to 32 px as the pipeline does; one file in ``--cli-every`` also
goes through ``flowtok caption`` (in-process ``flowtok.cli.main``).

Model folders: an untrained tiny pipeline; each mutation edits one thing (a ``config.json`` value set to
a hostile one, a key added or removed, the file cut or flipped; the safetensors header cut, flipped or its
length field changed; ``pipeline.json`` values or bytes; a component swapped for another) and loads it
with ``from_pretrained`` of the component (``FlowTokPipeline.from_pretrained`` for pipeline-level
mutations); whatever loads generates one image. One mutation in ``--cli-every`` goes through ``flowtok generate``.

Outcomes: *ok*, *refused* (a one-line FlowTokError; exit code 2 from the CLI), or *escape* (any other
exception, a multi-line message, or another exit code), which is the failure this counts. Peak memory
is the process's maximum RSS. Prints a JSON summary with the first escapes' reproductions.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


# ----------------------------------------------------------------------------------------- image seeds
def _encode(image: Image.Image, fmt: str, **kw: Any) -> bytes | None:
    buf = io.BytesIO()
    try:
        image.save(buf, format=fmt, **kw)
    except (KeyError, OSError, ValueError):  # this Pillow cannot write it in this mode
        return None
    return buf.getvalue()


def _png_chunks(width: int, height: int, mode: int = 0, rows: int = 4) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = {0: 1, 2: 3}[mode]
    raw = zlib.compress((b"\x00" + b"\x00" * width * channels) * min(height, rows), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def image_seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    seeds: dict[str, bytes | None] = {}
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "IM", "DDS", "QOI", "PCX", "TGA", "ICO", "SGI", "PPM"):
        seeds[f"rgb.{fmt.lower()}"] = _encode(rgb, fmt)
    for mode in ("L", "1", "P", "RGBA", "LA", "I;16", "F", "CMYK"):
        for fmt in ("PNG", "TIFF", "JPEG", "WEBP", "GIF", "BMP"):
            seeds[f"{mode}.{fmt.lower()}"] = _encode(rgb.convert(mode) if mode != "I;16" else
                                                     Image.fromarray((rng.random((20, 20)) * 65535).astype(np.uint16)),
                                                     fmt)
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds["exif.jpg"] = _encode(rgb, "JPEG", exif=exif)
    entries = [(0x0112, 3, 1, struct.pack("<HH", 6, 0)), (0x0128, 2, 4, b"abc\x00")]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", t, k, n) + v for t, k, n, v in entries)
    seeds["crafted-exif.jpg"] = _encode(rgb, "JPEG", exif=b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 4)
    frames = [Image.new("P", (16, 16), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    seeds["animated.gif"] = gif.getvalue()
    seeds["eps.png"] = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
                        b"newpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n")
    seeds["bomb.png"] = _png_chunks(20000, 20000, 2)
    seeds["thin.png"] = _png_chunks(1, 60000)
    seeds["thin8m.png"] = _png_chunks(1, 8_000_000, rows=8_000_000)
    seeds["wide.png"] = _png_chunks(60000, 1)
    return {k: v for k, v in seeds.items() if v}


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        op = rng.randrange(6)
        if not out:
            break
        pos = rng.randrange(len(out))
        if op == 0:
            out = out[:pos]
        elif op == 1:
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(len(out))] = rng.randrange(256)
        elif op == 2:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif op == 3:
            end = min(len(out), pos + rng.randint(1, 256))
            out[pos:pos] = out[pos:end] * rng.randint(1, 4)
        elif op == 4:
            value = rng.choice((0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(2**32)))
            out[pos:pos + 4] = struct.pack(rng.choice(("<I", ">I")), value)
        else:
            out[pos:pos + 1] = b"\x00"
    return bytes(out)


# --------------------------------------------------------------------------------------------- outcomes
class Tally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.escapes: list[dict[str, Any]] = []

    def run(self, kind: str, what: str, fn) -> None:
        from flowtok.errors import FlowTokError

        try:
            fn()
        except FlowTokError as exc:
            if "\n" in str(exc) or not str(exc):
                self._escape(kind, what, f"multi-line or empty message: {str(exc)[:300]!r}")
            else:
                self.counts[f"{kind}/refused"] += 1
            return
        except Exception:  # noqa: BLE001 - counting exactly these is the point
            self._escape(kind, what, traceback.format_exc(limit=-3))
            return
        self.counts[f"{kind}/ok"] += 1

    def cli(self, kind: str, what: str, argv: list[str]) -> None:
        from flowtok.cli import main

        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
        except BaseException:  # noqa: BLE001
            self._escape(kind, what, traceback.format_exc(limit=-3))
            return
        lines = [line for line in err.getvalue().splitlines() if line.startswith("flowtok")]
        if code == 0:
            self.counts[f"{kind}/ok"] += 1
        elif code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue():
            self.counts[f"{kind}/refused"] += 1
        else:
            self._escape(kind, what, f"exit {code}: {err.getvalue()[-600:]}")

    def _escape(self, kind: str, what: str, detail: str) -> None:
        self.counts[f"{kind}/escape"] += 1
        if len(self.escapes) < 20:
            self.escapes.append({"kind": kind, "input": what, "detail": detail})


# ------------------------------------------------------------------------------------------------ images
def fuzz_images(n: int, work: Path, tally: Tally, seed: int, cli_every: int, pipe_dir: Path) -> None:
    from flowtok.data.readers import load_image, resize_and_crop

    rng = random.Random(seed)
    seeds = image_seeds()
    names = sorted(seeds)
    folder = work / "images"
    folder.mkdir()
    for i in range(n):
        seed_name = names[i % len(names)]
        data = seeds[seed_name] if i < len(names) else mutate(seeds[seed_name], rng)
        path = folder / f"{i % 997}-{seed_name}"
        path.write_bytes(data)
        tally.run("image/api", f"{seed_name} #{i}", lambda path=path: resize_and_crop(load_image(path), 32))
        if cli_every and i % cli_every == 0:
            tally.cli("image/cli", f"{seed_name} #{i}", ["caption", str(path), "--model", str(pipe_dir),
                                                         "--steps", "1", "--device", "cpu"])


# ------------------------------------------------------------------------------------------------ models
HOSTILE_VALUES = [0, -1, 1, 3, 7, 2**20, 16384, 10**7, 2**31, 2**63, 10**30, 0.5, 1e-30, 1e30, float("nan"),
                  float("inf"), -float("inf"), "x", "", None, True, [], [1, 2], {}, {"a": 1}, "NaN", 1.5, -0.0]
COMPONENT_NAMES = ("tokenizer", "text_projector", "t2i_flow", "i2t_flow", "text_decoder")


def _classes() -> dict[str, type]:
    from flowtok.flow import FlowTransformer
    from flowtok.text import TextDecoder, TextProjector
    from flowtok.tokenizer import ImageTokenizer

    return {"tokenizer": ImageTokenizer, "text_projector": TextProjector, "t2i_flow": FlowTransformer,
            "i2t_flow": FlowTransformer, "text_decoder": TextDecoder}


def _mutate_config(path: Path, rng: random.Random) -> str:
    text = path.read_text()
    cfg = json.loads(text)
    op = rng.randrange(5)
    if op <= 1:
        key = rng.choice(sorted(cfg))
        value = rng.choice(HOSTILE_VALUES) if op == 0 else (cfg[key] * rng.choice((2, 3, 10, 1000))
                                                             if isinstance(cfg[key], (int, float)) else None)
        cfg[key] = value
        path.write_text(json.dumps(cfg))
        return f"config {key}={value!r}"
    if op == 2:
        key = rng.choice(sorted(cfg))
        del cfg[key]
        path.write_text(json.dumps(cfg))
        return f"config without {key}"
    if op == 3:
        cfg[rng.choice(("colour", "extra", "__class__"))] = rng.choice(HOSTILE_VALUES)
        path.write_text(json.dumps(cfg))
        return "config with an unknown key"
    path.write_bytes(mutate(text.encode(), rng))
    return "config bytes mutated"


def _mutate_weights(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    op = rng.randrange(4)
    if op == 0:
        data[:8] = struct.pack("<Q", rng.choice((0, 1, n - 1, n + 1, len(data), 2**40, 2**64 - 1)))
        what = "header length changed"
    elif op == 1:
        for _ in range(rng.randint(1, 6)):
            data[8 + rng.randrange(n)] = rng.randrange(32, 127)
        what = "header bytes flipped"
    elif op == 2:
        data = data[:rng.randrange(len(data))]
        what = "weights cut short"
    else:
        header = json.loads(bytes(data[8:8 + n]))
        key = rng.choice(sorted(k for k in header if k != "__metadata__"))
        info = header[key]
        choice = rng.randrange(3)
        if choice == 0:
            info["shape"] = [d * 2 for d in info["shape"]] or [2]
        elif choice == 1:
            info["data_offsets"] = [0, 2**40]
        else:
            info["dtype"] = rng.choice(("F64", "I8", "BOOL", "X"))
        blob = json.dumps(header).encode()
        data = bytearray(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
        what = f"header entry of {key} changed"
    path.write_bytes(bytes(data))
    return what


def _mutate_pipeline(root: Path, rng: random.Random) -> str:
    path = root / "pipeline.json"
    spec = json.loads(path.read_text())
    op = rng.randrange(5)
    if op == 0:
        spec["components"][rng.choice(COMPONENT_NAMES)] = rng.choice(["../..", "/etc", "nope", 3, None, "tokenizer",
                                                                      "t2i_flow", ""])
    elif op == 1:
        spec[rng.choice(("components", "text_encoder", "defaults", "pipeline_type"))] = rng.choice(HOSTILE_VALUES)
    elif op == 2:
        spec["defaults"][rng.choice(("num_inference_steps", "guidance_scale", "caption_guidance_scale"))] = \
            rng.choice(HOSTILE_VALUES)
    elif op == 3:
        spec["text_encoder"] = rng.choice([{"name": "clip"}, {"name": "bert"}, {"name": "minilm", "path": "x"}, "minilm"])
    else:
        path.write_bytes(mutate(path.read_bytes(), rng))
        return "pipeline.json bytes mutated"
    path.write_text(json.dumps(spec))
    return f"pipeline.json op {op}"


def fuzz_models(n: int, work: Path, tally: Tally, seed: int, cli_every: int, pipe_dir: Path) -> None:
    from flowtok.pipelines import FlowTokPipeline

    rng = random.Random(seed + 1)
    classes = _classes()
    for i in range(n):
        root = work / "model"
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(pipe_dir, root)
        name = rng.choice(COMPONENT_NAMES)
        op = rng.randrange(20)
        if op < 10:
            what = _mutate_config(root / name / "config.json", rng)
        elif op < 16:
            what = _mutate_weights(root / name / "model.safetensors", rng)
        elif op < 17:
            other = rng.choice([c for c in COMPONENT_NAMES if c != name])
            shutil.rmtree(root / name)
            shutil.copytree(pipe_dir / other, root / name)
            what = f"{other} in place of {name}"
        else:
            what = _mutate_pipeline(root, rng)
            name = None
        label = f"#{i} {name or 'pipeline'}: {what}"
        if cli_every and i % cli_every == 0:
            tally.cli("model/cli", label, ["generate", "a red circle", "--model", str(root), "--steps", "1",
                                           "--device", "cpu", "-o", str(work / "out.png")])
        elif name is None:
            tally.run("model/api", label, lambda root=root: FlowTokPipeline.from_pretrained(root, device="cpu")
                      .text_to_image("a red circle", num_inference_steps=1))
        else:
            tally.run("model/api", label, lambda root=root, name=name: classes[name].from_pretrained(root / name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--models", type=int, default=10_000)
    p.add_argument("--cli-every", type=int, default=200, help="one input in this many also goes through the CLI")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    import torch

    warnings.simplefilter("ignore")  # PIL warns on every damaged TIFF; the outcome counts are the result

    from demo_load import build_untrained_pipeline

    torch.set_num_threads(1)
    tally = Tally()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flowtok-fuzz-") as tmp:
        work = Path(tmp)
        pipe_dir = build_untrained_pipeline(work / "base", "tiny")
        t_images = time.perf_counter()
        fuzz_images(args.images, work, tally, args.seed, args.cli_every, pipe_dir)
        t_models = time.perf_counter()
        fuzz_models(args.models, work, tally, args.seed, args.cli_every, pipe_dir)
        t_end = time.perf_counter()
    escapes = sum(v for k, v in tally.counts.items() if k.endswith("/escape"))
    summary = {
        "command": " ".join(["python benchmarks/fuzz.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"), "images": args.images, "model_mutations": args.models,
        "counts": dict(sorted(tally.counts.items())), "escapes": escapes,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "images_s": round(t_models - t_images, 1), "models_s": round(t_end - t_models, 1),
        "total_s": round(t_end - t0, 1), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "first_escapes": tally.escapes,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if escapes == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
