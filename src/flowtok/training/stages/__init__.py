"""The training stages handed to the one :class:`~flowtok.training.trainer.Trainer`, one file each.

- ``tokenizer``: the 1D image tokenizer (L2 + KL).
- ``t2i``: text projector + FlowTok transformer, text latent (t=0) -> image latent (t=1), trained
  jointly with flow + KL + alignment losses, as in the paper.
- ``text_decoder``: the non-autoregressive text decoder on the (frozen) projector's latents; with
  no ``projector_path`` it trains both as a text autoencoder.
- ``i2t``: a second FlowTok transformer, image latent (t=0) -> text latent (t=1); KL and alignment
  weights are 0 in the paper, so the projector is simply frozen here.
- ``distill``: a 1-, 2- or 4-step student of a trained flow (either direction), see
  :class:`DistillStageConfig`.

Each stage's config dataclass sits beside it; :data:`STAGES` maps a YAML ``stage:`` name to both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Stage, check_latent_shapes
from .distill import DistillStage, DistillStageConfig
from .i2t import I2TStage, I2TStageConfig
from .shapes_world import ShapesWorld
from .t2i import T2IStage, T2IStageConfig
from .text_decoder import TextDecoderStage, TextDecoderStageConfig
from .tokenizer import TokenizerStage, TokenizerStageConfig

# Each stage class takes (its model config, the data config, the seed).
STAGES: dict[str, tuple[Callable[..., Stage], type[Any]]] = {
    cls.name: (cls, cls.config_class)
    for cls in (TokenizerStage, T2IStage, TextDecoderStage, I2TStage, DistillStage)
}

__all__ = [
    "STAGES", "DistillStage", "DistillStageConfig", "I2TStage", "I2TStageConfig", "ShapesWorld", "Stage",
    "T2IStage", "T2IStageConfig", "TextDecoderStage", "TextDecoderStageConfig", "TokenizerStage",
    "TokenizerStageConfig", "check_latent_shapes",
]
