"""Readers for users' own image-caption data (folders with a captions file, webdataset shards).

The captioned-shapes world, a synthetic data set of its own, is :mod:`flowtok.shapes`.
"""

from .readers import ImageCaptionFolder, WebDatasetReader, load_image

__all__ = ["ImageCaptionFolder", "WebDatasetReader", "load_image"]
