"""FlowTok without PyTorch: an exported folder (``flowtok export onnx``) run with onnxruntime.

Needs onnxruntime, numpy, ``tokenizers`` and PIL only (``pip install flowtok[onnx]``); importing this
module never imports torch. The calls are the pipeline's::

    from flowtok.export.runtime import OnnxFlowTokPipeline

    pipe = OnnxFlowTokPipeline.from_pretrained("flowtok-shapes-onnx")          # or precision="fp16"
    images = pipe.text_to_image(["a large red circle in the top left"], generator=0)
    captions = pipe.image_to_text(images)

Randomness differs from the PyTorch pipeline in its source only: ``generator`` is a
``numpy.random.Generator`` (or a seed), and the text projector's posterior is sampled as
``mean + exp(logvar / 2) * generator.standard_normal([B, L, C], float32)``, one batch after another.
Everything else (tokenising, the Euler / Heun loop with classifier-free guidance, the latent scale
factor, argmax decoding, or the caption grammar's decoding when ``defaults["caption_grammar"]`` names
one, from the table in the manifest: :mod:`flowtok.caption_grammar`, the PyTorch pipeline's own code)
follows the manifest and gives the PyTorch pipeline's numbers to float precision (docs/benchmarks.md, "ONNX").
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from ..caption_grammar import CaptionGrammar
from ..errors import CheckpointError, InvalidInputError
from ..imageio import input_image_array
from .manifest import FORMAT, MANIFEST

MAX_PROMPT_CHARS = 4096
MAX_INFERENCE_STEPS = 1000

ImageInput = Image.Image | str | os.PathLike | bytes | np.ndarray
Generator = np.random.Generator | int | None


def _clean_prompt(prompt: Any, index: int) -> str:
    # As the PyTorch pipeline: control characters become spaces, whitespace collapses.
    if not isinstance(prompt, str):
        raise InvalidInputError(f"prompt {index} is a {type(prompt).__name__}, expected a string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInputError(f"prompt {index} has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    text = " ".join("".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in prompt).split())
    if not text:
        raise InvalidInputError(f"prompt {index} is empty")
    return text


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_INFERENCE_STEPS:
        raise InvalidInputError(f"num_inference_steps must be an integer from 1 to {MAX_INFERENCE_STEPS}, got {steps!r}")
    return int(steps)


def _check_guidance(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not np.isfinite(scale):
        raise InvalidInputError(f"guidance_scale must be a finite number, got {scale!r}")
    return float(scale)


def _check_batch_size(batch_size: Any, n: int) -> int:
    if batch_size is None:
        return max(n, 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _rng(generator: Generator) -> np.random.Generator:
    if generator is None or isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return np.random.default_rng(generator)
    if isinstance(generator, np.random.Generator):
        return generator
    raise InvalidInputError(f"generator must be a numpy Generator, a seed or None, got {type(generator).__name__}")


class OnnxFlowTokPipeline:
    """Text-to-image and image-to-text from an exported folder, with onnxruntime.

    ``precision`` picks the graph files: "fp32", "fp16" (float16 weights, float32 arithmetic) or
    "int8" (where the export wrote one; fp16 otherwise, then fp32). ``providers`` and ``num_threads``
    go to onnxruntime (default: the CPU, all its threads).
    """

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any], precision: str = "fp32",
                 providers: Sequence[str] | None = None, num_threads: int | None = None) -> None:
        from tokenizers import Tokenizer

        self.root = Path(root)
        self.manifest = manifest
        self.precision = precision
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.num_threads = num_threads
        text = manifest["text"]
        self.text_tokenizer = Tokenizer.from_file(str(self.root / text["tokenizer"]))
        self.text_tokenizer.no_padding()
        self.text_tokenizer.no_truncation()
        self.max_length = int(text["max_length"])
        self.bos, self.eos, self.pad = int(text["bos_token_id"]), int(text["eos_token_id"]), int(text["pad_token_id"])
        self._replacements = [tuple(p) for p in text["decode_replacements"]]
        self._digits = re.compile(text["decode_join_digits"])
        self.image_size = int(manifest["image"]["size"])
        self.scale_factor = float(manifest["image_latent"]["scale_factor"])
        self.decoder_reads_text = bool(manifest["image_latent"]["decoder_reads_text"])
        self.defaults = dict(manifest["defaults"])
        # Captions follow defaults["caption_grammar"] (None: the decoder's argmax), as the PyTorch pipeline's.
        self.grammar = (CaptionGrammar.from_json(manifest["caption_grammar"], str(self.root / MANIFEST))
                        if manifest.get("caption_grammar") is not None else None)
        self.truncated_count = 0
        self._sessions: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, precision: Literal["fp32", "fp16", "int8"] = "fp32",
                        providers: Sequence[str] | None = None,
                        num_threads: int | None = None) -> OnnxFlowTokPipeline:
        root = Path(path)
        file = root / MANIFEST
        if not file.is_file():
            raise CheckpointError(f"{root} is not an exported flowtok folder (no {MANIFEST}); "
                                  "make one with `flowtok export onnx`")
        try:
            manifest = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file} is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointError(f"{file} does not describe a flowtok ONNX export")
        if precision not in ("fp32", "fp16", "int8"):
            raise InvalidInputError(f"precision must be 'fp32', 'fp16' or 'int8', got {precision!r}")
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise InvalidInputError(f"num_threads must be a positive integer, got {num_threads!r}")
        return cls(root, manifest, precision, providers, num_threads)

    # ------------------------------------------------------------------------------------ graphs
    def graph_file(self, name: str) -> Path:
        graphs = self.manifest["graphs"]
        if name not in graphs:
            raise InvalidInputError(f"this export has no {name} graph")
        files = graphs[name]["files"]
        order = {"int8": ("int8", "fp16", "fp32"), "fp16": ("fp16", "fp32"), "fp32": ("fp32",)}[self.precision]
        for precision in order:
            if precision in files:
                return self.root / files[precision]
        raise CheckpointError(f"{self.root}: the {name} graph has no {self.precision} file")

    def _session(self, name: str) -> Any:
        if name not in self._sessions:
            import onnxruntime as ort

            path = self.graph_file(name)
            if not path.is_file():
                raise CheckpointError(f"graph file missing: {path}")
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if self.num_threads is not None:
                opts.intra_op_num_threads = self.num_threads
                opts.inter_op_num_threads = 1
            try:
                self._sessions[name] = ort.InferenceSession(str(path), opts, providers=self.providers)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors for a bad file
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise CheckpointError(f"cannot load {path}: {first}") from None
        return self._sessions[name]

    def run(self, name: str, **inputs: np.ndarray) -> list[np.ndarray]:
        """Run graph ``name`` on named numpy inputs; returns its outputs in the manifest's order."""
        return self._session(name).run(None, inputs)

    # ------------------------------------------------------------------------------------- text
    def _prompts(self, prompt: str | Sequence[str]) -> list[str]:
        if not isinstance(prompt, (str, list, tuple)):
            raise InvalidInputError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InvalidInputError("no prompt given")
        return [_clean_prompt(p, i) for i, p in enumerate(prompts)]

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids [B, L] int64, attention_mask [B, L] int64)``: BOS, content, EOS, pads, as the encoder."""
        length = self.max_length
        ids = np.full((len(prompts), length), self.pad, dtype=np.int64)
        mask = np.zeros((len(prompts), length), dtype=np.int64)
        cut = []
        for i, enc in enumerate(self.text_tokenizer.encode_batch(list(prompts), add_special_tokens=False)):
            content = enc.ids
            if len(content) > length - 2:
                cut.append(i)
                content = content[: length - 2]
            row = [self.bos, *content, self.eos]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        if cut:
            self.truncated_count += len(cut)
            warnings.warn(f"{len(cut)} caption(s) longer than {length} tokens were truncated (first: prompt "
                          f"{cut[0]}); {self.truncated_count} truncated so far", stacklevel=3)
        return ids, mask

    def decode_ids(self, ids: np.ndarray) -> list[str]:
        """Clean strings from id rows: BOS dropped, everything from the first EOS or pad on dropped."""
        out = []
        stops = (self.eos, self.pad, self.bos)
        for row in np.asarray(ids).tolist():
            if row and row[0] == self.bos:
                row = row[1:]
            for k, tok in enumerate(row):
                if tok in stops:
                    row = row[:k]
                    break
            text = self.text_tokenizer.decode(row, skip_special_tokens=True)
            for old, new in self._replacements:
                text = text.replace(old, new)
            out.append(self._digits.sub("", " ".join(text.split())).strip())
        return out

    def encode_prompt(self, prompt: str | Sequence[str], generator: Generator = None,
                      sample: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Text latents [B, L, C] (t = 0 of the T2I flow) and the text states the image decoder may read."""
        ids, mask = self.tokenize(self._prompts(prompt))
        states = self.run("text_encoder", input_ids=ids, attention_mask=mask)[0]
        mean, logvar = self.run("text_projector", states=states)
        if not sample:
            return mean, states
        eps = _rng(generator).standard_normal(mean.shape, dtype=np.float32)
        return (mean + np.exp(0.5 * logvar) * eps).astype(np.float32), states

    # ------------------------------------------------------------------------------------ images
    def image_array(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Images as a float32 [B, 3, H, W] batch in [0, 1] at the model's size.

        Accepts PIL images, paths, bytes, uint8 arrays (HxW or HxWxC) or one float array [B, 3, H, W]
        already in [0, 1] at the model's size.
        """
        size = self.image_size
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size) or 0 in images.shape:
                raise InvalidInputError(f"a float image array must be [B, 3, {size}, {size}], got {images.shape}")
            if not np.isfinite(images).all():
                raise InvalidInputError("image array contains NaN or inf")
            lo, hi = float(images.min()), float(images.max())
            if lo < -0.25 or hi > 1.25:
                raise InvalidInputError(f"image array values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")
            return images.clip(0, 1).astype(np.float32)
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise InvalidInputError("no image given")
        arrays = [input_image_array(item, size) for item in items]
        return np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32) / 255.0

    def encode_image(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Scaled image latents [B, K, C] (t = 1 of the T2I flow, t = 0 of the I2T flow)."""
        return self.run("image_encoder", images=self.image_array(images))[0] * np.float32(self.scale_factor)

    def decode_latents(self, latents: np.ndarray, text_states: np.ndarray | None = None) -> np.ndarray:
        """Scaled image latents -> images [B, 3, H, W] in [0, 1]."""
        inputs = {"latents": (latents / np.float32(self.scale_factor)).astype(np.float32)}
        if self.decoder_reads_text:
            if text_states is None:
                info = self._session("image_decoder").get_inputs()[1]
                text_states = np.zeros((latents.shape[0], *info.shape[1:]), dtype=np.float32)
            inputs["text_states"] = text_states.astype(np.float32)
        return self.run("image_decoder", **inputs)[0].clip(0, 1)

    # ---------------------------------------------------------------------------------- sampling
    def _velocity(self, name: str, guidance: float, batch: int) -> Callable[[np.ndarray, float], np.ndarray]:
        session = self._session(name)
        if guidance == 1.0:
            cond = np.zeros(batch, dtype=np.int64)

            def velocity(x: np.ndarray, t: float) -> np.ndarray:
                return session.run(None, {"x": x, "t": np.full(batch, t, np.float32), "null_indicator": cond})[0]

            return velocity
        both = np.concatenate([np.zeros(batch, np.int64), np.ones(batch, np.int64)])

        def guided(x: np.ndarray, t: float) -> np.ndarray:
            v = session.run(None, {"x": np.concatenate([x, x]), "t": np.full(2 * batch, t, np.float32),
                                   "null_indicator": both})[0]
            v_cond, v_null = v[:batch], v[batch:]
            return v_null + np.float32(guidance) * (v_cond - v_null)

        return guided

    def solve(self, name: str, x0: np.ndarray, num_inference_steps: int, guidance_scale: float,
              sampler: str | None = "euler", progress: bool = False) -> np.ndarray:
        """Integrate flow ``name`` ("t2i_flow" or "i2t_flow") from ``x0`` at t = 0 to t = 1."""
        sampler = sampler or self.defaults.get("sampler", "euler")
        if sampler not in ("euler", "heun"):
            raise InvalidInputError(f"sampler must be 'euler' or 'heun', got {sampler!r}")
        steps = _check_steps(num_inference_steps)
        velocity = self._velocity(name, _check_guidance(guidance_scale), x0.shape[0])
        # float64 then float32 once, as the PyTorch grid: t_i = i / N exactly rounded
        grid = (np.arange(steps + 1, dtype=np.float64) / steps).astype(np.float32)
        x = x0.astype(np.float32)
        for i in _progress(range(steps), progress, sampler):
            dt = grid[i + 1] - grid[i]
            v = velocity(x, float(grid[i]))
            if sampler == "euler":
                x = x + dt * v
            else:
                x = x + np.float32(0.5) * dt * (v + velocity(x + dt * v, float(grid[i + 1])))
        if not np.isfinite(x).all():
            raise CheckpointError(f"the {name} graph produced NaN or inf; the export may be corrupt ({self.root})")
        return x

    # ------------------------------------------------------------------------------ the two calls
    def text_to_image(self, prompt: str | Sequence[str], num_inference_steps: int | None = None,
                      guidance_scale: float | None = None, generator: Generator = None,
                      output_type: Literal["pil", "np"] = "pil", batch_size: int | None = None,
                      sampler: Literal["euler", "heun"] | None = None, progress: bool = False,
                      sample_text_latent: bool = True) -> list[Image.Image] | np.ndarray:
        """Images for ``prompt``: PIL images, or a float32 [B, H, W, 3] array in [0, 1] (``output_type="np"``)."""
        steps = _check_steps(self.defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps)
        guidance = _check_guidance(self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale)
        if output_type not in ("pil", "np"):
            raise InvalidInputError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        prompts = self._prompts(prompt)
        bs = _check_batch_size(batch_size, len(prompts))
        rng = _rng(generator)
        out = []
        for i in range(0, len(prompts), bs):
            z, states = self.encode_prompt(prompts[i:i + bs], generator=rng, sample=sample_text_latent)
            latents = self.solve("t2i_flow", z, steps, guidance, sampler, progress)
            out.append(self.decode_latents(latents, states))
        images = np.concatenate(out).transpose(0, 2, 3, 1)
        if output_type == "np":
            return images
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in images]

    def caption_latents(self, text_latents: np.ndarray) -> list[str]:
        """Captions of text latents: the decoder's argmax, or its best caption of ``defaults["caption_grammar"]``."""
        name, grammar = self.defaults.get("caption_grammar"), None
        if name is not None:
            grammar = self.grammar
            if grammar is None or grammar.name != name:
                raise CheckpointError(f"{self.root}: the defaults ask for the {name!r} caption grammar but "
                                      f"{MANIFEST} holds no table for it; export the model again with this flowtok")
        logits = self.run("text_decoder", text_latents=text_latents.astype(np.float32))[0]
        return grammar.decode(logits) if grammar is not None else self.decode_ids(logits.argmax(-1))

    def image_to_text(self, images: ImageInput | Sequence[ImageInput], num_inference_steps: int | None = None,
                      guidance_scale: float | None = None, batch_size: int | None = None,
                      sampler: Literal["euler", "heun"] | None = None, progress: bool = False) -> list[str]:
        """One caption per image (PIL images, paths, bytes, uint8 arrays or a float [B, 3, H, W] array)."""
        steps = _check_steps(self.defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps)
        guidance = _check_guidance(self.defaults["caption_guidance_scale"] if guidance_scale is None else guidance_scale)
        x = self.image_array(images)
        bs = _check_batch_size(batch_size, x.shape[0])
        captions: list[str] = []
        for i in range(0, x.shape[0], bs):
            latents = self.run("image_encoder", images=x[i:i + bs])[0] * np.float32(self.scale_factor)
            captions.extend(self.caption_latents(self.solve("i2t_flow", latents, steps, guidance, sampler, progress)))
        return captions


def _progress(steps: range, show: bool, desc: str) -> Iterable[int]:
    if not show:
        return steps
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is not a runtime dependency
        return steps
    return tqdm(steps, desc=desc)
