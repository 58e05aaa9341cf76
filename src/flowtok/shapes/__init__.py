"""The captioned-shapes world: a tiny, fully known text-to-image domain.

A scene is one to three coloured shapes, each with a size word, in a named region or a row or
column. Everything a caption says is exact, which makes it a benchmark with exact answers; what it
does not say varies in the default world ``"v2"`` (position inside the region, radius inside the
size word's range, rotation, shade, background, drawing style), while ``"v1"`` keeps the original
canonical drawing so that old numbers can be measured again:

* :mod:`.world`: the vocabulary, :class:`Scene`, :func:`sample_scene`, the held-out rule
  :func:`scene_split` (some colour-shape pairs and relation combinations occur only in test
  prompts, to measure compositional generalisation), and :class:`Drawing` /
  :func:`sample_drawing` / :func:`canonical_drawing`, how a scene is drawn;
* :mod:`.captions`: :func:`caption` writes one of several paraphrases, :func:`parse` reads any of
  them back exactly;
* :mod:`.render`: :func:`render` / :func:`render_batch` draw a scene (torch, signed-distance
  anti-aliasing, batched, any size from 64 to 512, CPU or GPU);
* :mod:`.judge`: :func:`judge` reads a scene back from pixels, so a generated image can be scored
  attribute by attribute (:func:`attribute_matches`);
* :mod:`.stream`: :func:`shapes_batch` / :class:`ShapesDataset` give a deterministic training
  stream (sample ``i`` is a pure function of ``(seed, i)`` and the world; :func:`drawn_at`);
* :mod:`.grammar`: captions constrained to the world's grammar from a text decoder's scores
  (the pipeline's ``caption_grammar: shapes`` default), so a caption always parses;
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
from .stream import ShapesDataset, drawn_at, sample_at, shapes_batch
from .world import (
    BACKGROUND,
    CELLS,
    COLORS,
    DEFAULT_WORLD,
    HELDOUT_COLOR_SHAPES,
    HELDOUT_RELATIONS,
    MAX_SIZE,
    MIN_SIZE,
    RELATIONS,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    WORLDS,
    Drawing,
    Placement,
    Scene,
    ShapeObject,
    canonical_drawing,
    sample_drawing,
    sample_scene,
    scene_split,
)

__all__ = [
    "BACKGROUND", "CELLS", "COLORS", "HELDOUT_COLOR_SHAPES", "HELDOUT_RELATIONS", "MAX_SIZE", "MIN_SIZE",
    "RELATIONS", "SHAPES", "SIZES", "SIZE_RADIUS", "Scene", "ShapeObject", "ShapesDataset", "all_captions",
    "DEFAULT_WORLD", "WORLDS", "Drawing", "Placement", "canonical_drawing", "sample_drawing", "drawn_at",
    "attribute_matches", "caption", "export_shapes", "judge", "judge_batch", "parse", "render", "render_batch",
    "sample_at", "sample_scene", "scene_matches", "scene_split", "shapes_batch", "tensor_to_pil",
]
