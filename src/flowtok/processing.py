"""The pipeline's input and output conversion: prompts in, images in, images out.

:func:`check_prompts` turns what a user passed as prompts into clean strings; :class:`ImageProcessor`
turns PIL images, paths, uint8 arrays or float tensors into the image tokenizer's ``[B, 3, H, W]``
input, and the decoder's output into PIL images, a numpy array or a tensor. Each raises one
:class:`~flowtok.errors.InvalidInputError` line naming the problem, so that
:class:`~flowtok.pipelines.FlowTokPipeline` checks its inputs once, here, and only orchestrates.
"""

from __future__ import annotations

import os
import unicodedata
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image

from .errors import CheckpointError, InvalidInputError
from .imageio import input_image_array

MAX_PROMPT_CHARS = 4096  # far beyond any text encoder's window; longer input is a mistake, not a prompt
_RANGE_SLACK = 0.25  # as the tokenizer: bicubic rings overshoot [0, 1] a little, [0, 255] input much more

OutputType = Literal["pil", "np", "pt"]
ImageInput = Image.Image | str | os.PathLike | np.ndarray | torch.Tensor
# "pil": one PIL image per sample; "np": float [B, H, W, 3] in [0, 1]; "pt": float [B, 3, H, W] in [0, 1] on the CPU.
ImageOutput = list[Image.Image] | np.ndarray | torch.Tensor


def _clean_prompt(prompt: Any, index: int) -> str:
    if not isinstance(prompt, str):
        raise InvalidInputError(f"prompt {index} is a {type(prompt).__name__}, expected a string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInputError(f"prompt {index} has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    # Control characters carry no meaning for the text encoder; collapse them to spaces.
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in prompt)
    text = " ".join(text.split())
    if not text:
        raise InvalidInputError(f"prompt {index} is empty")
    return text


def check_prompts(prompt: str | list[str] | tuple[str, ...]) -> list[str]:
    """One prompt or a list of them -> a non-empty list of cleaned, non-empty strings."""
    if not isinstance(prompt, (str, list, tuple)):  # a dict or a generator would be silently iterated
        raise InvalidInputError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise InvalidInputError("no prompt given")
    return [_clean_prompt(p, i) for i, p in enumerate(prompts)]


def check_output_type(output_type: Any) -> OutputType:
    if output_type not in get_args(OutputType):
        raise InvalidInputError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
    return output_type


class ImageProcessor:
    """Images to and from the image tokenizer's ``[B, 3, size, size]`` float tensors in [0, 1]."""

    def __init__(self, size: int) -> None:
        self.size = size

    def preprocess(self, images: ImageInput | list[ImageInput], device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """PIL images, paths, uint8 ``HxW[xC]`` arrays or one ``[B,3,H,W]`` / ``[3,H,W]`` float tensor in [0, 1]
        -> ``[B, 3, size, size]`` (resized and centre-cropped; a tensor is resized as it is)."""
        if isinstance(images, torch.Tensor):
            return self._tensor(images).to(device, dtype)
        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise InvalidInputError("no image given")
        arrays = [input_image_array(item, self.size) for item in items]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return batch.to(device, dtype)

    def _tensor(self, images: torch.Tensor) -> torch.Tensor:
        t = images if images.dim() == 4 else images[None]
        if t.dim() != 4 or t.shape[1] != 3 or 0 in t.shape:
            raise InvalidInputError(f"image tensor must be [B,3,H,W] and non-empty, got {tuple(images.shape)}")
        if not t.is_floating_point():
            raise InvalidInputError(f"image tensor must be float in [0, 1], got {t.dtype}")
        if not torch.isfinite(t).all():
            raise InvalidInputError("image tensor contains NaN or inf")
        lo, hi = float(t.min()), float(t.max())
        if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            # Clamping a [-1, 1] or [0, 255] tensor would caption a different image without a word.
            raise InvalidInputError(f"image tensor values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        if t.shape[-2:] != (self.size, self.size):
            t = torch.nn.functional.interpolate(t.float(), size=(self.size, self.size), mode="bilinear",
                                                antialias=True, align_corners=False)
        return t.clamp(0, 1)

    @staticmethod
    def postprocess(images: torch.Tensor, output_type: OutputType = "pil") -> ImageOutput:
        """Decoder output ``[B, 3, H, W]`` -> ``output_type`` (see :data:`ImageOutput`)."""
        if not torch.isfinite(images).all():
            raise CheckpointError("the image decoder produced NaN or inf; its weights may be corrupt")
        images = images.float().clamp(0, 1)
        if output_type == "pt":
            return images.cpu()
        arr = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return arr
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
