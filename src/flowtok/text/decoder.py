"""The text decoder for image-to-text: text latent [B, L, C] -> per-position token logits [B, L, V].

The paper maps the 77 x 16 latent back to CLIP token ids with 6 transformer blocks, one token per
position, not autoregressive; no code for it was released, so the block design here is ours:
``Linear(C, width)`` + learned positions, pre-LN blocks (flowtok.nn ``Attention`` through SDPA and
the GELU ``Mlp``), a final LayerNorm and the vocabulary head. ``head_dim`` factorises the head as
``width -> head_dim -> vocab`` so that a small model is not dominated by ``width x vocab`` weights.

The loss is cross-entropy on **every** position, pads included: predicting the first pad (or the
EOS before it) is how the decoder says where the caption ends. ``pad_loss_weight`` scales the pad
positions (1.0 = plain mean over all positions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InvalidInputError
from ..modeling import PretrainedMixin
from ..nn import Attention, Mlp
from .encoders import TextEncoder, check_captions
from .projector import TextProjector


@dataclass
class DecoderConfig:
    latent_channels: int = 16
    num_tokens: int = 77
    width: int = 768
    depth: int = 6
    num_heads: int = 12
    mlp_ratio: float = 4.0
    vocab_size: int = 49408          # CLIP BPE; 30522 for MiniLM's WordPiece
    head_dim: int | None = None      # None: one Linear(width, vocab); else width -> head_dim -> vocab
    pad_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("latent_channels", "num_tokens", "width", "depth", "num_heads", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"decoder.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ConfigError(f"decoder.width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.head_dim is not None and self.head_dim < 1:
            raise ConfigError(f"decoder.head_dim must be positive or null, got {self.head_dim}")
        if self.pad_loss_weight < 0:
            raise ConfigError(f"decoder.pad_loss_weight must be >= 0, got {self.pad_loss_weight}")


DECODER_PRESETS: dict[str, DecoderConfig] = {
    "paper": DecoderConfig(),
    "shapes": DecoderConfig(width=256, depth=4, num_heads=4, vocab_size=30522, head_dim=64),
    "tiny": DecoderConfig(width=64, depth=2, num_heads=4, vocab_size=30522, head_dim=32),
}


class DecoderBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextDecoder(nn.Module, PretrainedMixin):
    """Non-autoregressive: every position's token is read off the whole latent at once."""

    config_class = DecoderConfig
    model_type = "flowtok_text_decoder"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.input_proj = nn.Linear(c.latent_channels, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_tokens, c.width))
        self.blocks = nn.ModuleList(DecoderBlock(c.width, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        if c.head_dim is None:
            self.head = nn.Sequential(nn.Linear(c.width, c.vocab_size))
        else:
            self.head = nn.Sequential(nn.Linear(c.width, c.head_dim, bias=False), nn.Linear(c.head_dim, c.vocab_size))
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, L, C] (L <= num_tokens) -> logits [B, L, vocab_size]."""
        c = self.config
        if z.dim() != 3 or z.shape[-1] != c.latent_channels or z.shape[1] > c.num_tokens:
            raise InvalidInputError(
                f"text latent must be [B, <= {c.num_tokens}, {c.latent_channels}], got {list(z.shape)}"
            )
        x = self.input_proj(z.to(self.input_proj.weight.dtype)) + self.pos_embed[:, : z.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def loss(self, z: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy over all positions; pad positions (mask False) weighted by ``pad_loss_weight``."""
        logits = self(z).float()
        ce = F.cross_entropy(logits.transpose(1, 2), input_ids.to(logits.device), reduction="none")
        if mask is None or self.config.pad_loss_weight == 1.0:
            return ce.mean()
        w = torch.where(mask.to(ce.device).bool(), 1.0, self.config.pad_loss_weight)
        return (ce * w).sum() / w.sum().clamp_min(1e-8)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, text_encoder: TextEncoder) -> list[str]:
        """Argmax tokens -> clean strings through the encoder's tokenizer."""
        if text_encoder.vocab_size != self.config.vocab_size:
            raise ConfigError(
                f"decoder predicts {self.config.vocab_size} token ids but the text encoder has "
                f"{text_encoder.vocab_size}"
            )
        return text_encoder.decode_ids(self(z).argmax(-1).cpu())


def normalize_caption(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


@torch.no_grad()
def text_roundtrip_accuracy(projector: TextProjector, decoder: TextDecoder, encoder: TextEncoder,
                            captions: list[str], batch_size: int = 64) -> float:
    """Exact-match fraction of ``decode(projector(encode(c)).mean)`` against ``c``.

    The reference is the caption as the tokenizer can represent it (``decode_ids`` of its own ids:
    truncated, WordPiece accents stripped, CLIP spacing), then both sides are lowercased with
    whitespace collapsed, so the score measures the autoencoder, not the tokenizer. The projector
    runs deterministically (z = mean), as it does at inference.
    """
    captions = check_captions(captions)
    was_training = projector.training, decoder.training
    projector.eval()
    decoder.eval()
    param = next(projector.parameters())
    hits = 0
    try:
        for start in range(0, len(captions), batch_size):
            st = encoder.encode(captions[start:start + batch_size])
            z = projector(st.states.to(param.device, param.dtype), st.mask.to(param.device), sample=False).z
            pred = decoder.decode(z, encoder)
            ref = encoder.decode_ids(st.input_ids)
            hits += sum(normalize_caption(p) == normalize_caption(r) for p, r in zip(pred, ref))
    finally:
        projector.train(was_training[0])
        decoder.train(was_training[1])
    return hits / len(captions)
