"""Image tokenizer: images <-> K x C continuous 1D tokens (FlowTiTok), and its training losses."""

from .losses import (
    PAPER_LOSS,
    PatchDiscriminator,
    TokenizerLoss,
    TokenizerLossConfig,
    VGGPerceptualLoss,
    hinge_discriminator_loss,
    lecam_regularizer,
    paper_loss_config,
)
from .model import (
    TOKENIZER_PRESETS,
    DiagonalGaussian,
    ImageTokenizer,
    TokenizerConfig,
    latent_scale_factor,
    latent_usage,
    tokenizer_param_counts,
)

__all__ = [
    "PAPER_LOSS",
    "TOKENIZER_PRESETS",
    "DiagonalGaussian",
    "ImageTokenizer",
    "PatchDiscriminator",
    "TokenizerConfig",
    "TokenizerLoss",
    "TokenizerLossConfig",
    "VGGPerceptualLoss",
    "hinge_discriminator_loss",
    "latent_scale_factor",
    "latent_usage",
    "lecam_regularizer",
    "paper_loss_config",
    "tokenizer_param_counts",
]
