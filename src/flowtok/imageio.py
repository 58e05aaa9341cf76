"""Image files in, RGB images out: decoding untrusted files safely and the pipeline's resize and crop.

Torch-free, so that the ONNX runtime (:mod:`flowtok.export.runtime`) prepares images exactly as
:class:`~flowtok.processing.ImageProcessor` and the data readers do, from the same code.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError, InvalidInputError

# A decoded image larger than this is refused: a small file can decode to gigabytes (a
# "decompression bomb"). 8192 x 8192 is far above any training resolution.
MAX_IMAGE_PIXELS = 8192 * 8192
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
# The only decoders PIL may use on a file, whatever its name says. The others are not needed for
# photographs, and some are dangerous on untrusted input: EPS hands the file to Ghostscript, which
# runs PostScript; IM, DDS, QOI and friends are rarely exercised parsers.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and float grey rescaled, transparency over white."""
    mode = image.mode
    if mode.startswith("I;16"):
        grey = np.asarray(image, dtype=np.float32) / 65535.0 * 255.0
        return Image.fromarray(np.round(grey).astype(np.uint8), "L").convert("RGB")
    if mode == "I":
        arr = np.asarray(image, dtype=np.float64)
        # Mode I holds 32-bit integers; values above 255 can only come from a 16-bit source.
        if arr.max(initial=0) > 255:
            arr = arr / 65535.0 * 255.0
        return Image.fromarray(np.round(arr.clip(0, 255)).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.max(initial=0) <= 1.0:  # a float image in [0, 1]
            arr = arr * 255.0
        return Image.fromarray(np.round(arr.clip(0, 255)).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        # Transparent pixels keep arbitrary colours under them; white is what a viewer shows.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def load_image(source: str | os.PathLike | bytes | bytearray | memoryview | Image.Image, max_pixels: int | None = MAX_IMAGE_PIXELS,
               name: str | None = None, draft: int | None = None) -> Image.Image:
    """Decode an image file, its bytes, or an (possibly lazily opened) PIL image into an RGB PIL image,
    fully loaded.

    Raises :class:`~flowtok.errors.DataError` (one line, naming ``name`` or the path) for a
    missing file, bytes that are not an image, a truncated or corrupt image, and an image of more
    than ``max_pixels`` pixels. Applies the EXIF orientation. Grey, 16-bit, float, palette, CMYK
    and transparent images come out as 8-bit RGB (transparency composited over white).
    """
    opened: Image.Image | None = None
    if isinstance(source, Image.Image):
        # The pipeline hands PIL images straight in; a lazily opened one is still undecoded, so it
        # gets the same format check, size limit and one-line errors as a file.
        label = name or "<PIL image>"
        opened = source
        stream: io.BytesIO | Path | None = None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        stream = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        label = name or str(path)
        if not path.is_file():
            raise DataError(f"{label}: image file not found")
        stream = path
    try:
        with warnings.catch_warnings():
            # PIL warns past its own limit; ours below is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = opened if opened is not None else Image.open(cast("io.BytesIO | Path", stream), formats=SUPPORTED_FORMATS)
            if image.format is not None and image.format not in SUPPORTED_FORMATS:
                raise DataError(f"{label}: an {image.format} image, which flowtok does not read ({_FORMATS_TEXT} only)")
            width, height = image.size
            if width < 1 or height < 1:
                raise DataError(f"{label}: image has no pixels ({width}x{height})")
            if max_pixels is not None and width * height > max_pixels:
                raise DataError(f"{label}: image of {width}x{height} pixels exceeds the limit of "
                                f"{max_pixels} pixels (possible decompression bomb)")
            if draft and image.format == "JPEG":
                # JPEG decodes at 1/2, 1/4 or 1/8 scale in the DCT for free; draft keeps both sides >= draft.
                image.draft("RGB", (draft, draft))
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return _to_rgb(image)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{label}: image too large (possible decompression bomb): {exc}") from None
    except UnidentifiedImageError:
        raise DataError(f"{label}: not a readable image file (flowtok reads {_FORMATS_TEXT})") from None
    except MemoryError:
        raise DataError(f"{label}: image too large to decode in memory") from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any decoder failure is a bad file, never a crash
        # PIL's parsers raise OSError, SyntaxError, ValueError, EOFError, struct.error (crafted EXIF),
        # IndexError, KeyError, TypeError, ZeroDivisionError, ... on hostile input.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{label}: truncated or corrupt image ({reason})") from None


_FORMATS_TEXT = "PNG, JPEG, WebP, BMP, GIF and TIFF"


def resize_and_crop(image: Image.Image, resolution: int, crop: str = "center",
                    rng: np.random.Generator | None = None) -> Image.Image:
    """Resize the shorter side to ``resolution`` and crop a ``resolution`` square (centre or random).

    The square is chosen in the source's coordinates and only it is resampled, so the cost is
    ``resolution**2`` whatever the aspect ratio: a 1 x 8,000,000 image would otherwise be resized to
    128 x 1,024,000,000 pixels before the crop.
    """
    width, height = image.size
    side = min(width, height)
    if crop == "random":
        rng = rng or np.random.default_rng()
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
    else:
        left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    if side == resolution:
        return image.crop(box)
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def input_image_array(item: object, size: int) -> np.ndarray:
    """One pipeline input (a uint8 HxW / HxWxC array, a PIL image, a path or file bytes) as a ``size`` x ``size``
    uint8 RGB array: the one image-input rule of the PyTorch pipeline and the ONNX runtime."""
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (1, 3, 4)):
            raise InvalidInputError(f"image arrays must be uint8 HxW or HxWxC with C in 1, 3, 4; "
                                    f"got {item.dtype} {item.shape}")
        if 0 in item.shape:
            raise InvalidInputError(f"image array has no pixels: {item.shape}")
        item = Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[2] == 1 else item)
    elif not isinstance(item, (Image.Image, str, os.PathLike, bytes)):
        raise InvalidInputError(f"cannot read an image from a {type(item).__name__}")
    if isinstance(item, Image.Image):
        if item.width * item.height > MAX_IMAGE_PIXELS:
            raise InvalidInputError(f"image of {item.width}x{item.height} pixels is too large")
        img = _to_rgb(item)
    else:
        img = load_image(item)
    return np.asarray(resize_and_crop(img, size).convert("RGB"), dtype=np.uint8)
