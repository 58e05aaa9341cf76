"""Position-addressable batch sources for the trainer.

``get(step, local_batch, rank, world)`` returns the batch of that step for that process, so the data
position of a run is simply its step and a resumed run reads exactly what the killed one would have.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from .. import shapes
from ..data.readers import ImageCaptionFolder
from ..errors import ConfigError, DataError
from ..shapes.render import concat_packed, render_packed
from .loader import RawImageSource, SceneStream, TokenSource
from .pretokenize import LatentShards

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    # tokens: the compact pre-tokenised format streamed from disk (flowtok pretokenize); latents: the older
    # format with stored text states, held in memory.
    kind: Literal["shapes", "folder", "webdataset", "tokens", "latents"] = "shapes"
    path: str | None = None  # folder / shard directory or brace pattern / pre-tokenised folder
    size: int = 128  # image resolution
    split: Literal["train", "test", "any"] = "train"  # shapes world split
    num_objects: int | None = None  # shapes world: fix the number of objects (None: 1 to 3)
    # Which shapes world is drawn for shapes data, pre-tokenisation and in-training evaluation: v2 (varied
    # drawings, the default) or v1 (the canonical drawing), as `flowtok eval --world`.
    world: Literal["v1", "v2"] = "v2"
    crop: Literal["center", "random"] = "center"
    on_error: Literal["raise", "skip"] = "raise"
    workers: int = 4  # loader worker processes (tokens, webdataset); decoding threads for folder data
    prefetch: int = 4  # batches each loader worker prepares ahead
    # shapes on a GPU: the scenes of this many coming (micro-)steps are drawn in one render_packed call, whose
    # ~2,500 small launches cost the same at any batch size (per-sample results are unchanged)
    render_ahead: int = 16
    in_memory: Literal["auto", "memory", "stream"] = "auto"  # tokens: hold a small set in host memory
    shuffle_buffer: int = 2000  # webdataset: samples pooled (whole shards) and shuffled per loader worker
    # A held-out set read like the training data: in-training evaluation reports the stage's loss on it.
    eval_path: str | None = None
    eval_batches: int = 8

    def __post_init__(self) -> None:
        if self.kind != "shapes" and not self.path:
            raise ConfigError(f"data.path is required for data.kind={self.kind}")
        if (self.workers < 0 or self.prefetch < 1 or self.shuffle_buffer < 1 or self.eval_batches < 1
                or self.render_ahead < 1):
            raise ConfigError("data.workers must be >= 0 and data.prefetch, shuffle_buffer, eval_batches, "
                              "render_ahead >= 1")
        if self.num_objects is not None and not 1 <= self.num_objects <= 3:
            raise ConfigError(f"data.num_objects must be 1, 2 or 3, got {self.num_objects}")


class BatchSource(Protocol):
    """Where a stage's batches come from: the batch of one step for one process, by position."""

    def get(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]: ...


class ShapesSource:
    """The procedural shapes world, rendered on the training device. On a GPU the scenes of the coming
    steps are sampled ahead in ``data.workers`` loader processes (:class:`~.loader.SceneStream`, which sends
    the drawings packed into a few arrays) and those of ``data.render_ahead`` micro-steps are drawn together
    (:func:`~flowtok.shapes.render.render_packed`): a render costs a fixed number of kernel launches,
    which at one step's batch kept the GPU waiting. On a CPU, whose cores are the trainer's, a step's scenes
    are sampled and drawn in the training process when it asks for them."""

    def __init__(self, cfg: DataConfig, seed: int, device: torch.device) -> None:
        self.cfg, self.seed, self.device = cfg, seed, device
        self.scenes = (SceneStream(seed, cfg.split, cfg.num_objects, cfg.workers, cfg.prefetch, cfg.world)
                       if device.type != "cpu" and cfg.workers > 0 else None)
        self._ready: dict[tuple[int, int, int, int], dict[str, Any]] = {}

    def _render_ahead(self, key: tuple[int, int, int, int]) -> None:
        assert self.scenes is not None
        keys, drawn = [], []
        for _ in range(self.cfg.render_ahead):
            keys.append(key)
            drawn.append(self.scenes.get(*key))
            key = self.scenes.next_key
        images = render_packed(concat_packed([d[2] for d in drawn]), self.cfg.size, self.device)
        self._ready, at = {}, 0
        for k, (scenes, captions, _) in zip(keys, drawn):
            self._ready[k] = {"images": images[at:at + len(scenes)], "captions": captions, "scenes": scenes}
            at += len(scenes)

    def get(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        if self.scenes is not None:
            key = (step, local_batch, rank, world)
            if key not in self._ready:  # the first request, one past the drawn ones, or out of order
                self._render_ahead(key)
            return self._ready.pop(key)
        start = (step * world + rank) * local_batch
        images, captions, scenes = shapes.shapes_batch(self.seed, start, local_batch, split=self.cfg.split,
                                                       num_objects=self.cfg.num_objects, size=self.cfg.size,
                                                       device=self.device, world=self.cfg.world)
        return {"images": images, "captions": captions, "scenes": scenes}


class IndexedSource:
    """A map-style dataset read in a seeded permutation, one epoch after another."""

    def __init__(self, dataset, seed: int, device: torch.device, workers: int = 4) -> None:
        self.dataset, self.seed, self.device = dataset, seed, device
        self.n = len(dataset)
        if self.n == 0:
            raise DataError("the dataset is empty")
        self._perms: dict[int, np.ndarray] = {}
        self.pool = ThreadPoolExecutor(max(1, workers))

    def _index(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._perms[epoch][i])

    def get(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        start = (step * world + rank) * local_batch
        idx = [self._index(start + j) for j in range(local_batch)]
        items = list(self.pool.map(self.dataset.__getitem__, idx))
        return self.collate(items)

    def collate(self, items: list) -> dict[str, Any]:
        images = torch.stack([it[0] for it in items]).to(self.device, non_blocking=True)
        return {"images": images, "captions": [it[1] for it in items], "scenes": None}


class LatentSource(IndexedSource):
    """Pre-tokenised shards written by ``flowtok pretokenize`` (see :mod:`flowtok.training.pretokenize`)."""

    def __init__(self, path: str, seed: int, device: torch.device) -> None:
        # The whole set lives on the training device: a step is one index gather, no host work.
        super().__init__(LatentShards(path, device=device), seed, device, workers=1)
        self.meta = self.dataset.meta

    def get(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        start = (step * world + rank) * local_batch
        idx = [self._index(start + j) for j in range(local_batch)]
        return self.dataset.gather(idx, self.device)


def build_source(cfg: DataConfig, seed: int, device: torch.device) -> BatchSource:
    if cfg.kind == "shapes":
        return ShapesSource(cfg, seed, device)
    if cfg.kind == "folder":
        ds = ImageCaptionFolder(str(cfg.path), resolution=cfg.size, crop=cfg.crop, on_error=cfg.on_error, seed=seed)
        return IndexedSource(ds, seed, device, cfg.workers)
    if cfg.kind == "latents":
        return LatentSource(str(cfg.path), seed, device)
    if cfg.kind == "tokens":
        source = TokenSource(str(cfg.path), seed, device, cfg.workers, cfg.prefetch, cfg.in_memory)
        drawn = source.meta.get("world")
        if drawn is not None and drawn != cfg.world:
            log.warning("%s holds shapes drawn in world %s; in-training evaluation draws data.world=%s",
                        cfg.path, drawn, cfg.world)
        return source
    if cfg.kind == "webdataset":
        return RawImageSource(cfg, seed, device)
    raise ConfigError(f"unknown data.kind {cfg.kind!r}")
