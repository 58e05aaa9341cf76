"""Writing the stream to disk: an image folder with ``captions.jsonl``, or webdataset tar shards."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidInputError
from .render import check_size, tensor_to_pil
from .stream import shapes_batch
from .world import DEFAULT_WORLD, check_world, sample_scene


def _png_bytes(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    # Level 1: a fraction of the default's time, files barely larger on flat synthetic images.
    tensor_to_pil(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def export_shapes(out_dir: str | Path, n: int, seed: int = 0, size: int = 128, split: str = "train",
                  num_objects: int | None = None, shards: bool = False, shard_size: int = 1000,
                  progress: bool = False, world: str = DEFAULT_WORLD) -> Path:
    """Write ``n`` samples of the stream ``seed`` to ``out_dir`` and return it.

    Folder form: ``images/00000000.png`` ... and ``captions.jsonl`` with ``file``, ``caption``
    and ``scene`` per line. Shard form (``shards=True``): ``shapes-000000.tar`` ... holding
    ``<key>.png``, ``<key>.txt`` (caption) and ``<key>.json`` (caption and scene) per sample.
    """
    check_size(size)
    if n < 0:
        raise InvalidInputError(f"n must be >= 0, got {n}")
    if shard_size < 1:
        raise InvalidInputError(f"shard_size must be >= 1, got {shard_size}")
    sample_scene(np.random.default_rng(0), num_objects, split)  # validates split / num_objects early
    check_world(world)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not shards:
        (out / "images").mkdir(exist_ok=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, unit="img", desc="shapes")
    mtime = time.time()
    chunk = 64
    index_file = None if shards else open(out / "captions.jsonl", "w", encoding="utf-8")
    tar: tarfile.TarFile | None = None
    try:
        for start in range(0, n, chunk):
            images, texts, scenes = shapes_batch(seed, start, min(chunk, n - start), split, num_objects, size,
                                                 world=world)
            for k, (image, text, scene) in enumerate(zip(images, texts, scenes)):
                i = start + k
                key = f"{i:08d}"
                png = _png_bytes(image)
                if index_file is not None:
                    (out / "images" / f"{key}.png").write_bytes(png)
                    record = {"file": f"images/{key}.png", "caption": text, "scene": scene.to_dict()}
                    index_file.write(json.dumps(record) + "\n")
                else:
                    if i % shard_size == 0:
                        if tar is not None:
                            tar.close()
                        tar = tarfile.open(out / f"shapes-{i // shard_size:06d}.tar", "w")
                    assert tar is not None
                    meta = json.dumps({"caption": text, "scene": scene.to_dict()}).encode()
                    _add_bytes(tar, f"{key}.png", png, mtime)
                    _add_bytes(tar, f"{key}.txt", text.encode(), mtime)
                    _add_bytes(tar, f"{key}.json", meta, mtime)
            if bar is not None:
                bar.update(len(texts))
    finally:
        if index_file is not None:
            index_file.close()
        if tar is not None:
            tar.close()
        if bar is not None:
            bar.close()
    info = {"generator": "flowtok.shapes", "world": world, "n": n, "seed": seed, "size": size, "split": split,
            "num_objects": num_objects, "shards": shards, "shard_size": shard_size if shards else None}
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out
