"""The captioned-shapes world: a tiny, fully known text-to-image domain.

A scene is one to three coloured shapes on a plain white background. Everything about it is
decided by its caption and nothing else, which makes it a benchmark with exact answers:

* :mod:`.world`: the vocabulary, :class:`Scene`, :func:`sample_scene` and the held-out rule
  :func:`scene_split` (some colour-shape pairs and relation combinations occur only in test
  prompts, to measure compositional generalisation);
* :mod:`.captions`: :func:`caption` writes one of several paraphrases, :func:`parse` reads any of
  them back exactly;
* :mod:`.render`: :func:`render` / :func:`render_batch` draw a scene (torch, signed-distance
  anti-aliasing, batched, any size from 64 to 512, CPU or GPU);
* :mod:`.judge`: :func:`judge` reads a scene back from pixels, so a generated image can be scored
  attribute by attribute (:func:`attribute_matches`);
* :mod:`.stream`: :func:`shapes_batch` / :class:`ShapesDataset` give a deterministic training
  stream (sample ``i`` is a pure function of ``(seed, i)``);
* :mod:`.export`: :func:`export_shapes` writes an image folder with ``captions.jsonl`` or
  webdataset tar shards;
* :mod:`.benchmark`: text-to-image, image-to-text and reconstruction benchmarks on the world
  (imported on its own: it pulls in the evaluation code).

The library's generic parts (data readers, training stages) know nothing of this package except
where a run's data is the shapes world (``data.kind == "shapes"``).
"""

from .captions import all_captions, caption, parse
from .export import export_shapes
from .judge import attribute_matches, judge, judge_batch, scene_matches
from .render import render, render_batch, tensor_to_pil
from .stream import ShapesDataset, sample_at, shapes_batch
from .world import (
    BACKGROUND,
    CELLS,
    COLORS,
    HELDOUT_COLOR_SHAPES,
    HELDOUT_RELATIONS,
    MAX_SIZE,
    MIN_SIZE,
    RELATIONS,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    Scene,
    ShapeObject,
    sample_scene,
    scene_split,
)

__all__ = [
    "BACKGROUND", "CELLS", "COLORS", "HELDOUT_COLOR_SHAPES", "HELDOUT_RELATIONS", "MAX_SIZE", "MIN_SIZE",
    "RELATIONS", "SHAPES", "SIZES", "SIZE_RADIUS", "Scene", "ShapeObject", "ShapesDataset", "all_captions",
    "attribute_matches", "caption", "export_shapes", "judge", "judge_batch", "parse", "render", "render_batch",
    "sample_at", "sample_scene", "scene_matches", "scene_split", "shapes_batch", "tensor_to_pil",
]
