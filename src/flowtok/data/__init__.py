"""Data: the captioned-shapes world and readers for users' own image-caption data."""

from .readers import ImageCaptionFolder, WebDatasetReader, load_image
from .shapes import (
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesDataset,
    all_captions,
    attribute_matches,
    caption,
    export_shapes,
    judge,
    judge_batch,
    parse,
    render,
    render_batch,
    sample_scene,
    scene_matches,
    scene_split,
    shapes_batch,
)

__all__ = [
    "COLORS", "SHAPES", "SIZES", "Scene", "ShapeObject", "ShapesDataset", "all_captions",
    "attribute_matches", "caption", "export_shapes", "judge", "judge_batch", "parse", "render",
    "render_batch", "sample_scene", "scene_matches", "scene_split", "shapes_batch",
    "ImageCaptionFolder", "WebDatasetReader", "load_image",
]
