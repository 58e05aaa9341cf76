"""The ``i2t`` stage: a second FlowTok transformer, image latent (t = 0) -> text latent (t = 1) of the
frozen projector (the paper's KL and alignment weights are 0 for this direction)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from ...config import preset
from ...data.tokens import TokenShards
from ...errors import ConfigError, InvalidInputError
from ...flow import FLOW_PRESETS, FlowObjective, FlowObjectiveConfig, FlowTransformer
from ...pipelines import FlowTokPipeline, SamplingDefaults
from ...text import TextDecoder, TextEncoder, TextEncoderSpec, TextProjector, load_text_encoder
from ...tokenizer import ImageTokenizer
from ..data import BatchSource, DataConfig, LatentSource, build_source
from ..loader import TokenSource
from .base import (
    Stage,
    check_latent_shapes,
    check_pretokenized,
    flow_bins,
    freeze,
    heldout_metrics,
    image_latents,
    init_weights,
    load_frozen_tokenizer,
    text_states,
)

log = logging.getLogger(__name__)


@dataclass
class I2TStageConfig:
    tokenizer_path: str = ""
    projector_path: str = ""
    decoder_path: str = ""  # optional: enables caption accuracy in evaluation
    text_encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    flow_preset: str = "shapes"
    flow: dict[str, Any] = field(default_factory=dict)
    objective: FlowObjectiveConfig = field(default_factory=FlowObjectiveConfig)
    target: Literal["mean", "sample"] = "mean"
    # The ODE from one image latent has one end point, so several paraphrases of one image would be
    # averaged; "canonical" trains on one fixed template per scene (shapes world only).
    caption_mode: Literal["canonical", "random"] = "canonical"
    # The training image latent: the posterior's "mode" (what the pipeline encodes an image to) or a
    # "sample" as the authors draw; see docs/training.md, "Posterior modes, not draws".
    image_latent: Literal["mode", "sample"] = "mode"
    eval_images: int = 64
    # A trained flow folder of the same architecture to start from (fine-tuning); empty: from scratch.
    init_from: str = ""
    eval_steps: int = SamplingDefaults.num_inference_steps
    eval_guidance: float = SamplingDefaults.caption_guidance_scale

    def __post_init__(self) -> None:
        if not self.tokenizer_path or not self.projector_path:
            raise ConfigError("model.tokenizer_path and model.projector_path are required for the i2t stage")


class I2TStage(Stage):
    name: ClassVar[str] = "i2t"
    config_class: ClassVar[type] = I2TStageConfig
    frozen_helpers: ClassVar[tuple[str, ...]] = ("tokenizer", "projector", "encoder", "decoder", "source", "targets")
    tokenizer: ImageTokenizer
    projector: TextProjector
    encoder: TextEncoder
    decoder: TextDecoder | None  # loaded at the first evaluation, when model.decoder_path holds one
    source: BatchSource
    # Text latents of every pre-tokenised sample's canonical caption, when the shards carry scenes.
    targets: torch.Tensor | None

    def __init__(self, cfg: I2TStageConfig, data: DataConfig, seed: int) -> None:
        super().__init__(data, seed)
        self.cfg = cfg
        tok_cfg = ImageTokenizer.read_config(cfg.tokenizer_path)
        pcfg = TextProjector.read_config(cfg.projector_path)
        fcfg = preset(FLOW_PRESETS, cfg.flow_preset, cfg.flow, what="model.flow")
        check_latent_shapes(tok_cfg.num_latent_tokens, tok_cfg.token_channels, pcfg, fcfg)
        self.flow = FlowTransformer(fcfg)
        init_weights(self.flow, cfg.init_from, "model")
        self.objective = FlowObjective.from_config(cfg.objective)
        self.k = tok_cfg.num_latent_tokens

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        self.tokenizer = load_frozen_tokenizer(self.cfg.tokenizer_path, device)
        self.projector = TextProjector.from_pretrained(self.cfg.projector_path, device=device)
        freeze(self.projector)
        self.encoder = load_text_encoder(self.cfg.text_encoder, max_length=self.k, device=device)
        self.source = build_source(self.data_cfg, self.seed, device)
        check_pretokenized(self.source, self.tokenizer, self.encoder)
        self.targets = None
        if self.cfg.caption_mode == "canonical" and self.cfg.target == "mean":
            self.targets = self._canonical_targets()
            source = self.source
            if (self.targets is None and isinstance(source, TokenSource)
                    and self._captions_look_like_shapes(source.shards)):
                # A meta.json whose "source" was edited once trained a flow on mixed wording, silently.
                log.warning("%s: the captions are shapes captions but meta.json says source %r, not "
                            "'shapes': training on each sample's own wording, not canonical captions (join "
                            "folders with 'flowtok data merge', which keeps the source)", self.data_cfg.path,
                            source.meta.get("source"))

    def _captions_look_like_shapes(self, shards: TokenShards, n: int = 32) -> bool:
        """Whether the first ``n`` captions of the shards all parse as shapes scenes."""
        captions = shards.read(np.arange(min(n, len(shards))))["captions"]
        try:
            for c in captions:
                self.shapes.scene_of(c)
        except InvalidInputError:
            return False
        return True

    @torch.no_grad()
    def _canonical_targets(self) -> torch.Tensor | None:
        """Text latents of every pre-tokenised sample's canonical caption, computed once (each distinct
        caption encoded once): per batch, parsing and re-encoding the captions kept the GPU waiting most
        of a step. ``None`` when the data is not pre-tokenised shapes samples."""
        if isinstance(self.source, LatentSource):
            records = self.source.dataset.records
            if not all(r.get("scene") for r in records):
                return None
            canonical = [self.shapes.canonical_caption(r["scene"]) for r in records]
        elif isinstance(self.source, TokenSource) and self.is_shapes_data():
            canonical = [self.shapes.canonical_caption(self.shapes.scene_of(c)) for c in self.source.shards.captions()]
        else:
            return None
        distinct = sorted(set(canonical))
        row = {c: i for i, c in enumerate(distinct)}
        out = []
        for i in range(0, len(distinct), 2048):
            ts = self.encoder.encode(distinct[i:i + 2048])
            out.append(self.projector(ts.states.float(), ts.mask, sample=False).mean)
        index = torch.tensor([row[c] for c in canonical], device=out[0].device)
        return torch.cat(out).index_select(0, index)

    @torch.no_grad()
    def batch(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        b = self.source.get(step, local_batch, rank, world)
        b["image_latents"] = image_latents(b, self.tokenizer, self.cfg.image_latent)
        if self.targets is not None:
            b["text_latents"] = self.targets.index_select(0, b["index"])
            return b
        if self.cfg.caption_mode == "canonical" and (b.get("scenes") or self.is_shapes_data()):
            # Compact shards store captions, not scenes: a shapes caption is parsed back to its scene.
            scenes = b.get("scenes") or [self.shapes.scene_of(c) for c in b["captions"]]
            ts = self.encoder.encode([self.shapes.canonical_caption(s) for s in scenes])
            states, mask = ts.states.float(), ts.mask
        else:
            states, mask = text_states(b, self.encoder)
        out = self.projector(states, mask, sample=self.cfg.target == "sample")
        b["text_latents"] = out.z if self.cfg.target == "sample" else out.mean
        return b

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fm, info = self.objective.loss(self.flow, batch["image_latents"], batch["text_latents"])
        metrics = {"flow": fm.detach()}
        metrics.update(flow_bins(info))
        return fm, metrics

    @torch.no_grad()
    def caption(self, images: torch.Tensor, steps: int, guidance: float) -> list[str]:
        assert self.decoder is not None, "caption() needs model.decoder_path"
        pipe = FlowTokPipeline(self.tokenizer, self.encoder, self.projector, i2t_flow=self.flow, text_decoder=self.decoder)
        return pipe.image_to_text(images, num_inference_steps=steps, guidance_scale=guidance)

    @torch.no_grad()
    def evaluate(self, step: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        if not self.is_shapes_data():
            return heldout_metrics(self), {}
        # Loaded here, not in setup: the decoder may be trained at the same time as this stage.
        if self.decoder is None:
            if not self.cfg.decoder_path or not Path(self.cfg.decoder_path).is_dir():
                return {}, {}
            self.decoder = TextDecoder.from_pretrained(self.cfg.decoder_path, device=self.device)
            freeze(self.decoder)
        images, _, scenes = self.shapes.test_batch(self.cfg.eval_images, 30_000, self.device, num_objects=1,
                                                   size=self.tokenizer.config.image_size)
        caps = self.caption(images, self.cfg.eval_steps, self.cfg.eval_guidance)
        return {"caption_exact_1obj": self.shapes.caption_exact(caps, scenes)}, {}

    def export(self, out_dir: Path) -> None:
        self.flow.save_pretrained(Path(out_dir) / "i2t_flow")
