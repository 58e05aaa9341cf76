"""The two sides of :mod:`sampling` (the text-to-image throughput benchmark), with random weights.

FlowTok presets (flow, text projector, the paper's tokenizer) and a PixArt-alpha-shaped latent DiT
(diffusers' ``PixArtTransformer2DModel`` and the SD VAE), at the real shapes or the ``--tiny`` CPU
check's; the PixArt transformer behind flowtok's velocity interface; random T5 states with masks.
:mod:`profile_sampling` builds its models here too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from flowtok.flow import FLOW_PRESETS, FlowTransformer
from flowtok.text import PROJECTOR_PRESETS, TextProjector
from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer


# ----------------------------------------------------------------------------------------- shapes
@dataclasses.dataclass
class Shapes:
    """Everything that differs between the real benchmark and the --tiny CPU check."""

    tiny: bool
    clip_len: int = 77
    clip_dim: int = 768
    t5_len: int = 120
    t5_dim: int = 4096

    def flow(self, name: str):
        return dataclasses.replace(FLOW_PRESETS["tiny"], num_tokens=self.clip_len) if self.tiny else FLOW_PRESETS[name]

    def projector(self):
        base = PROJECTOR_PRESETS["tiny" if self.tiny else "paper"]
        return dataclasses.replace(base, text_dim=self.clip_dim, latent_channels=self.flow("FlowTok-XL").in_channels)

    def tokenizer(self):
        if not self.tiny:
            return TOKENIZER_PRESETS["flowtitok-256"]
        return dataclasses.replace(TOKENIZER_PRESETS["tiny"], num_latent_tokens=self.clip_len,
                                   token_channels=self.flow("x").in_channels, text_dim=self.clip_dim,
                                   text_len=self.clip_len)

    def pixart_kwargs(self) -> dict[str, Any]:
        # PixArt-alpha 256 px (PixArt-XL-2-256x256): 28 layers, 16 heads x 72, patch 2, 32 x 32 x 4
        # latent, learned sigma (8 output channels), T5-XXL captions.
        if self.tiny:
            return dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, sample_size=8, patch_size=2,
                        in_channels=4, out_channels=8, cross_attention_dim=16, caption_channels=self.t5_dim,
                        norm_type="ada_norm_single", num_embeds_ada_norm=1000, norm_elementwise_affine=False,
                        norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate",
                        use_additional_conditions=False)
        return dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=32, patch_size=2,
                    in_channels=4, out_channels=8, cross_attention_dim=1152, caption_channels=self.t5_dim,
                    norm_type="ada_norm_single", num_embeds_ada_norm=1000, norm_elementwise_affine=False,
                    norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate",
                    use_additional_conditions=False)

    def vae_kwargs(self) -> dict[str, Any]:
        if self.tiny:
            return dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, sample_size=16)
        # Stable Diffusion's VAE (the one PixArt-alpha uses): 8x downsampling, 4 latent channels.
        return dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    latent_channels=4, sample_size=256)


def tiny_shapes() -> Shapes:
    return Shapes(tiny=True, clip_len=8, clip_dim=16, t5_len=6, t5_dim=16)


# ------------------------------------------------------------------------------------------ models
def _randomise_zero_inits(flow: FlowTransformer) -> None:
    """adaLN-Zero starts every block as the identity; give the zero-initialised Linears real values so
    that the numbers (FP8 error, say) come from a network that computes something."""
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(std=0.02)


def build_flowtok(name: str, shapes: Shapes, device: torch.device, dtype: torch.dtype):
    with torch.device(device):
        flow = FlowTransformer(shapes.flow(name))
        _randomise_zero_inits(flow)
        projector = TextProjector(shapes.projector())
        tokenizer = ImageTokenizer(shapes.tokenizer())
    return (flow.to(dtype).eval(), projector.to(dtype).eval(), tokenizer.to(dtype).eval())


def build_pixart(shapes: Shapes, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

    with torch.device(device):
        transformer = PixArtTransformer2DModel(**shapes.pixart_kwargs())
        vae = AutoencoderKL(**shapes.vae_kwargs())
    return transformer.to(dtype).eval(), vae.to(dtype).eval()


class PixArtVelocity:
    """flowtok's ``model(x, t, null_indicator)`` interface around the PixArt transformer.

    The sampler always hands it the CFG batch [x ; x] (guidance != 1), so the text side is the fixed
    [cond ; null] pair built once per batch, as a diffusers pipeline does before its loop.
    """

    def __init__(self, transformer, states: torch.Tensor, mask: torch.Tensor, null_states: torch.Tensor,
                 null_mask: torch.Tensor) -> None:
        self.transformer = transformer
        self.text = torch.cat([states, null_states.expand_as(states)])
        self.mask = torch.cat([mask, null_mask.expand_as(mask)])
        self.channels = transformer.config.in_channels

    def __call__(self, x: torch.Tensor, t: torch.Tensor, null_indicator: torch.Tensor) -> torch.Tensor:
        out = self.transformer(x, encoder_hidden_states=self.text, timestep=t * 1000,
                               encoder_attention_mask=self.mask,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        return out[:, : self.channels]  # the learned-sigma half is unused by an ODE sampler


def t5_batch(batch: int, shapes: Shapes, device: torch.device, dtype: torch.dtype, generator: torch.Generator):
    """Random T5 states with realistic masks: prompts of 10..L tokens; the null prompt is one token (EOS)."""
    states = torch.randn(batch, shapes.t5_len, shapes.t5_dim, generator=generator).to(device, dtype)
    lengths = torch.randint(min(10, shapes.t5_len), shapes.t5_len + 1, (batch,), generator=generator)
    mask = (torch.arange(shapes.t5_len)[None] < lengths[:, None]).to(device=device, dtype=torch.long)
    null_states = torch.randn(1, shapes.t5_len, shapes.t5_dim, generator=generator).to(device, dtype)
    null_mask = torch.zeros(1, shapes.t5_len, dtype=torch.long, device=device)
    null_mask[:, 0] = 1
    return states, mask, null_states, null_mask
