"""The ``t2i`` stage: text projector + FlowTok transformer, text latent (t = 0) -> image latent (t = 1),
trained jointly with flow + KL + alignment losses as in the paper, or on a frozen projector."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import torch

from ...config import preset
from ...errors import ConfigError
from ...flow import FLOW_PRESETS, FlowObjective, FlowObjectiveConfig, FlowTransformer
from ...pipelines import FlowTokPipeline, SamplingDefaults
from ...text import PROJECTOR_PRESETS, TextEncoder, TextEncoderSpec, TextProjector, load_text_encoder
from ...tokenizer import ImageTokenizer
from ..data import BatchSource, DataConfig, build_source
from .base import (
    Stage,
    check_latent_shapes,
    check_pretokenized,
    flow_bins,
    freeze,
    heldout_metrics,
    image_grid,
    image_latents,
    init_weights,
    load_frozen_tokenizer,
    text_states,
)


@dataclass
class T2IStageConfig:
    tokenizer_path: str = ""
    text_encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    # A trained projector folder to keep frozen (e.g. from a text-autoencoder run); empty: train one
    # jointly with the flow (flow + KL + alignment), as the paper does.
    projector_path: str = ""
    projector_preset: str = "shapes"
    projector: dict[str, Any] = field(default_factory=dict)
    flow_preset: str = "shapes"
    flow: dict[str, Any] = field(default_factory=dict)
    objective: FlowObjectiveConfig = field(default_factory=FlowObjectiveConfig)
    kl_weight: float = 1e-4
    align_weight: float = 1.0
    # The training image latent: the posterior's "mode" (what the pipeline encodes an image to) or a
    # "sample" as the authors draw; see docs/training.md, "Posterior modes, not draws".
    image_latent: Literal["mode", "sample"] = "mode"
    eval_prompts: int = 64
    # A trained flow folder of the same architecture to start from (fine-tuning); empty: from scratch.
    init_from: str = ""
    eval_steps: int = SamplingDefaults.num_inference_steps
    eval_guidance: float = SamplingDefaults.guidance_scale

    def __post_init__(self) -> None:
        if not self.tokenizer_path:
            raise ConfigError("model.tokenizer_path is required (a trained tokenizer folder)")


class T2IStage(Stage):
    name: ClassVar[str] = "t2i"
    config_class: ClassVar[type] = T2IStageConfig
    frozen_helpers: ClassVar[tuple[str, ...]] = ("frozen_projector", "tokenizer", "encoder", "source")
    frozen_projector: TextProjector | None  # set when model.projector_path names a trained one
    tokenizer: ImageTokenizer
    encoder: TextEncoder
    source: BatchSource

    def __init__(self, cfg: T2IStageConfig, data: DataConfig, seed: int) -> None:
        super().__init__(data, seed)
        self.cfg = cfg
        tok_cfg = ImageTokenizer.read_config(cfg.tokenizer_path)
        k, c = tok_cfg.num_latent_tokens, tok_cfg.token_channels
        fcfg = preset(FLOW_PRESETS, cfg.flow_preset, cfg.flow, what="model.flow")
        if cfg.projector_path:
            self.frozen_projector = TextProjector.from_pretrained(cfg.projector_path)
            freeze(self.frozen_projector)
            pcfg = self.frozen_projector.config
        else:
            pcfg = preset(PROJECTOR_PRESETS, cfg.projector_preset, cfg.projector, what="model.projector")
            self.projector = TextProjector(pcfg)
            if cfg.align_weight == 0:  # unused parameters: frozen, or DDP waits for their gradients forever
                self.projector.align_mlp.requires_grad_(False)
                self.projector.logit_scale.requires_grad_(False)
        check_latent_shapes(k, c, pcfg, fcfg)
        self.flow = FlowTransformer(fcfg)
        init_weights(self.flow, cfg.init_from, "model")
        self.objective = FlowObjective.from_config(cfg.objective)
        self.k = k

    @property
    def proj(self) -> TextProjector:
        """The projector the flow reads: the frozen one, or the one trained here."""
        return self.frozen_projector if self.frozen_projector is not None else self.projector

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        self.tokenizer = load_frozen_tokenizer(self.cfg.tokenizer_path, device)
        self.encoder = load_text_encoder(self.cfg.text_encoder, max_length=self.k, device=device)
        if self.frozen_projector is not None:
            self.frozen_projector.to(device)
        if self.encoder.dim != self.proj.config.text_dim:
            raise ConfigError(f"text encoder width {self.encoder.dim} differs from "
                              f"projector text_dim {self.proj.config.text_dim}")
        self.source = build_source(self.data_cfg, self.seed, device)
        check_pretokenized(self.source, self.tokenizer, self.encoder)

    @torch.no_grad()
    def batch(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        b = self.source.get(step, local_batch, rank, world)
        b["image_latents"] = image_latents(b, self.tokenizer, self.cfg.image_latent)
        b["text_states"], b["text_mask"] = text_states(b, self.encoder)
        return b

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.frozen_projector is not None:
            with torch.no_grad():
                out = self.frozen_projector(batch["text_states"], batch.get("text_mask"), sample=True)
            fm, info = self.objective.loss(self.flow, out.z, batch["image_latents"])
            metrics = {"flow": fm.detach()}
            metrics.update(flow_bins(info))
            return fm, metrics
        out = self.projector(batch["text_states"], batch.get("text_mask"), sample=True)
        fm, info = self.objective.loss(self.flow, out.z, batch["image_latents"])
        kl = self.projector.kl_loss(out.mean, out.logvar)
        align = (self.projector.align_loss(out.z, batch["text_states"], batch.get("text_mask"))
                 if self.cfg.align_weight > 0 else torch.zeros((), device=fm.device))
        loss = fm + self.cfg.kl_weight * kl + self.cfg.align_weight * align
        metrics = {"flow": fm.detach(), "kl": kl.detach(), "align": align.detach()}
        metrics.update(flow_bins(info))
        return loss, metrics

    @torch.no_grad()
    def generate(self, captions: list[str], steps: int, guidance: float) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] on the stage's device: the pipeline's text-to-image path."""
        pipe = FlowTokPipeline(self.tokenizer, self.encoder, self.proj, t2i_flow=self.flow)
        images = pipe.text_to_image(captions, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                                    sample_text_latent=False)
        return cast(torch.Tensor, images).to(self.device)  # output_type "pt": one tensor

    @torch.no_grad()
    def evaluate(self, step: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        n = self.cfg.eval_prompts
        if not self.is_shapes_data():
            return heldout_metrics(self), {}
        if n <= 0:
            return {}, {}
        real, captions, scenes = self.shapes.test_batch(n, 20_000, self.device, num_objects=1,
                                                        size=self.tokenizer.config.image_size)
        images = self.generate(captions, self.cfg.eval_steps, self.cfg.eval_guidance)
        grid = image_grid(torch.cat([real[:8], images[:8]]).float())
        return {"judge_acc_1obj": self.shapes.judge_exact(images, scenes)}, {"samples": grid}

    def export(self, out_dir: Path) -> None:
        self.proj.save_pretrained(Path(out_dir) / "text_projector")  # frozen or trained: the one the flow used
        self.flow.save_pretrained(Path(out_dir) / "t2i_flow")
