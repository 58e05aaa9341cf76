"""The deterministic training stream: sample ``i`` is a pure function of ``(seed, i)``."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidInputError
from .captions import caption
from .render import check_size, render_batch
from .world import Scene, sample_scene


def sample_at(seed: int, index: int, split: str = "train", num_objects: int | None = None) -> tuple[Scene, str]:
    """Scene and caption number ``index`` of the stream ``seed``; a pure function of its arguments."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, num_objects=num_objects, split=split)
    return scene, caption(scene, rng)


def shapes_batch(seed: int, start: int, batch_size: int, split: str = "train", num_objects: int | None = None,
                 size: int = 128, device: str | torch.device = "cpu") -> tuple[torch.Tensor, list[str], list[Scene]]:
    """Samples ``start .. start + batch_size - 1`` of the stream: images ``[B, 3, size, size]``, captions, scenes.

    Sample ``i`` depends only on ``(seed, i)``, so a run resumes at any position by its index.
    """
    pairs = [sample_at(seed, i, split, num_objects) for i in range(start, start + batch_size)]
    scenes = [p[0] for p in pairs]
    return render_batch(scenes, size, device), [p[1] for p in pairs], scenes


class ShapesDataset(torch.utils.data.Dataset):
    """The :func:`shapes_batch` stream as a map-style dataset of ``(image [3, H, W], caption)``."""

    def __init__(self, length: int, seed: int = 0, split: str = "train", num_objects: int | None = None,
                 size: int = 128) -> None:
        check_size(size)
        if length < 0:
            raise InvalidInputError(f"length must be >= 0, got {length}")
        sample_scene(np.random.default_rng(0), num_objects, split)  # validates split / num_objects early
        self.length, self.seed, self.split, self.num_objects, self.size = length, seed, split, num_objects, size

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        return sample_at(self.seed, index, self.split, self.num_objects)[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        scene, text = sample_at(self.seed, index, self.split, self.num_objects)
        return render_batch([scene], self.size)[0], text
