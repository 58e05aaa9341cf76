"""What every training stage shares: the :class:`Stage` contract the trainer drives, frozen helpers
kept off the module tree, and the few steps more than one stage takes (latents of a batch, shape
checks between components, loss-by-t metrics, a preview grid).

A new stage is one file beside this one: its config dataclass, a :class:`Stage` subclass that draws a
batch, computes its loss, evaluates and exports, and one line in the registry (``stages/__init__.py``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import ConfigError
from ...flow import FlowConfig
from ...flow.objective import binned_loss_tensors
from ...text import ProjectorConfig, TextEncoder
from ...tokenizer import ImageTokenizer
from ...tokenizer.model import DiagonalGaussian
from ..data import BatchSource, DataConfig, LatentSource, build_source
from ..loader import TokenSource
from .shapes_world import ShapesWorld


class Stage(nn.Module):
    """A training stage: its trainable sub-modules (registered children), frozen helpers (plain
    attributes named in ``frozen_helpers``, never registered, so the optimizer, DDP, the EMA and
    checkpoints ignore them), its data and its loss.

    The shapes world reaches a stage through one object only, ``self.shapes`` (:class:`ShapesWorld`):
    held-out scenes and the judge for evaluation, and captions drawn without images for text-only data.
    """

    name: ClassVar[str] = "stage"
    config_class: ClassVar[type] = object
    frozen_helpers: ClassVar[tuple[str, ...]] = ()
    ddp_find_unused_parameters: bool = False  # True where some parameters get no gradient on some steps

    device: torch.device

    def __init__(self, data: DataConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.data_cfg = data if data is not None else DataConfig()
        self.seed = seed
        self.shapes = ShapesWorld(seed, self.data_cfg)
        for name in self.frozen_helpers:
            setattr(self, name, None)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.frozen_helpers:
            object.__setattr__(self, name, value)  # a plain attribute: nn.Module would register a module
        else:
            super().__setattr__(name, value)

    def setup(self, device: torch.device) -> None:
        """Move frozen helpers to ``device`` (trainable parts are moved by the trainer)."""
        self.device = device

    def compile_helpers(self, **options: Any) -> None:
        """Under ``train.compile``: compile the frozen text encoder a stage runs inside its step (its layers,
        regionally); it runs under no_grad in its own dtype (bf16 on a GPU), outside the compiled stage."""
        encoder = getattr(self, "encoder", None)
        if isinstance(encoder, TextEncoder):
            encoder.compile_layers(**options)

    def data_state(self) -> dict[str, Any] | None:
        """The data position to checkpoint, for a source whose position is not a function of the step
        (raw-image shards read by loader workers); None for the others."""
        source: Any = getattr(self, "source", None)
        return source.state() if hasattr(source, "state") else None

    def load_data_state(self, state: dict[str, Any] | None) -> None:
        source: Any = getattr(self, "source", None)
        if hasattr(source, "load_state"):
            source.load_state(state)

    def is_shapes_data(self) -> bool:
        """Whether the run's data is the shapes world (rendered, or pre-tokenised from it): only then can
        the shapes judge score an evaluation; other data is evaluated by :func:`heldout_metrics`."""
        if self.data_cfg.kind == "shapes":
            return True
        source: Any = getattr(self, "source", None)
        if (getattr(source, "meta", None) or {}).get("source") == "shapes":
            return True
        records: Any = getattr(getattr(source, "dataset", None), "records", None)
        return bool(records) and isinstance(records[0], dict) and bool(records[0].get("scene"))

    def batch(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, step: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Metrics and image grids ([3,H,W] in [0,1]) computed with the EMA weights loaded."""
        return {}, {}

    def export(self, out_dir: Path) -> None:
        """Write the trained parts as ``save_pretrained`` folders under ``out_dir``."""
        raise NotImplementedError


def freeze(m: nn.Module) -> nn.Module:
    """``m`` in eval mode with gradients off: a helper that a stage uses but never trains."""
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def init_weights(model: nn.Module, path: str, what: str) -> None:
    """Start ``model`` from the weights of the pretrained folder ``path`` (same architecture), to fine-tune it."""
    if not path:
        return
    trained = type(model).from_pretrained(path)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(trained.state_dict())
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{what}.init_from {path}: not the architecture of this run ({first})") from None


def load_frozen_tokenizer(path: str, device: torch.device) -> ImageTokenizer:
    tokenizer = ImageTokenizer.from_pretrained(path, device=device)
    freeze(tokenizer)
    return tokenizer


def image_latents(batch: dict[str, Any], tokenizer: ImageTokenizer, draw: str = "mode") -> torch.Tensor:
    """Scaled image latents of a batch: from the stored posterior (compact pre-tokenised data), stored
    latents (unscaled), or encoded from its images. ``draw`` is ``"mode"`` (the posterior mean, what the
    pipeline encodes an image to) or ``"sample"`` (a posterior draw, as the authors train)."""
    if draw not in ("mode", "sample"):
        raise ConfigError(f"image_latent must be 'mode' or 'sample', got {draw!r}")
    if "image_moments" in batch:
        cfg = tokenizer.config
        posterior = DiagonalGaussian(batch["image_moments"], cfg.logvar_min, cfg.logvar_max)
        return tokenizer.scale_latents(posterior.sample() if draw == "sample" else posterior.mode())
    if "image_latents_raw" in batch:
        return tokenizer.scale_latents(batch["image_latents_raw"])
    return tokenizer.encode_for_flow(batch["images"], sample=draw == "sample")


def text_states(batch: dict[str, Any], encoder: TextEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states float32, mask)`` of a batch: stored, or the frozen encoder run here, inside the training
    step, batched, on the stored token ids when they are its own length (else on the captions)."""
    if "text_states" in batch:
        return batch["text_states"], batch["text_mask"]
    ids = batch.get("input_ids")
    if ids is not None and ids.shape[1] == encoder.max_length:
        ts = encoder.encode_tokens(ids.long(), batch["text_mask"])
    else:
        ts = encoder.encode(batch["captions"])
    return ts.states.float(), ts.mask


@torch.no_grad()
def heldout_metrics(stage: Stage, batch_size: int = 64) -> dict[str, float]:
    """The stage's loss (and its parts) on ``data.eval_path``, a held-out set read like the training data;
    empty without one. Its random draws are seeded, so the evaluations of one run are comparable."""
    data = stage.data_cfg
    if not data.eval_path:
        return {}
    if getattr(stage, "eval_source", None) is None:
        stage.eval_source = build_source(replace(data, path=data.eval_path, workers=0), stage.seed + 1,
                                         stage.device)
    train_source, stage.source = stage.source, stage.eval_source
    sums: dict[str, float] = {}
    try:
        with torch.random.fork_rng(devices=[stage.device] if stage.device.type == "cuda" else []):
            torch.manual_seed(stage.seed + 1)
            for i in range(data.eval_batches):
                loss, metrics = stage(stage.batch(i, batch_size, 0, 1))
                for k, v in {"loss": loss, **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / data.eval_batches
    finally:
        stage.source = train_source
    return {f"heldout_{k}": v for k, v in sums.items() if not k.startswith("flow_t")}


def flow_bins(info: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The flow loss by bin of t, as training metrics (no host sync)."""
    return {f"flow_{k}": v for k, v in binned_loss_tensors(info["t"], info["per_sample_loss"]).items()}


def image_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """``[B, C, H, W]`` images tiled ``nrow`` to a row on a white canvas, for previews."""
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    rows = (b + ncol - 1) // ncol
    canvas = torch.ones(c, rows * h, ncol * w, device=images.device)
    for i in range(b):
        r, q = divmod(i, ncol)
        canvas[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = images[i]
    return canvas


def check_pretokenized(source: BatchSource, tokenizer: ImageTokenizer, encoder: TextEncoder) -> None:
    """Pre-tokenised shards must come from the same tokenizer shape and text encoder."""
    if not isinstance(source, (LatentSource, TokenSource)):
        return
    meta = source.meta
    k, c = tokenizer.latent_shape
    if (meta["num_tokens"], meta["channels"]) != (k, c):
        raise ConfigError(f"pre-tokenised latents are {meta['num_tokens']}x{meta['channels']}, "
                          f"the tokenizer makes {k}x{c}")
    if isinstance(source, TokenSource):  # token ids, which must be this encoder's own
        if meta.get("text_encoder", {}).get("name") != encoder.spec.get("name"):
            raise ConfigError(f"pre-tokenised token ids come from text encoder {meta.get('text_encoder')}, "
                              f"this run uses {encoder.spec}")
        return
    if meta["text_dim"] != encoder.dim or meta["text_length"] != encoder.max_length:
        raise ConfigError(f"pre-tokenised text states are {meta['text_length']}x{meta['text_dim']}, "
                          f"the text encoder makes {encoder.max_length}x{encoder.dim}")


def check_latent_shapes(k: int, c: int, pcfg: ProjectorConfig, fcfg: FlowConfig) -> None:
    """The text latent and the image latent must have one shape: the flow maps one onto the other."""
    if pcfg.latent_channels != c:
        raise ConfigError(f"text latent has {pcfg.latent_channels} channels, image latent has {c}: "
                          "they must be equal")
    if fcfg.num_tokens != k or fcfg.in_channels != c:
        raise ConfigError(f"flow model expects {fcfg.num_tokens}x{fcfg.in_channels} latents, "
                          f"the tokenizer gives {k}x{c}")
