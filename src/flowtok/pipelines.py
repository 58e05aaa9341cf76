"""FlowTokPipeline: text -> image and image -> text with one object, diffusers-style.

A pipeline folder holds one sub-folder per component (each ``config.json`` + ``model.safetensors``)
and ``pipeline.json`` naming them, the text encoder to load, and the default sampling settings::

    flowtok-shapes/
      pipeline.json
      tokenizer/  text_projector/  t2i_flow/  i2t_flow/  text_decoder/

The image tokenizer's folder keeps the name ``tokenizer/`` (every pipeline folder and training export
already has it); in Python it is ``pipe.image_tokenizer``, since diffusers users read ``tokenizer`` as
the text tokenizer. The pipeline only orchestrates: the models live in :mod:`flowtok.tokenizer`,
:mod:`flowtok.text` and :mod:`flowtok.flow`, the ODE solvers in :mod:`flowtok.sampling`, input and
output conversion in :mod:`flowtok.processing`. Each public method checks its arguments once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import numpy as np
import torch

from .config import atomic_write_text
from .errors import CheckpointError, InvalidInputError
from .modeling import looks_like_hub_id
from .processing import (
    MAX_PROMPT_CHARS,
    ImageInput,
    ImageOutput,
    ImageProcessor,
    OutputType,
    check_output_type,
    check_prompts,
)

if TYPE_CHECKING:
    from .fast import FastTextToImage
    from .flow import FlowTransformer
    from .modeling import PretrainedMixin
    from .text import TextDecoder, TextEncoder, TextProjector
    from .tokenizer import ImageTokenizer

__all__ = ["BUNDLED_MODEL", "COMPONENTS", "MAX_PROMPT_CHARS", "FlowTokPipeline", "SamplingDefaults",
           "assemble_pipeline", "resolve_model_path", "write_pipeline_spec"]

PIPELINE_FILE = "pipeline.json"
BUNDLED_MODEL = Path(__file__).parent / "pretrained" / "flowtok-shapes"
MAX_GUIDANCE_SCALE = 100.0  # the paper uses 1.5-3; far beyond, latents overflow
MAX_INFERENCE_STEPS = 1000  # the paper samples with tens of steps; a million is a typo that would look like a hang
# pipeline attribute -> its sub-folder and its key in pipeline.json
COMPONENTS = {"image_tokenizer": "tokenizer", "text_projector": "text_projector", "t2i_flow": "t2i_flow",
              "i2t_flow": "i2t_flow", "text_decoder": "text_decoder"}
# euler-upstream: the FlowTok release's grid, to reproduce its samples (flowtok.sampling.upstream_euler_sample)
Sampler = Literal["euler", "heun", "euler-upstream"]


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling settings a call uses when it leaves them out. These are upstream's evaluation settings
    (``sample.sample_steps=20``, ``sample.scale=2``); a pipeline folder's ``pipeline.json`` ``"defaults"``
    override them field by field (the bundled model samples at guidance 3.0). The CLI, the demo and
    ``flowtok eval`` read them from ``pipe.defaults``; the training stages evaluate with them too."""

    num_inference_steps: int = 20
    guidance_scale: float = 2.0  # text to image
    caption_guidance_scale: float = 1.0  # image to text
    sampler: Sampler = "euler"
    # "shapes": captions are the text decoder's best sentence of the shapes world's grammar (always parseable).
    caption_grammar: Literal["shapes"] | None = None

    def __post_init__(self) -> None:
        if self.caption_grammar not in (None, "shapes"):
            raise InvalidInputError(f"caption_grammar must be 'shapes' or null, got {self.caption_grammar!r}")
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_INFERENCE_STEPS:
            raise InvalidInputError(f"num_inference_steps must be an integer from 1 to {MAX_INFERENCE_STEPS}, "
                                    f"got {steps!r}")
        for name in ("guidance_scale", "caption_guidance_scale"):
            scale = getattr(self, name)
            # abs() first: np.isfinite raises TypeError on an int beyond int64 (10**30 from a pipeline.json);
            # 1e30 overflows the latents to inf, which would then be blamed on the weights.
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or abs(scale) > MAX_GUIDANCE_SCALE \
                    or not np.isfinite(scale):
                raise InvalidInputError(f"{name} must be a number from -{MAX_GUIDANCE_SCALE:g} to "
                                        f"{MAX_GUIDANCE_SCALE:g}, got {scale!r}")
        if self.sampler not in get_args(Sampler):
            raise InvalidInputError(f"sampler must be one of {', '.join(get_args(Sampler))}, got {self.sampler!r}")

    def override(self, **values: Any) -> SamplingDefaults:
        """These settings with every non-None value of ``values`` in place (checked)."""
        unknown = sorted(set(values) - {f.name for f in fields(self)})
        if unknown:
            raise InvalidInputError(f"unknown sampling setting '{unknown[0]}' "
                                    f"(known: {', '.join(f.name for f in fields(self))})")
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_json(cls, data: Any, source: str) -> SamplingDefaults:
        """``pipeline.json``'s ``"defaults"`` over the class's; unknown keys or bad values are a CheckpointError."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: \"defaults\" must be a JSON object, got {type(data).__name__}")
        try:
            return cls().override(**data)
        except InvalidInputError as exc:
            raise CheckpointError(f"{source}: {exc}") from None


def _component_classes() -> dict[str, type[PretrainedMixin]]:
    """The model class of each pipeline component (imported lazily: they pull in torch-heavy modules)."""
    from .flow import FlowTransformer
    from .text import TextDecoder, TextProjector
    from .tokenizer import ImageTokenizer

    return {"image_tokenizer": ImageTokenizer, "text_projector": TextProjector, "t2i_flow": FlowTransformer,
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
    if looks_like_hub_id(text):
        try:
            import huggingface_hub

            return Path(huggingface_hub.snapshot_download(text))
        except Exception as exc:  # noqa: BLE001 - offline, missing repo, auth: all one user-facing message
            raise CheckpointError(f"cannot get '{text}' from the Hugging Face Hub: {type(exc).__name__}") from None
    raise CheckpointError(f"model folder not found: {p}")


def write_pipeline_spec(root: Path, components: dict[str, str], text_encoder: dict[str, Any],
                        defaults: SamplingDefaults) -> None:
    """``pipeline.json``: the component folders (keyed by folder name), the text encoder, the sampling defaults."""
    spec = {"pipeline_type": "flowtok", "components": components, "text_encoder": text_encoder,
            "defaults": asdict(defaults)}
    atomic_write_text(Path(root) / PIPELINE_FILE, json.dumps(spec, indent=2) + "\n")


class FlowTokPipeline:
    """Text-to-image and image-to-text with FlowTok.

    Example::

        pipe = FlowTokPipeline.from_pretrained()          # the bundled flowtok-shapes model
        images = pipe.text_to_image("a large red circle in the top left", generator=torch.Generator().manual_seed(0))
        captions = pipe.image_to_text(images)
    """

    def __init__(self, image_tokenizer: ImageTokenizer, text_encoder: TextEncoder, text_projector: TextProjector,
                 t2i_flow: FlowTransformer | None = None, i2t_flow: FlowTransformer | None = None,
                 text_decoder: TextDecoder | None = None, text_encoder_spec: dict[str, Any] | None = None,
                 defaults: SamplingDefaults | dict[str, Any] | None = None) -> None:
        self.image_tokenizer = image_tokenizer
        self.text_encoder = text_encoder
        self.text_projector = text_projector
        self.t2i_flow = t2i_flow
        self.i2t_flow = i2t_flow
        self.text_decoder = text_decoder
        self.text_encoder_spec = text_encoder_spec or {"name": "minilm"}
        if not isinstance(defaults, SamplingDefaults):
            defaults = SamplingDefaults().override(**(defaults or {}))
        self.defaults = defaults
        self.image_processor = ImageProcessor(image_tokenizer.config.image_size)
        self.model_path: Path | None = None
        self.fast: FastTextToImage | None = None  # set by enable_fast_inference
        # Where the components already are: a training stage builds a pipeline around the modules it
        # trains, and the pipeline must neither move them nor switch them to eval mode.
        param = next(image_tokenizer.parameters())
        self.device, self.dtype = param.device, param.dtype

    # ------------------------------------------------------------------------------- loading / saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> FlowTokPipeline:
        """A pipeline folder, a Hub id, or (None) the bundled model; on CUDA when available unless ``device``."""
        from .model_checks import check_components, read_pipeline_spec
        from .text import load_text_encoder

        root = resolve_model_path(path)
        spec = read_pipeline_spec(root / PIPELINE_FILE, tuple(COMPONENTS.values()))
        comps = spec.get("components", {})
        loaded: dict[str, Any] = {}
        for attr, klass in _component_classes().items():
            sub = comps.get(COMPONENTS[attr])
            loaded[attr] = klass.from_pretrained(root / sub) if sub else None
        if loaded["image_tokenizer"] is None or loaded["text_projector"] is None:
            raise CheckpointError(f"{root}: a pipeline needs at least a tokenizer and a text_projector")
        text_spec = spec.get("text_encoder", {"name": "minilm"})
        encoder = load_text_encoder(text_spec, max_length=loaded["image_tokenizer"].config.num_latent_tokens)
        check_components({COMPONENTS[a]: m.config for a, m in loaded.items() if m is not None}, str(root), encoder.dim)
        defaults = SamplingDefaults.from_json(spec.get("defaults", {}), str(root / PIPELINE_FILE))
        pipe = cls(**loaded, text_encoder=encoder, text_encoder_spec=text_spec, defaults=defaults)
        pipe.model_path = root
        return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype)

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        comps = {}
        for attr, folder in COMPONENTS.items():
            model = getattr(self, attr)
            if model is not None:
                model.save_pretrained(root / folder, dtype=dtype)
                comps[folder] = folder
        write_pipeline_spec(root, comps, self.text_encoder_spec, self.defaults)
        return root

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FlowTokPipeline:
        """Move every component (and put the models in eval mode); returns self."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        for attr in COMPONENTS:
            model = getattr(self, attr)
            if model is not None:
                model.to(device=self.device, dtype=self.dtype).eval()
        self.text_encoder.to(self.device)
        return self

    def enable_fast_inference(self, batch_size: int | None = None, compile: bool | None = None,
                              cuda_graph: bool | None = None, fused_flow: bool = True,
                              gemm_epilogues: str = "auto") -> FlowTokPipeline:
        """Make :meth:`text_to_image` fast (:mod:`flowtok.fast`): the fused DiT path for the flow at large
        batches, regionally compiled flow and decoder blocks, and on CUDA the whole call after tokenisation
        (text encoder, projector, every step, decoder) replayed from one CUDA graph per batch shape.
        ``batch_size``: prompts per replay (shorter calls are padded: one graph serves all); None, one graph
        per batch size seen. Same images as before up to kernel rounding. The first call of each shape pays
        the compile and capture. ``gemm_epilogues``: ``"auto"`` (the default: flowtok's Triton
        GEMMs for an FP8 flow's epilogues, cuBLAS for plain Linears), ``"pytorch"`` or ``"triton"``
        (:meth:`flowtok.flow.FlowTransformer.enable_fused_inference`). Returns self;
        :meth:`disable_fast_inference` undoes it."""
        from .fast import FastTextToImage

        self.disable_fast_inference()
        self.fast = FastTextToImage(self, batch_size=batch_size, compile=compile, cuda_graph=cuda_graph,
                                    fused_flow=fused_flow, gemm_epilogues=gemm_epilogues)
        return self

    def disable_fast_inference(self) -> FlowTokPipeline:
        if self.fast is not None:
            self.fast.close()
            self.fast = None
        return self

    def quantize_fp8(self, calibration_prompts: str | list[str] | None = None,
                     calibration_images: ImageInput | list[ImageInput] | None = None,
                     emulate: bool = False, layers: Sequence[str] | None = None) -> FlowTokPipeline:
        """Run both flow transformers in FP8 on a Hopper / Ada GPU (:meth:`FlowTransformer.quantize_fp8`);
        the tokenizer, projector and text decoder keep their dtype. Inference only: the pipeline can no
        longer be saved. Raises on a device without FP8 matmuls. Call it before :meth:`enable_fast_inference`,
        which then samples the FP8 flow through the fused path. ``layers``: which block Linears (qkv, proj, fc1,
        fc2; None: all four). Returns self.

        Static scales: the text-to-image flow's are measured while generating ``calibration_prompts``, the
        image-to-text flow's while captioning ``calibration_images`` (or else the images just generated
        from the prompts). A flow with nothing to calibrate on scales its inputs per token on the fly. ``emulate=True``
        computes the same quantised numbers with float matmuls on any device (a numerics check, slow).
        """
        if self.fast is not None:
            raise InvalidInputError("quantize the flows before enable_fast_inference(): the fast path has "
                                    "compiled and captured the bf16 flow")
        prompts = check_prompts(calibration_prompts) if calibration_prompts is not None else None
        made: dict[str, Any] = {}
        if self.t2i_flow is not None:
            run = None if prompts is None else (
                lambda: made.setdefault("images", self.text_to_image(prompts, output_type="pt",
                                                                      generator=self._calibration_generator())))
            self.t2i_flow.quantize_fp8(emulate=emulate, calibrate=run, layers=layers)
        if self.i2t_flow is not None:
            images = calibration_images if calibration_images is not None else made.get("images")
            run = None if images is None or self.text_decoder is None else (lambda: self.image_to_text(images))
            self.i2t_flow.quantize_fp8(emulate=emulate, calibrate=run, layers=layers)
        return self

    def quantize_decoder_fp8(self, calibration_prompts: str | list[str] | None = None,
                             emulate: bool = False) -> FlowTokPipeline:
        """Run the image decoder's transformer blocks in FP8 on a Hopper / Ada GPU
        (:meth:`flowtok.tokenizer.ImageTokenizer.quantize_decoder_fp8`): at one sampling step the decoder is
        most of a text-to-image call. Static scales measured while generating ``calibration_prompts`` (else
        per-token scales on the fly). Call it before :meth:`enable_fast_inference`. Inference only; raises on a
        device without FP8 matmuls. ``emulate=True``: the same quantised numbers with float matmuls, anywhere.
        Returns self."""
        if self.fast is not None:
            raise InvalidInputError("quantize the decoder before enable_fast_inference(): the fast path has "
                                    "compiled and captured the bf16 decoder")
        prompts = check_prompts(calibration_prompts) if calibration_prompts is not None else None
        run = None if prompts is None else (
            lambda: self.text_to_image(prompts, output_type="pt", generator=self._calibration_generator()))
        self.image_tokenizer.quantize_decoder_fp8(emulate=emulate, calibrate=run)
        return self

    def _calibration_generator(self) -> torch.Generator:
        """A fixed seed for the calibration calls: the same prompts give the same static FP8 scales every run."""
        return torch.Generator(self.device).manual_seed(0)

    # ------------------------------------------------------------------------- the steps of a call
    def _text_latents(self, prompts: list[str], generator: torch.Generator | None,
                      sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ts = self.text_encoder.encode(prompts)
        states = ts.states.to(self.device, self.dtype)
        out = self.text_projector(states, ts.mask.to(self.device), sample=sample, generator=generator)
        return (out.z if sample else out.mean), states

    def _solve(self, model: FlowTransformer | None, x0: torch.Tensor, steps: int, guidance: float,
               sampler: Sampler, progress: bool = False) -> torch.Tensor:
        from .sampling import sample

        if model is None:
            raise InvalidInputError("this pipeline lacks the flow model this call needs")
        # Without return_trajectory, sample returns the final latents alone.
        out = cast(torch.Tensor, sample(model, x0, method=sampler, num_steps=int(steps),
                                        guidance_scale=float(guidance), progress=progress))
        if not torch.isfinite(out).all():
            # A NaN latent decodes to a black image or a garbage caption; say so instead.
            raise CheckpointError("the flow model produced NaN or inf; its weights may be corrupt "
                                  f"(model folder: {self.model_path or 'in memory'})")
        return out

    def _caption(self, text_latents: torch.Tensor) -> list[str]:
        """Captions of text latents: the decoder's argmax, or with ``defaults.caption_grammar == "shapes"``
        its best caption of the shapes world's grammar (always parseable)."""
        if self.text_decoder is None:
            raise InvalidInputError("this pipeline has no text decoder")
        if self.defaults.caption_grammar == "shapes":
            from .shapes.grammar import grammar_decode  # the shapes world is imported only by its models

            return grammar_decode(self.text_decoder, text_latents, self.text_encoder)
        return self.text_decoder.decode(text_latents, self.text_encoder)

    @staticmethod
    def _batch_size(batch_size: int | None, n: int) -> int:
        if batch_size is None:
            return n
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        return batch_size

    # ------------------------------------------------------------------------ public building blocks
    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], generator: torch.Generator | None = None,
                      sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Text latents [B, K, C] (t = 0 of the T2I flow) and the text states the decoder may read."""
        return self._text_latents(check_prompts(prompt), generator, sample)

    @torch.no_grad()
    def encode_image(self, images: ImageInput | list[ImageInput]) -> torch.Tensor:
        """Scaled image latents [B, K, C] (t = 1 of the T2I flow, t = 0 of the I2T flow)."""
        return self.image_tokenizer.encode_for_flow(self.image_processor.preprocess(images, self.device, self.dtype))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, text_states: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled image latents -> images [B, 3, H, W] in [0, 1] (text states used if the decoder reads text)."""
        return self.image_tokenizer.decode_from_flow(latents, text_states)

    @torch.no_grad()
    def caption_latents(self, text_latents: torch.Tensor) -> list[str]:
        """Text latents [B, K, C] -> one caption each, by the text decoder."""
        return self._caption(text_latents)

    # ------------------------------------------------------------------------------- the two directions
    @torch.no_grad()
    def text_to_image(self, prompt: str | list[str], num_inference_steps: int | None = None,
                      guidance_scale: float | None = None, generator: torch.Generator | None = None,
                      output_type: OutputType = "pil", batch_size: int | None = None,
                      sampler: Sampler | None = None, progress: bool = False,
                      sample_text_latent: bool = True, fast: bool | None = None) -> ImageOutput:
        """Images for ``prompt`` (a string or a list). FlowTok has no noise: the randomness of several
        images for one prompt comes from sampling the text projector's posterior with ``generator``;
        ``sample_text_latent=False`` uses its mean (one image per prompt). Settings left None are
        :attr:`defaults`'. ``fast``: None, the fast path if :meth:`enable_fast_inference` was called;
        True, enable it (defaults) if needed; False, the plain path."""
        prompts = check_prompts(prompt)
        s = self.defaults.override(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                   sampler=sampler)
        check_output_type(output_type)
        bs = self._batch_size(batch_size, len(prompts))
        if self.t2i_flow is None:
            raise InvalidInputError("this pipeline has no text-to-image flow model")
        if fast and self.fast is None:
            self.enable_fast_inference()
        if self.fast is not None and fast is not False and not progress:
            images = self.fast.generate(prompts, s, generator, sample_text_latent, batch_size)
            return self.image_processor.postprocess(images, output_type)
        out = []
        for i in range(0, len(prompts), bs):
            z, states = self._text_latents(prompts[i:i + bs], generator, sample_text_latent)
            lat = self._solve(self.t2i_flow, z, s.num_inference_steps, s.guidance_scale, s.sampler, progress)
            out.append(self.image_tokenizer.decode_from_flow(lat, states))
        return self.image_processor.postprocess(torch.cat(out), output_type)

    @torch.no_grad()
    def image_to_text(self, images: ImageInput | list[ImageInput], num_inference_steps: int | None = None,
                      guidance_scale: float | None = None, batch_size: int | None = None,
                      sampler: Sampler | None = None, progress: bool = False) -> list[str]:
        """One caption per image (PIL images, paths, uint8 arrays or a [B,3,H,W] tensor in [0, 1]).
        ``guidance_scale`` None: :attr:`defaults`' ``caption_guidance_scale``."""
        s = self.defaults.override(num_inference_steps=num_inference_steps, caption_guidance_scale=guidance_scale,
                                   sampler=sampler)
        if self.i2t_flow is None or self.text_decoder is None:
            raise InvalidInputError("this pipeline has no image-to-text flow model and text decoder")
        x = self.image_processor.preprocess(images, self.device, self.dtype)
        bs = self._batch_size(batch_size, x.shape[0])
        captions: list[str] = []
        for i in range(0, x.shape[0], bs):
            lat = self.image_tokenizer.encode_for_flow(x[i:i + bs])
            z = self._solve(self.i2t_flow, lat, s.num_inference_steps, s.caption_guidance_scale, s.sampler, progress)
            captions.extend(self._caption(z))
        return captions

    # ------------------------------------------------------------------------- beyond the paper
    def roundtrip_image(self, images: ImageInput | list[ImageInput], **kwargs: Any) -> tuple[list[str], ImageOutput]:
        """image -> caption -> image."""
        captions = self.image_to_text(images, **kwargs)
        return captions, self.text_to_image(captions, sample_text_latent=False, **kwargs)

    def roundtrip_text(self, prompt: str | list[str], **kwargs: Any) -> tuple[ImageOutput, list[str]]:
        """caption -> image -> caption."""
        images = self.text_to_image(prompt, sample_text_latent=False, **kwargs)
        # Every ImageOutput (PIL list, uint8 array, float tensor) is an image input.
        return images, self.image_to_text(cast("ImageInput | list[ImageInput]", images), **kwargs)

    @torch.no_grad()
    def interpolate(self, start: str | ImageInput, end: str | ImageInput, num_frames: int = 8,
                    num_inference_steps: int | None = None, guidance_scale: float | None = None,
                    sampler: Sampler | None = None, output_type: OutputType = "pil") -> ImageOutput:
        """Frames between two prompts, or between a prompt and an image (either order).

        Both ends are brought to the text-latent space (an image through the I2T flow), the text
        latents are linearly interpolated, and every frame is generated by the T2I flow, so each
        frame is an image the model would draw for some point between the two descriptions. A decoder
        that reads text gets the text states interpolated the same way (an image end's are those of
        its caption), so frame 0 of a prompt is the image :meth:`text_to_image` draws for it.
        """
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 2 <= num_frames <= 1000:
            raise InvalidInputError(f"num_frames must be an integer from 2 to 1000, got {num_frames!r}")
        s = self.defaults.override(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                   sampler=sampler)
        check_output_type(output_type)
        if self.t2i_flow is None:
            raise InvalidInputError("this pipeline has no text-to-image flow model")
        reads_text = self.image_tokenizer.reads_text

        def text_latent(x: str | ImageInput) -> tuple[torch.Tensor, torch.Tensor | None]:
            if isinstance(x, str):
                return self._text_latents(check_prompts(x), None, sample=False)
            if self.i2t_flow is None:
                raise InvalidInputError("interpolating from an image needs the image-to-text flow model")
            lat = self.encode_image(x)
            z = self._solve(self.i2t_flow, lat, s.num_inference_steps, s.caption_guidance_scale, s.sampler)
            if not reads_text:
                return z, None
            if self.text_decoder is None:
                raise InvalidInputError("this image decoder reads text: interpolating from an image needs the "
                                        "text decoder to caption it")
            # The caption is our decoder's, not the user's: encoded as it is (it may even be empty).
            ts = self.text_encoder.encode_tokens(*self.text_encoder.tokenize(self._caption(z)))
            return z, ts.states.to(self.device, self.dtype)

        (za, sa), (zb, sb) = text_latent(start), text_latent(end)
        w = torch.linspace(0, 1, num_frames, device=self.device, dtype=za.dtype)[:, None, None]
        states = (1 - w) * sa + w * sb if sa is not None and sb is not None else None
        lat = self._solve(self.t2i_flow, (1 - w) * za + w * zb, s.num_inference_steps, s.guidance_scale, s.sampler)
        return self.image_processor.postprocess(self.image_tokenizer.decode_from_flow(lat, states), output_type)


def assemble_pipeline(out: str | os.PathLike, components: dict[str, str | os.PathLike],
                      text_encoder: dict[str, Any] | None = None,
                      defaults: SamplingDefaults | dict[str, Any] | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Gather trained component folders (as the training stages export them) into one pipeline folder.

    ``components`` maps folder names (the values of :data:`COMPONENTS`: ``tokenizer``, ``text_projector``,
    ...) to ``save_pretrained`` folders; each is loaded (so a broken one fails here, not at a user's first
    call) and re-saved, in ``dtype`` if given. ``defaults`` override :class:`SamplingDefaults`' fields.
    """
    classes = {COMPONENTS[attr]: klass for attr, klass in _component_classes().items()}
    unknown = sorted(set(components) - set(classes))
    if unknown:
        raise InvalidInputError(f"unknown pipeline component '{unknown[0]}' (known: {', '.join(classes)})")
    for required in ("tokenizer", "text_projector"):
        if required not in components:
            raise InvalidInputError(f"a pipeline needs a {required}")
    from .model_checks import check_components, check_defaults

    if not isinstance(defaults, SamplingDefaults):
        defaults = SamplingDefaults.from_json(check_defaults(defaults, "defaults") or {}, "defaults")
    # Shapes agree before anything is loaded or written (a mismatch would otherwise surface as a matmul error).
    check_components({name: classes[name].read_config(src) for name, src in components.items()}, "assemble")
    root = Path(out)
    for name, src in components.items():
        classes[name].from_pretrained(src).save_pretrained(root / name, dtype=dtype)
    write_pipeline_spec(root, {n: n for n in components}, text_encoder or {"name": "minilm"}, defaults)
    return root

