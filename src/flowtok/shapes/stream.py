"""The deterministic training stream: sample ``i`` is a pure function of ``(seed, i)`` (and the world)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidInputError
from .captions import caption
from .render import check_size, render_batch
from .world import DEFAULT_WORLD, Drawing, Scene, check_world, draw_scene, sample_scene


def drawn_at(seed: int, index: int, split: str = "train", num_objects: int | None = None,
             world: str = DEFAULT_WORLD) -> tuple[Scene, str, Drawing]:
    """Scene, caption and drawing number ``index`` of the stream ``seed`` in ``world``.

    The scene comes first from ``default_rng([seed, index])``, so both worlds show the same scenes;
    the v2 drawing has a generator of its own (``[seed, index, 1]``), and its caption only calls the
    background white when it is.
    """
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, num_objects=num_objects, split=split)
    drawing = draw_scene(scene, world, np.random.default_rng([seed, index, 1]))
    return scene, caption(scene, rng, white_background=drawing.plain_white), drawing


def sample_at(seed: int, index: int, split: str = "train", num_objects: int | None = None,
              world: str = DEFAULT_WORLD) -> tuple[Scene, str]:
    """Scene and caption number ``index`` of the stream ``seed``; a pure function of its arguments."""
    scene, text, _ = drawn_at(seed, index, split, num_objects, world)
    return scene, text


def shapes_batch(seed: int, start: int, batch_size: int, split: str = "train", num_objects: int | None = None,
                 size: int = 128, device: str | torch.device = "cpu",
                 world: str = DEFAULT_WORLD) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """Samples ``start .. start + batch_size - 1`` of the stream: images ``[B, 3, size, size]``, captions, scenes.

    Sample ``i`` depends only on ``(seed, i)`` and the world, so a run resumes at any position by its index.
    """
    check_world(world)
    samples = [drawn_at(seed, i, split, num_objects, world) for i in range(start, start + batch_size)]
    scenes = [s[0] for s in samples]
    return render_batch(scenes, size, device, [s[2] for s in samples]), [s[1] for s in samples], scenes


class ShapesDataset(torch.utils.data.Dataset):
    """The :func:`shapes_batch` stream as a map-style dataset of ``(image [3, H, W], caption)``."""

    def __init__(self, length: int, seed: int = 0, split: str = "train", num_objects: int | None = None,
                 size: int = 128, world: str = DEFAULT_WORLD) -> None:
        check_size(size)
        check_world(world)
        if length < 0:
            raise InvalidInputError(f"length must be >= 0, got {length}")
        sample_scene(np.random.default_rng(0), num_objects, split)  # validates split / num_objects early
        self.length, self.seed, self.split, self.num_objects, self.size = length, seed, split, num_objects, size
        self.world = world

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        return drawn_at(self.seed, index, self.split, self.num_objects, self.world)[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        scene, text, drawing = drawn_at(self.seed, index, self.split, self.num_objects, self.world)
        return render_batch([scene], self.size, drawings=[drawing])[0], text
