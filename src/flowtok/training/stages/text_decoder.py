"""The ``text_decoder`` stage: the non-autoregressive text decoder on the (frozen) projector's latents;
with no ``projector_path`` it trains both as a text autoencoder (CE + KL + alignment).

It needs captions only, drawn from the shapes world without rendering images (``stage.shapes``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ...config import preset
from ...errors import ConfigError
from ...text import (
    DECODER_PRESETS,
    PROJECTOR_PRESETS,
    TextDecoder,
    TextEncoder,
    TextEncoderSpec,
    TextProjector,
    load_text_encoder,
    text_roundtrip_accuracy,
)
from ..data import BatchSource, DataConfig, build_source
from .base import Stage, freeze, heldout_metrics


@dataclass
class TextDecoderStageConfig:
    projector_path: str = ""  # frozen projector (from the t2i stage); empty: train one jointly
    projector_preset: str = "shapes"
    projector: dict[str, Any] = field(default_factory=dict)
    decoder_preset: str = "shapes"
    decoder: dict[str, Any] = field(default_factory=dict)
    text_encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    max_length: int = 32
    latent: Literal["sample", "mean"] = "sample"
    kl_weight: float = 1e-4
    align_weight: float = 1.0
    eval_captions: int = 500


class TextDecoderStage(Stage):
    name: ClassVar[str] = "text_decoder"
    config_class: ClassVar[type] = TextDecoderStageConfig
    frozen_helpers: ClassVar[tuple[str, ...]] = ("frozen_projector", "encoder", "source")
    frozen_projector: TextProjector | None  # set when model.projector_path names a trained one
    encoder: TextEncoder
    source: BatchSource | None  # None for the shapes world (captions drawn without images)

    def __init__(self, cfg: TextDecoderStageConfig, data: DataConfig, seed: int) -> None:
        super().__init__(data, seed)
        self.cfg = cfg
        self.train_projector = not cfg.projector_path
        if self.train_projector:
            self.projector = TextProjector(preset(PROJECTOR_PRESETS, cfg.projector_preset, cfg.projector,
                                                  what="model.projector"))
            if cfg.align_weight == 0:  # unused parameters: frozen, or DDP waits for their gradients forever
                self.projector.align_mlp.requires_grad_(False)
                self.projector.logit_scale.requires_grad_(False)
        else:
            self.frozen_projector = TextProjector.from_pretrained(cfg.projector_path)
        self.decoder = TextDecoder(preset(DECODER_PRESETS, cfg.decoder_preset, cfg.decoder, what="model.decoder"))
        if self.decoder.config.num_tokens != cfg.max_length:
            raise ConfigError(f"decoder num_tokens {self.decoder.config.num_tokens} differs from "
                              f"model.max_length {cfg.max_length}")
        pc = self.proj.config
        if pc.latent_channels != self.decoder.config.latent_channels:
            raise ConfigError(f"decoder reads {self.decoder.config.latent_channels}-channel latents, the "
                              f"projector makes {pc.latent_channels}")

    @property
    def proj(self) -> TextProjector:
        """The projector the decoder reads: the one trained here, or the frozen one."""
        if self.frozen_projector is not None:
            return self.frozen_projector
        return self.projector

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        if self.frozen_projector is not None:
            self.frozen_projector.to(device)
            freeze(self.frozen_projector)
        self.encoder = load_text_encoder(self.cfg.text_encoder, max_length=self.cfg.max_length, device=device)
        if self.encoder.vocab_size != self.decoder.config.vocab_size:
            raise ConfigError(f"decoder vocab_size {self.decoder.config.vocab_size} differs from the text "
                              f"encoder's tokenizer ({self.encoder.vocab_size})")
        # The configured data's captions; the shapes world's are drawn without rendering images.
        self.source = None if self.data_cfg.kind == "shapes" else build_source(self.data_cfg, self.seed, device)

    @torch.no_grad()
    def batch(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        if self.source is None:
            caps = self.shapes.train_captions(step, local_batch, rank, world)  # no images to render
        else:
            caps = self.source.get(step, local_batch, rank, world)["captions"]
        ts = self.encoder.encode(caps)  # at the decoder's max_length, which stored ids need not have
        return {"captions": caps, "text_states": ts.states.float(), "text_mask": ts.mask, "input_ids": ts.input_ids}

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.proj(batch["text_states"], batch["text_mask"], sample=self.cfg.latent == "sample")
        z = out.z if self.train_projector else out.z.detach()
        ce = self.decoder.loss(z, batch["input_ids"], batch["text_mask"])
        metrics = {"ce": ce.detach()}
        loss = ce
        if self.train_projector:
            kl = self.projector.kl_loss(out.mean, out.logvar)
            loss = loss + self.cfg.kl_weight * kl
            metrics["kl"] = kl.detach()
            if self.cfg.align_weight > 0:
                align = self.projector.align_loss(out.z, batch["text_states"], batch["text_mask"])
                loss = loss + self.cfg.align_weight * align
                metrics["align"] = align.detach()
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, step: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        if not self.is_shapes_data():
            return heldout_metrics(self), {}
        caps = self.shapes.test_captions(self.cfg.eval_captions, stream=777)
        acc = text_roundtrip_accuracy(self.proj, self.decoder, self.encoder, caps)
        return {"text_roundtrip_exact": acc}, {}

    def export(self, out_dir: Path) -> None:
        self.decoder.save_pretrained(Path(out_dir) / "text_decoder")
        if self.train_projector:
            self.projector.save_pretrained(Path(out_dir) / "text_projector")
