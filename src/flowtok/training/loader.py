"""Batch sources that read from disk in DataLoader worker processes while the GPU trains.

- :class:`TokenSource` streams the compact pre-tokenised format (:mod:`flowtok.data.tokens`). The sample
  at global position p = step * global_batch + (micro * world + rank) * micro_batch + j is
  ``epoch_permutation(p % n; seed, p // n)``: a new order every epoch, every sample exactly once per
  epoch across all ranks (and gradient-accumulation micro-batches), and a step's data a pure function
  of (seed, step), so a resumed run reads exactly what the killed one would have, starting at once.
- :class:`RawImageSource` decodes webdataset tar shards of images and captions. Each epoch the shards are
  permuted from (seed, epoch) and split across ranks, then across loader workers, before anything is
  decoded; each worker pools whole shards up to ``data.shuffle_buffer`` samples (undecoded bytes),
  permutes the pool and decodes it batch by batch. Its position (epoch, pool start, samples taken) is
  saved in every checkpoint: a resume re-reads one pool's bytes and decodes nothing it skips.

- :class:`SceneStream` samples the shapes world's scenes (and how each is drawn) for the coming steps in
  loader worker processes: per-sample Python that left a GPU waiting most of a tokenizer step; the
  rendering stays one vectorised pass on the training device.

All return batches already moved to the training device (pinned host memory, non-blocking copies);
``wait_s`` accumulates the time the training loop was blocked on the loader.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..data.tokens import TokenShards, epoch_permutation, plan_memory
from ..errors import DataError, FlowTokError

log = logging.getLogger(__name__)


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _next(it: Iterator) -> Any:
    """The next batch; a FlowTokError raised in a loader worker comes back as its own one line (DataLoader
    re-raises it with the worker's traceback inside the message)."""
    try:
        return next(it)
    except FlowTokError as exc:
        text = str(exc)
        if "Traceback (most recent call last)" not in text:
            raise
        last = text.strip().splitlines()[-1]
        raise type(exc)(last.split(": ", 1)[1] if ": " in last else last) from None


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _keys(step: int, rank: int, world: int, accum: int) -> Iterator[tuple[int, int]]:
    """The order the trainer asks for micro-batches: (step, m * world + rank), m = 0 .. accum - 1."""
    m = rank // world
    while True:
        yield step, m * world + rank % world
        m += 1
        if m == accum:
            step, m = step + 1, 0


class _StepStream:
    """Micro-batches read ahead by ``workers`` DataLoader processes in the order the trainer asks for them:
    ``dataset[(step, virtual rank)]`` for the dataset :meth:`_dataset` builds. A request out of that order
    (a resume, a one-off read of another size) starts a new stream at it."""

    def __init__(self, workers: int, prefetch: int) -> None:
        self.workers, self.prefetch = workers, prefetch
        self.wait_s = 0.0
        self._it: Iterator | None = None
        self._next: tuple[int, int, int, int] | None = None  # (step, local_batch, rank, world) expected next

    def _dataset(self, local_batch: int, world: int) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def _take(self, step: int, local_batch: int, rank: int, world: int, **loader_kw: Any) -> Any:
        _, real_world = _world()
        if world % real_world:
            real_world = 1  # a caller outside the trainer's rank layout (e.g. a one-off measurement)
        accum = world // real_world
        key = (step, local_batch, rank, world)
        t0 = time.perf_counter()
        if self._it is None or key != self._next:
            kw: dict[str, Any] = {"prefetch_factor": self.prefetch} if self.workers > 0 else {}
            self._it = iter(torch.utils.data.DataLoader(
                self._dataset(local_batch, world), batch_size=None, sampler=_keys(step, rank, real_world, accum),
                num_workers=self.workers, **kw, **loader_kw))
        got = _next(self._it)
        self.wait_s += time.perf_counter() - t0
        self._next = ((step, local_batch, rank + real_world, world) if rank // real_world + 1 < accum
                      else (step + 1, local_batch, rank % real_world, world))
        return got


# ------------------------------------------------------------------------------------------ shapes
def _as_is(batch: Any) -> Any:
    return batch


class _SceneBatches(torch.utils.data.Dataset):
    """``dataset[(step, virtual_rank)]``: that micro-batch's scenes, captions and drawings, the drawings packed
    into a few arrays (:class:`~flowtok.shapes.render.PackedDrawings`), which cross to the training process
    far faster than one object per placement."""

    def __init__(self, seed: int, local_batch: int, world: int, split: str, num_objects: int | None,
                 shapes_world: str) -> None:
        self.seed, self.local_batch, self.world, self.split, self.num_objects = seed, local_batch, world, split, num_objects
        self.shapes_world = shapes_world

    def __getitem__(self, key: tuple[int, int]) -> tuple[list, list[str], Any]:
        from ..shapes.render import pack_drawings
        from ..shapes.stream import drawn_at

        step, rank = key
        start = (step * self.world + rank) * self.local_batch
        drawn = [drawn_at(self.seed, i, self.split, self.num_objects, self.shapes_world)
                 for i in range(start, start + self.local_batch)]
        scenes = [d[0] for d in drawn]
        return scenes, [d[1] for d in drawn], pack_drawings(scenes, [d[2] for d in drawn])


class SceneStream(_StepStream):
    """The scenes of the steps to come, sampled ahead by ``workers`` loader processes (in step order, so a
    step's scenes are the ones :func:`~flowtok.shapes.shapes_batch` draws for it, and a resume is exact)."""

    def __init__(self, seed: int, split: str, num_objects: int | None, workers: int, prefetch: int,
                 shapes_world: str) -> None:
        super().__init__(workers, prefetch)
        self.seed, self.split, self.num_objects, self.shapes_world = seed, split, num_objects, shapes_world

    def _dataset(self, local_batch: int, world: int) -> torch.utils.data.Dataset:
        return _SceneBatches(self.seed, local_batch, world, self.split, self.num_objects, self.shapes_world)

    def get(self, step: int, local_batch: int, rank: int, world: int) -> tuple[list, list[str], Any]:
        """(scenes, captions, packed drawings) of that micro-batch."""
        return self._take(step, local_batch, rank, world, collate_fn=_as_is)

    @property
    def next_key(self) -> tuple[int, int, int, int]:
        """``(step, local_batch, rank, world)`` of the micro-batch the trainer asks for after the last one."""
        assert self._next is not None
        return self._next


# ------------------------------------------------------------------------------------------ tokens
class _TokenBatches(torch.utils.data.Dataset):
    """``dataset[(step, virtual_rank)]`` is that micro-batch, read in a worker process."""

    def __init__(self, shards: TokenShards, seed: int, local_batch: int, world: int, eos_id: int) -> None:
        self.shards, self.seed, self.local_batch, self.world, self.eos_id = shards, seed, local_batch, world, eos_id

    def indices(self, step: int, rank: int) -> np.ndarray:
        n = self.shards.n
        pos = (step * self.world + rank) * self.local_batch + np.arange(self.local_batch, dtype=np.int64)
        epochs, within = np.divmod(pos, n)
        out = np.empty_like(pos)
        for e in np.unique(epochs):  # a batch may straddle two epochs
            sel = epochs == e
            out[sel] = epoch_permutation(within[sel], n, self.seed, int(e))
        return out

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        step, rank = key
        idx = self.indices(step, rank)
        got = self.shards.read(idx)
        ids = got["input_ids"]
        is_eos = ids == self.eos_id
        mask = (np.cumsum(is_eos, axis=1) - is_eos) == 0  # BOS, content and the first EOS
        return {"image_moments": torch.from_numpy(got["moments"]), "input_ids": torch.from_numpy(ids),
                "text_mask": torch.from_numpy(mask), "captions": got["captions"], "index": torch.from_numpy(idx)}


class TokenSource(_StepStream):
    """The compact pre-tokenised format, streamed (or held in memory when small: ``data.in_memory``)."""

    def __init__(self, path: str, seed: int, device: torch.device, workers: int = 4, prefetch: int = 4,
                 in_memory: str = "auto") -> None:
        probe = TokenShards(path)
        hold, line = plan_memory(probe.n, probe.bytes_per_sample, in_memory)
        log.info("data %s: %s", path, line)
        self.shards = TokenShards(path, in_memory=True) if hold else probe
        self.meta = self.shards.meta
        self.n = self.shards.n
        self.seed, self.device = seed, device
        # In memory a batch is an index gather: no worker helps.
        super().__init__(0 if hold else workers, prefetch)
        self.eos_id = int(self.meta["eos_token_id"])

    def __len__(self) -> int:
        return self.n

    def _dataset(self, local_batch: int, world: int) -> torch.utils.data.Dataset:
        return _TokenBatches(self.shards, self.seed, local_batch, world, self.eos_id)

    def get(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        batch = self._take(step, local_batch, rank, world, pin_memory=self.device.type == "cuda")
        return _to_device(batch, self.device)

    def indices(self, step: int, local_batch: int, rank: int, world: int) -> np.ndarray:
        """The sample indices of a batch, without reading it (tests, audits)."""
        return _TokenBatches(self.shards, self.seed, local_batch, world, self.eos_id).indices(step, rank)


# -------------------------------------------------------------------------------------- raw images
def _decode_uint8(reader, source: bytes, name: str, key: tuple[int, ...]) -> torch.Tensor:
    """[3, R, R] uint8: a quarter of the float tensor through the workers' shared memory."""
    from ..data.readers import load_image, resize_and_crop

    image = load_image(source, reader.max_pixels, name=name, draft=reader.resolution)
    rng = np.random.default_rng([reader.seed, reader.epoch, *key]) if reader.crop == "random" else None
    arr = np.asarray(resize_and_crop(image, reader.resolution, reader.crop, rng).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class _RawStream(torch.utils.data.IterableDataset):
    """One rank's batches of decoded images; worker w of W yields that rank's batches w, w + W, ..."""

    def __init__(self, reader, seed: int, rank: int, world: int, batch: int, buffer: int,
                 start: dict[int, dict[str, int]], worker_offset: int) -> None:
        self.reader, self.seed, self.rank, self.world = reader, seed, rank, world
        self.batch, self.buffer, self.start, self.worker_offset = batch, buffer, start, worker_offset

    def _my_shards(self, epoch: int, logical: int, workers: int) -> list[int]:
        n = len(self.reader.shards)
        order = np.random.default_rng([self.seed, epoch, 0x5A]).permutation(n)
        slot, slots = self.rank * workers + logical, self.world * workers
        if n >= slots:
            return [int(s) for s in order[slot::slots]]
        return [int(order[slot % n])]  # fewer shards than readers: some read the same shard

    def _pool(self, shards: list[int], first: int) -> tuple[list[tuple[int, int, str, dict]], int]:
        """Undecoded samples of whole shards from ``first`` until ``buffer`` are pooled; returns the next shard."""
        pool: list[tuple[int, int, str, dict]] = []
        i = first
        while i < len(shards) and (not pool or len(pool) < self.buffer):
            sid = shards[i]
            pool.extend((sid, j, key, files) for j, (key, files) in enumerate(self.reader.samples_of(sid)))
            i += 1
        return pool, i

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        logical = (w + self.worker_offset) % workers
        st = self.start.get(logical, {"epoch": 0, "shard": 0, "taken": 0})
        epoch, first, skip = st["epoch"], st["shard"], st["taken"]
        images: list[torch.Tensor] = []
        captions: list[str] = []
        empty_epochs = 0
        while True:
            self.reader.set_epoch(epoch)
            shards = self._my_shards(epoch, logical, workers)
            got_any = False
            while first < len(shards):
                pool, nxt = self._pool(shards, first)
                perm = np.random.default_rng([self.seed, epoch, self.rank, logical, first]).permutation(len(pool))
                for taken in range(skip, len(pool)):
                    sid, j, key, files = pool[perm[taken]]
                    item = self.reader.decode(sid, j, key, files, _decode_uint8)
                    if item is None:
                        continue
                    got_any = True
                    images.append(item[0])
                    captions.append(item[1])
                    if len(images) == self.batch:
                        done = taken + 1 == len(pool)
                        state = {"epoch": epoch, "shard": nxt if done else first, "taken": 0 if done else taken + 1}
                        if done and nxt >= len(shards):
                            state = {"epoch": epoch + 1, "shard": 0, "taken": 0}
                        yield {"images": torch.stack(images), "captions": captions, "worker": logical, "state": state}
                        images, captions = [], []
                first, skip = nxt, 0
            empty_epochs = 0 if got_any else empty_epochs + 1
            if empty_epochs >= 2:
                raise DataError(f"no usable sample in the shards of {self.reader.spec} for rank {self.rank}, "
                                f"worker {logical} (all skipped or empty)")
            epoch, first, skip = epoch + 1, 0, 0


class RawImageSource:
    """Webdataset tar shards decoded in loader worker processes (see the module docstring)."""

    def __init__(self, cfg, seed: int, device: torch.device) -> None:
        from ..data.readers import WebDatasetReader

        self.reader = WebDatasetReader(cfg.path, resolution=cfg.size, crop=cfg.crop, on_error=cfg.on_error, seed=seed)
        self.cfg, self.seed, self.device = cfg, seed, device
        self.rank, self.world = _world()
        self.workers = cfg.workers
        self.wait_s = 0.0
        self.batches = 0  # taken by this rank since step 0
        self.positions: dict[int, dict[str, int]] = {}
        self._it: Iterator | None = None
        self._shape: int | None = None

    def state(self) -> dict[str, Any]:
        return {"batches": self.batches, "workers": self.workers, "positions": self.positions}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        if state.get("workers") != self.workers:
            log.warning("the data position was saved with %s loader workers, this run has %d: the raw-image "
                        "stream restarts its epoch order (not identical to an uninterrupted run)",
                        state.get("workers"), self.workers)
            return
        self.batches = int(state["batches"])
        self.positions = {int(k): v for k, v in state["positions"].items()}
        self._it = None

    def _stream(self, local_batch: int, start: dict, offset: int):
        ds = _RawStream(self.reader, self.seed, self.rank, self.world, local_batch, self.cfg.shuffle_buffer,
                        start, offset)
        kw: dict[str, Any] = {"prefetch_factor": self.cfg.prefetch} if self.workers > 0 else {}
        return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.workers,
                                                pin_memory=self.device.type == "cuda", **kw))

    def get(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self._shape is not None and local_batch != self._shape:
            # A one-off read of another size (the tokenizer's scale measurement): a fresh stream from the start.
            return self._finish(_next(self._stream(local_batch, {}, 0)))
        if self._it is None:
            self._shape = local_batch
            # DataLoader takes batches from its workers in turn, starting at worker 0: rotate the logical
            # workers so that the batch this rank takes next comes from the worker whose turn it is.
            self._it = self._stream(local_batch, self.positions, self.batches % max(1, self.workers))
        batch = _next(self._it)
        self.wait_s += time.perf_counter() - t0
        self.batches += 1
        self.positions[int(batch["worker"])] = batch["state"]
        return self._finish(batch)

    def _finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = batch["images"].to(self.device, non_blocking=True).float().div_(255.0)
        return {"images": images, "captions": batch["captions"], "scenes": None}
