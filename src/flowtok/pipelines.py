"""FlowTokPipeline: text -> image and image -> text with one object, diffusers-style.

A pipeline folder holds one sub-folder per component (each ``config.json`` + ``model.safetensors``)
and ``pipeline.json`` naming them, the text encoder to load, and the default sampling settings::

    flowtok-shapes/
      pipeline.json
      tokenizer/  text_projector/  t2i_flow/  i2t_flow/  text_decoder/

The pipeline only orchestrates: the models live in :mod:`flowtok.tokenizer`, :mod:`flowtok.text`
and :mod:`flowtok.flow`; the ODE solvers in :mod:`flowtok.sampling`.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .config import atomic_write_text
from .errors import CheckpointError, InvalidInputError

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
BUNDLED_MODEL = Path(__file__).parent / "pretrained" / "flowtok-shapes"
MAX_PROMPT_CHARS = 4096  # far beyond any text encoder's window; longer input is a mistake, not a prompt
MAX_GUIDANCE_SCALE = 100.0  # the paper uses 1.5-3; far beyond, latents overflow
MAX_INFERENCE_STEPS = 1000  # the paper samples with tens of steps; a million is a typo that would look like a hang
COMPONENTS = ("tokenizer", "text_projector", "t2i_flow", "i2t_flow", "text_decoder")

ImageInput = Image.Image | str | os.PathLike | np.ndarray | torch.Tensor


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


def _check_steps(steps: Any, name: str = "num_inference_steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_INFERENCE_STEPS:
        raise InvalidInputError(f"{name} must be an integer from 1 to {MAX_INFERENCE_STEPS}, got {steps!r}")
    return int(steps)


def _check_guidance(scale: Any) -> float:
    # abs() first: np.isfinite raises TypeError on an int beyond int64 (10**30 from a pipeline.json).
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or abs(scale) > MAX_GUIDANCE_SCALE \
            or not np.isfinite(scale):
        # 1e30 overflows the latents to inf, which would then be blamed on the weights.
        raise InvalidInputError(f"guidance_scale must be a number from -{MAX_GUIDANCE_SCALE:g} to "
                                f"{MAX_GUIDANCE_SCALE:g}, got {scale!r}")
    return float(scale)


def _check_batch_size(batch_size: int | None, n: int) -> int:
    if batch_size is None:
        return n
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _component_classes() -> dict[str, type]:
    """The model class of each pipeline component (imported lazily: they pull in torch-heavy modules)."""
    from .flow import FlowTransformer
    from .text import TextDecoder, TextProjector
    from .tokenizer import ImageTokenizer

    return {"tokenizer": ImageTokenizer, "text_projector": TextProjector, "t2i_flow": FlowTransformer,
            "i2t_flow": FlowTransformer, "text_decoder": TextDecoder}


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """A local folder, the bundled model (None), or a Hub repo id downloaded to the local cache."""
    if path is None:
        if not (BUNDLED_MODEL / PIPELINE_FILE).is_file():
            raise CheckpointError(f"the bundled model is missing from {BUNDLED_MODEL}")
        return BUNDLED_MODEL
    p = Path(path)
    if p.exists():
        if not (p / PIPELINE_FILE).is_file():
            raise CheckpointError(f"{p} is not a flowtok pipeline folder (no {PIPELINE_FILE})")
        return p
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text))
        except Exception as exc:  # noqa: BLE001 - offline, missing repo, auth: all one user-facing message
            raise CheckpointError(f"cannot get '{text}' from the Hugging Face Hub: {type(exc).__name__}") from None
    raise CheckpointError(f"model folder not found: {p}")


class FlowTokPipeline:
    """Text-to-image and image-to-text with FlowTok.

    Example::

        pipe = FlowTokPipeline.from_pretrained()          # the bundled flowtok-shapes model
        images = pipe.text_to_image("a large red circle in the top left", generator=torch.Generator().manual_seed(0))
        captions = pipe.image_to_text(images)
    """

    def __init__(self, tokenizer, text_encoder, text_projector, t2i_flow=None, i2t_flow=None,
                 text_decoder=None, text_encoder_spec: dict[str, Any] | None = None,
                 defaults: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.text_projector = text_projector
        self.t2i_flow = t2i_flow
        self.i2t_flow = i2t_flow
        self.text_decoder = text_decoder
        self.text_encoder_spec = text_encoder_spec or {"name": "minilm"}
        self.defaults = {"num_inference_steps": 20, "guidance_scale": 2.0, "caption_guidance_scale": 1.0,
                         **(defaults or {})}
        self.model_path: Path | None = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # ------------------------------------------------------------------------------- loading / saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> FlowTokPipeline:
        from .model_checks import check_components, read_pipeline_spec
        from .text import load_text_encoder

        root = resolve_model_path(path)
        spec = read_pipeline_spec(root / PIPELINE_FILE, COMPONENTS)
        comps = spec.get("components", {})
        classes = _component_classes()
        loaded: dict[str, Any] = {}
        for name, klass in classes.items():
            sub = comps.get(name)
            loaded[name] = klass.from_pretrained(root / sub) if sub else None
        if loaded["tokenizer"] is None or loaded["text_projector"] is None:
            raise CheckpointError(f"{root}: a pipeline needs at least a tokenizer and a text_projector")
        text_spec = spec.get("text_encoder", {"name": "minilm"})
        encoder = load_text_encoder(text_spec, max_length=loaded["tokenizer"].config.num_latent_tokens)
        check_components({k: m.config for k, m in loaded.items() if m is not None}, str(root), encoder.dim)
        pipe = cls(loaded["tokenizer"], encoder, loaded["text_projector"], loaded["t2i_flow"], loaded["i2t_flow"],
                   loaded["text_decoder"], text_encoder_spec=text_spec, defaults=spec.get("defaults"))
        pipe.model_path = root
        pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype)
        return pipe

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        comps = {}
        for name in COMPONENTS:
            model = getattr(self, name)
            if model is not None:
                model.save_pretrained(root / name, dtype=dtype)
                comps[name] = name
        spec = {"pipeline_type": "flowtok", "components": comps, "text_encoder": self.text_encoder_spec,
                "defaults": self.defaults}
        atomic_write_text(root / PIPELINE_FILE, json.dumps(spec, indent=2) + "\n")
        return root

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FlowTokPipeline:
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        for name in COMPONENTS:
            model = getattr(self, name)
            if model is not None:
                model.to(device=self.device, dtype=self.dtype).eval()
        self.text_encoder.to(self.device)
        return self

    def quantize_fp8(self, calibration_prompts: str | list[str] | None = None,
                     calibration_images: ImageInput | list[ImageInput] | None = None,
                     emulate: bool = False) -> FlowTokPipeline:
        """Run both flow transformers in FP8 on a Hopper / Ada GPU (:meth:`FlowTransformer.quantize_fp8`);
        the tokenizer, projector and text decoder keep their dtype. Inference only: the pipeline can no
        longer be saved. Raises on a device without FP8 matmuls. Returns self.

        Static scales: the text-to-image flow's are measured while generating ``calibration_prompts``, the
        image-to-text flow's while captioning ``calibration_images`` (or else the images just generated
        from the prompts). A flow with nothing to calibrate on scales its inputs per token on the fly. ``emulate=True``
        computes the same quantised numbers with float matmuls on any device (a numerics check, slow).
        """
        prompts = self._prompts(calibration_prompts) if calibration_prompts is not None else None
        made: dict[str, Any] = {}
        if self.t2i_flow is not None:
            run = None if prompts is None else (
                lambda: made.setdefault("images", self.text_to_image(prompts, output_type="pt")))
            self.t2i_flow.quantize_fp8(emulate=emulate, calibrate=run)
        if self.i2t_flow is not None:
            images = calibration_images if calibration_images is not None else made.get("images")
            run = None if images is None or self.text_decoder is None else (lambda: self.image_to_text(images))
            self.i2t_flow.quantize_fp8(emulate=emulate, calibrate=run)
        return self

    # ------------------------------------------------------------------------------------- encoders
    def _prompts(self, prompt: str | list[str]) -> list[str]:
        if not isinstance(prompt, (str, list, tuple)):  # a dict or a generator would be silently iterated
            raise InvalidInputError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InvalidInputError("no prompt given")
        return [_clean_prompt(p, i) for i, p in enumerate(prompts)]

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], generator: torch.Generator | None = None,
                      sample: bool = True):
        """Text latents [B, K, C] (t = 0 of the T2I flow) and the text states the decoder may read."""
        ts = self.text_encoder.encode(self._prompts(prompt))
        states = ts.states.to(self.device, self.dtype)
        out = self.text_projector(states, ts.mask.to(self.device), sample=sample, generator=generator)
        return (out.z if sample else out.mean), states

    def _image_tensor(self, images: ImageInput | list[ImageInput]) -> torch.Tensor:
        from .data.readers import MAX_IMAGE_PIXELS, _to_rgb, load_image, resize_and_crop

        size = self.tokenizer.config.image_size
        if isinstance(images, torch.Tensor):
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
            if t.shape[-2:] != (size, size):
                t = torch.nn.functional.interpolate(t.float(), size=(size, size), mode="bilinear",
                                                    antialias=True, align_corners=False)
            return t.clamp(0, 1).to(self.device, self.dtype)
        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise InvalidInputError("no image given")
        arrays = []
        for item in items:
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
            arrays.append(np.asarray(resize_and_crop(img, size).convert("RGB"), dtype=np.uint8))
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return batch.to(self.device, self.dtype)

    @torch.no_grad()
    def encode_image(self, images: ImageInput | list[ImageInput]) -> torch.Tensor:
        """Scaled image latents [B, K, C] (t = 1 of the T2I flow, t = 0 of the I2T flow)."""
        return self.tokenizer.encode(self._image_tensor(images)) * self.tokenizer.scale_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, text_states: torch.Tensor | None = None) -> torch.Tensor:
        if self.tokenizer.config.text_dim == 0:
            text_states = None
        return self.tokenizer.decode(latents / self.tokenizer.scale_factor, text_states=text_states).clamp(0, 1)

    # ------------------------------------------------------------------------------------ sampling
    def _solve(self, model, x0: torch.Tensor, steps: int, guidance: float, sampler: str, progress: bool,
               t_end: float = 1.0) -> torch.Tensor:
        from .sampling import sample

        if model is None:
            raise InvalidInputError("this pipeline lacks the flow model this call needs")
        if sampler not in ("euler", "heun", "euler-upstream"):
            raise InvalidInputError(f"sampler must be 'euler', 'heun' or 'euler-upstream', got {sampler!r}")
        out = sample(model, x0, method=sampler, num_steps=_check_steps(steps), guidance_scale=_check_guidance(guidance),
                     progress=progress, t_end=t_end)
        if not torch.isfinite(out).all():
            # A NaN latent decodes to a black image or a garbage caption; say so instead.
            raise CheckpointError("the flow model produced NaN or inf; its weights may be corrupt "
                                  f"(model folder: {self.model_path or 'in memory'})")
        return out

    @staticmethod
    def _output(images: torch.Tensor, output_type: str):
        if not torch.isfinite(images).all():
            raise CheckpointError("the image decoder produced NaN or inf; its weights may be corrupt")
        images = images.float().clamp(0, 1)
        if output_type == "pt":
            return images.cpu()
        arr = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return arr
        if output_type == "pil":
            return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
        raise InvalidInputError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")

    @torch.no_grad()
    def text_to_image(self, prompt: str | list[str], num_inference_steps: int | None = None,
                      guidance_scale: float | None = None, generator: torch.Generator | None = None,
                      output_type: Literal["pil", "np", "pt"] = "pil", batch_size: int | None = None,
                      sampler: Literal["euler", "heun"] = "euler", progress: bool = False,
                      sample_text_latent: bool = True):
        """Images for ``prompt`` (a string or a list). FlowTok has no noise: the randomness of several
        images for one prompt comes from sampling the text projector's posterior with ``generator``;
        ``sample_text_latent=False`` uses its mean (one image per prompt)."""
        if self.t2i_flow is None:
            raise InvalidInputError("this pipeline has no text-to-image flow model")
        steps = self.defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance = self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        _check_steps(steps)
        _check_guidance(guidance)
        if output_type not in ("pil", "np", "pt"):
            raise InvalidInputError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        prompts = self._prompts(prompt)
        bs = _check_batch_size(batch_size, len(prompts))
        out = []
        for i in range(0, len(prompts), bs):
            z, states = self.encode_prompt(prompts[i:i + bs], generator=generator, sample=sample_text_latent)
            lat = self._solve(self.t2i_flow, z, steps, guidance, sampler, progress)
            out.append(self.decode_latents(lat, states))
        return self._output(torch.cat(out), output_type)

    @torch.no_grad()
    def caption_latents(self, text_latents: torch.Tensor) -> list[str]:
        """Captions of text latents: the decoder's argmax, or with ``defaults["caption_grammar"] ==
        "shapes"`` its best caption of the shapes world's grammar (always parseable)."""
        if self.text_decoder is None:
            raise InvalidInputError("this pipeline has no text decoder")
        grammar = self.defaults.get("caption_grammar")
        if grammar == "shapes":
            from .shapes.grammar import grammar_decode

            return grammar_decode(self.text_decoder, text_latents, self.text_encoder)
        if grammar is not None:
            raise InvalidInputError(f"unknown caption_grammar {grammar!r}; expected 'shapes' or none")
        return self.text_decoder.decode(text_latents, self.text_encoder)

    @torch.no_grad()
    def image_to_text(self, images: ImageInput | list[ImageInput], num_inference_steps: int | None = None,
                      guidance_scale: float | None = None, batch_size: int | None = None,
                      sampler: Literal["euler", "heun"] = "euler", progress: bool = False) -> list[str]:
        """One caption per image (PIL images, paths, uint8 arrays or a [B,3,H,W] tensor in [0, 1])."""
        if self.i2t_flow is None or self.text_decoder is None:
            raise InvalidInputError("this pipeline has no image-to-text flow model and text decoder")
        steps = self.defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance = self.defaults["caption_guidance_scale"] if guidance_scale is None else guidance_scale
        _check_steps(steps)
        _check_guidance(guidance)
        x = self._image_tensor(images)
        bs = _check_batch_size(batch_size, x.shape[0])
        captions: list[str] = []
        for i in range(0, x.shape[0], bs):
            lat = self.tokenizer.encode(x[i:i + bs]) * self.tokenizer.scale_factor
            z = self._solve(self.i2t_flow, lat, steps, guidance, sampler, progress)
            captions.extend(self.caption_latents(z))
        return captions

    # ------------------------------------------------------------------------- beyond the paper
    def roundtrip_image(self, images, **kwargs) -> tuple[list[str], list[Image.Image]]:
        """image -> caption -> image."""
        captions = self.image_to_text(images, **kwargs)
        return captions, self.text_to_image(captions, sample_text_latent=False, **kwargs)

    def roundtrip_text(self, prompt: str | list[str], **kwargs) -> tuple[list[Image.Image], list[str]]:
        """caption -> image -> caption."""
        images = self.text_to_image(prompt, sample_text_latent=False, **kwargs)
        return images, self.image_to_text(images, **kwargs)

    @torch.no_grad()
    def interpolate(self, start: str | ImageInput, end: str | ImageInput, num_frames: int = 8,
                    num_inference_steps: int | None = None, guidance_scale: float | None = None,
                    output_type: Literal["pil", "np", "pt"] = "pil"):
        """Frames between two prompts, or between a prompt and an image (either order).

        Both ends are brought to the text-latent space (an image through the I2T flow), the text
        latents are linearly interpolated, and every frame is generated by the T2I flow, so each
        frame is an image the model would draw for some point between the two descriptions.
        """
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 2 <= num_frames <= 1000:
            raise InvalidInputError(f"num_frames must be an integer from 2 to 1000, got {num_frames!r}")
        steps = self.defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps

        def text_latent(x):
            if isinstance(x, str):
                return self.encode_prompt(x, sample=False)[0]
            if self.i2t_flow is None:
                raise InvalidInputError("interpolating from an image needs the image-to-text flow model")
            lat = self.encode_image(x)
            return self._solve(self.i2t_flow, lat, steps, self.defaults["caption_guidance_scale"], "euler", False)

        za, zb = text_latent(start), text_latent(end)
        w = torch.linspace(0, 1, num_frames, device=self.device, dtype=za.dtype)[:, None, None]
        z = (1 - w) * za + w * zb
        guidance = self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        lat = self._solve(self.t2i_flow, z, steps, guidance, "euler", False)
        return self._output(self.decode_latents(lat), output_type)


_RANGE_SLACK = 0.25  # as the tokenizer: bicubic rings overshoot [0, 1] a little, [0, 255] input much more


def assemble_pipeline(out: str | os.PathLike, components: dict[str, str | os.PathLike],
                      text_encoder: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Gather trained component folders (as the training stages export them) into one pipeline folder.

    ``components`` maps names from :data:`COMPONENTS` to ``save_pretrained`` folders; each is loaded
    (so a broken one fails here, not at a user's first call) and re-saved, in ``dtype`` if given.
    """
    classes = _component_classes()
    unknown = sorted(set(components) - set(classes))
    if unknown:
        raise InvalidInputError(f"unknown pipeline component '{unknown[0]}' (known: {', '.join(classes)})")
    for required in ("tokenizer", "text_projector"):
        if required not in components:
            raise InvalidInputError(f"a pipeline needs a {required}")
    from .model_checks import check_components, check_defaults

    check_defaults(defaults, "defaults")
    # Shapes agree before anything is loaded or written (a mismatch would otherwise surface as a matmul error).
    check_components({name: classes[name].read_config(src) for name, src in components.items()}, "assemble")
    root = Path(out)
    names = {}
    for name, src in components.items():
        model = classes[name].from_pretrained(src)
        model.save_pretrained(root / name, dtype=dtype)
        names[name] = name
    spec = {"pipeline_type": "flowtok", "components": names, "text_encoder": text_encoder or {"name": "minilm"},
            "defaults": {"num_inference_steps": 20, "guidance_scale": 2.0, "caption_guidance_scale": 1.0,
                         **(defaults or {})}}
    atomic_write_text(root / PIPELINE_FILE, json.dumps(spec, indent=2) + "\n")
    return root
