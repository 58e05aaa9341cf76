"""The ``tokenizer`` stage: the 1D image tokenizer, trained with L2 + KL (plus optional perceptual and
PatchGAN terms), its latent scale measured at export."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...config import from_dict, preset
from ...errors import ConfigError
from ...text import TextEncoder, TextEncoderSpec, load_text_encoder
from ...tokenizer import (
    TOKENIZER_PRESETS,
    ImageTokenizer,
    TokenizerLoss,
    TokenizerLossConfig,
    latent_scale_factor,
    latent_usage,
)
from ..data import BatchSource, DataConfig, build_source
from .base import Stage, heldout_metrics, image_grid, init_weights

log = logging.getLogger(__name__)


@dataclass
class TokenizerStageConfig:
    preset: str = "shapes-128"
    overrides: dict[str, Any] = field(default_factory=dict)
    kl_weight: float = 1e-6
    # Further TokenizerLossConfig fields: perceptual_weight / perceptual_weights / require_perceptual,
    # discriminator_weight / discriminator_start / lecam_weight (PatchGAN, hinge + LeCam), reconstruction.
    loss: dict[str, Any] = field(default_factory=dict)
    text_encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    eval_images: int = 64
    # The exported config's scale_factor is 1 / std of the latents of this many training images, so the
    # flows see unit-variance latents (0 keeps the preset's value). An unscaled shapes tokenizer (std 0.32)
    # left the image-to-text flow at 24% exact captions; scaled, 97%.
    scale_images: int = 2048
    # A trained tokenizer folder of the same preset to start from (fine-tuning); empty: from scratch.
    init_from: str = ""


class TokenizerStage(Stage):
    name: ClassVar[str] = "tokenizer"
    config_class: ClassVar[type] = TokenizerStageConfig
    frozen_helpers: ClassVar[tuple[str, ...]] = ("encoder", "source")
    encoder: TextEncoder | None  # only when the tokenizer's decoder reads text
    source: BatchSource

    def __init__(self, cfg: TokenizerStageConfig, data: DataConfig, seed: int) -> None:
        super().__init__(data, seed)
        self.cfg = cfg
        tcfg = preset(TOKENIZER_PRESETS, cfg.preset, cfg.overrides, what="model.tokenizer")
        if data.size != tcfg.image_size:
            raise ConfigError(f"data.size {data.size} differs from the tokenizer image_size {tcfg.image_size}")
        self.tokenizer = ImageTokenizer(tcfg)
        init_weights(self.tokenizer, cfg.init_from, "model")
        # A registered child: the discriminator (when on) is trained by the same optimizer and checkpointed.
        self.loss_fn = TokenizerLoss(from_dict(TokenizerLossConfig, {"kl_weight": cfg.kl_weight, **cfg.loss},
                                               "model.loss"))
        # A discriminator that starts late has no gradients until then: DDP must look for unused parameters.
        self.ddp_find_unused_parameters = (self.loss_fn.discriminator is not None
                                           and self.loss_fn.config.discriminator_start > 0)

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        self.source = build_source(self.data_cfg, self.seed, device)
        if self.tokenizer.reads_text:
            self.encoder = load_text_encoder(self.cfg.text_encoder, max_length=self.tokenizer.config.num_latent_tokens,
                                             device=device)

    def _text(self, captions: list[str]) -> torch.Tensor | None:
        if self.encoder is None:
            return None
        return self.encoder.encode(captions).states

    def batch(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        b = self.source.get(step, local_batch, rank, world)
        b["text_states"] = self._text(b["captions"])
        b["step"] = step
        return b

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, step = batch["images"], batch["step"]
        recon, posterior = self.tokenizer(images, text_states=batch["text_states"], sample=True)
        loss, parts = self.loss_fn(images, recon, posterior, step)
        metrics = {"mse": torch.mean((recon.detach().float() - images.float()) ** 2), "kl": parts["kl_raw"]}
        metrics.update({k: v for k, v in parts.items() if k in ("perceptual", "adversarial")})
        if self.loss_fn.adversarial_active(step):
            # The generator term cannot move the discriminator and this term cannot move the generator
            # (reconstructions are detached), so one backward and one optimizer serve both.
            d_loss, d_parts = self.loss_fn.discriminator_loss(images, recon)
            loss = loss + d_loss
            metrics.update(disc_hinge=d_parts["hinge"], disc_logits_real=d_parts["logits_real"],
                           disc_logits_fake=d_parts["logits_fake"])
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, step: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        if not self.is_shapes_data():  # held-out loss and reconstruction PSNR on data.eval_path
            got = heldout_metrics(self, batch_size=min(64, self.cfg.eval_images))
            if "heldout_mse" in got:
                got["heldout_psnr"] = 10 * math.log10(1.0 / max(got["heldout_mse"], 1e-10))
            return got, {}
        images, captions, scenes = self.shapes.test_batch(self.cfg.eval_images, 10_000, self.device)
        recon = self.tokenizer.reconstruct(images, text_states=self._text(captions))
        mse = torch.mean((recon.float() - images.float()) ** 2, dim=(1, 2, 3))
        psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()
        grid = image_grid(torch.cat([images[:8], recon[:8]]).float())
        # Numbers of the latent that carry signal: a KL weight too strong for the data keeps this low.
        posterior = self.tokenizer.encode_posterior(images)
        active = latent_usage(posterior.mean, posterior.var, thresholds=(1,))["snr_above_1"]
        return ({"psnr": psnr, "judge_acc": self.shapes.judge_exact(recon, scenes), "latent_active": active},
                {"recon": grid})

    @torch.no_grad()
    def measure_scale_factor(self, n: int, batch_size: int = 256) -> float:
        """``1 / std`` of the latents (posterior mode) of the first ``n`` training samples."""
        lats = []
        for step in range(-(-n // batch_size)):
            images = self.source.get(step, batch_size, 0, 1)["images"].to(self.device)
            lats.append(self.tokenizer.encode(images).float().cpu())
        return latent_scale_factor(torch.cat(lats)[:n])

    def export(self, out_dir: Path) -> None:
        if self.cfg.scale_images > 0:  # the tokenizer has no train/eval-dependent layers
            self.tokenizer.config.scale_factor = round(self.measure_scale_factor(self.cfg.scale_images), 4)
            log.info("tokenizer scale_factor set to %s (latent std of %d training images)",
                     self.tokenizer.config.scale_factor, self.cfg.scale_images)
        self.tokenizer.save_pretrained(Path(out_dir) / "tokenizer")
