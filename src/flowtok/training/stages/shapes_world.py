"""The one place the training stages meet the shapes world (:mod:`flowtok.shapes`).

Every stage evaluates on held-out shapes scenes, whose answers are exact (the judge reads a generated
image back, the parser reads a caption back), whatever data it trains on: the recipes train on
pre-tokenised shapes (``data.kind: latents``) and evaluate here. Text-only work (the text decoder's
captions, text-to-image distillation's prompts) draws captions from the world without rendering
images. A stage reaches all of this through ``stage.shapes``; to evaluate on another world, give a
stage an object with these methods.
"""

from __future__ import annotations

import torch

from ... import shapes
from ...errors import InvalidInputError
from ..data import DataConfig


class ShapesWorld:
    """Captions, held-out scenes and their scoring, for the stages of one run (``seed``, ``data``)."""

    def __init__(self, seed: int, data: DataConfig) -> None:
        self.seed, self.data = seed, data

    def train_captions(self, step: int, local_batch: int, rank: int, world: int) -> list[str]:
        """The captions of the shapes batch of this step and process, drawn without rendering its images."""
        start = (step * world + rank) * local_batch
        # The very captions shapes_batch gives these samples: a v2 caption names a white background only
        # when its drawing has one, so the drawing is sampled (not rendered) too.
        return [shapes.sample_at(self.seed, start + j, self.data.split, self.data.num_objects, self.data.world)[1]
                for j in range(local_batch)]

    def test_captions(self, n: int, stream: int) -> list[str]:
        """``n`` captions of held-out scenes (1 to 3 objects) from the evaluation stream ``stream``: those of
        :meth:`test_batch`'s scenes."""
        return [shapes.sample_at(self.seed + stream, i, "test", world=self.data.world)[1] for i in range(n)]

    def test_batch(self, n: int, stream: int, device: torch.device, num_objects: int | None = None,
                   size: int | None = None) -> tuple[torch.Tensor, list[str], list[shapes.Scene]]:
        """``n`` held-out scenes rendered at ``size`` (default: the run's image size): images, captions, scenes."""
        return shapes.shapes_batch(self.seed + stream, 0, n, split="test", num_objects=num_objects,
                                   size=size or self.data.size, device=device, world=self.data.world)

    @staticmethod
    def judge_exact(images: torch.Tensor, scenes: list[shapes.Scene]) -> float:
        """Fraction of ``images`` the judge reads back as exactly their scene."""
        judged = shapes.judge_batch(list(images.float().cpu()))
        return sum(shapes.scene_matches(p, t) for p, t in zip(judged, scenes)) / len(scenes)

    @staticmethod
    def caption_exact(captions: list[str], scenes: list[shapes.Scene]) -> float:
        """Fraction of ``captions`` that parse to exactly their scene (an unparseable one is wrong)."""
        ok = 0
        for text, truth in zip(captions, scenes):
            try:
                ok += shapes.scene_matches(shapes.parse(text), truth)
            except InvalidInputError:
                pass
        return ok / len(scenes)

    @staticmethod
    def scene_of(caption: str) -> shapes.Scene:
        """The scene a shapes caption describes (InvalidInputError for text that is not one)."""
        return shapes.parse(caption)

    @staticmethod
    def canonical_caption(scene: shapes.Scene | dict) -> str:
        """One fixed paraphrase of a scene (or of its ``to_dict`` form, as pre-tokenised shards store it)."""
        if isinstance(scene, dict):
            scene = shapes.Scene.from_dict(scene)
        return shapes.all_captions(scene)[0]
