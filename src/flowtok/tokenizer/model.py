"""The FlowTiTok image tokenizer: images <-> K x C continuous 1D tokens through a KL bottleneck.

Encoder (a ViT): ``[patch tokens ; K learned latent tokens]`` -> transformer -> the K latent outputs ->
``2C`` channels (mean, logvar) per token. Decoder (a ViT): ``[grid**2 mask tokens ; K latent tokens ;
L text tokens]`` -> transformer -> the grid outputs -> pixels. Images are ``[B, 3, H, W]`` in [0, 1];
latents are ``[B, K, C]``, unscaled; the flows see them through :meth:`ImageTokenizer.encode_for_flow` and
:meth:`ImageTokenizer.decode_from_flow`, which apply the latent scale factor.

Upstream facts matched (FlowTok re-implementation, commit d4d43c5: ``libs/flowtitok.py``,
``libs/model/blocks.py`` for ``FlowTiTokEncoder``/``FlowTiTokDecoder``, ``libs/model/pos_embed.py``
for the RoPE actually used, ``libs/model/swiglu.py``; the paper and configs for the sizes):

- Images enter and leave in [0, 1]; there is no [-1, 1] normalisation inside (the data transform
  normalises with mean 0, std 1 and the evaluation clamps decoder output to [0, 1]).
- Patch embedding: ``Conv2d(3, width, p, stride=p)`` with bias; the patch tokens get NO absolute
  position embedding, only RoPE.
- RoPE: 2D, theta 10000, on the patch / mask tokens only (the first ``grid**2`` of each sequence),
  applied to q and k of every block; head split into a row half and a column half, adjacent-pair
  rotation (see :mod:`flowtok.nn.rope`). Latent and text tokens get learned absolute embeddings.
  (``libs/model/axial_rope.py`` is NOT the tokenizer's RoPE: only ``dimr_t2i.py`` imports it.)
- Encoder sequence: ``[patches ; latent_tokens + latent_pos]``; ``latent_tokens`` and the position
  tables start as ``width**-0.5 * randn``.
- Blocks: pre-norm (LayerNorm eps 1e-5) ``x + attn(ln1(x))``, ``x + mlp(ln2(x))``; attention with one
  fused qkv Linear (bias) and an output proj, plain softmax scale ``head_dim**-0.5``, no qk-norm.
- MLP: SwiGLU with one fused ``w12`` Linear (first half gated by SiLU, second half linear) and ``w3``,
  both with bias, hidden ``int(2/3 * int(4 * width))``: 2048 at width 768, 2730 at 1024.
- One LayerNorm before the first block over the whole sequence (``ln_pre``) and one after the last
  block over the kept tokens only (``ln_post``).
- Encoder head: a 1x1 conv (here a Linear of the same weights) width -> 2C; the first C channels
  are the mean, the last C the logvar.
- Posterior: float32, logvar clamped to [-30, 20]; KL = 0.5 * sum(mu^2 + var - 1 - logvar).
- Decoder sequence: ``[mask_token x grid**2 ; Linear(C, width)(z) + latent_pos ; Linear(text_dim,
  width)(text) + text_pos]`` (text length 77, text width 768 for the paper); the grid outputs go
  through ``ln_post``, a 1x1 conv width -> p*p*3 (here a Linear), an unpatchify whose channel order is
  ``(p_row, p_col, rgb)``, and a final 3x3 conv 3 -> 3 (padding 1, bias).
- Init: Linear/Conv weights trunc-normal std 0.02, biases 0, LayerNorm 1/0.
- Latent scale factor 1.0143 (``config.vq_model.scale_factor``), applied outside the tokenizer upstream;
  here the tokenizer owns it (``encode_for_flow`` / ``decode_from_flow``), so no caller multiplies.
- Sizes: encoder ViT-B (768, 12 layers, 12 heads), decoder ViT-L (1024, 24, 16), patch 16, K 77,
  C 16, for both the 256 px and the released 512 px tokenizer (``FlowTok-*-Stage3.py``: crop 512).

Where we differ, on purpose: :meth:`ImageTokenizer.encode` returns the posterior mode unless asked to
sample (upstream's ``encode`` always samples); ``text_dim = 0`` gives a decoder without a text path;
text states may be omitted (zeros are used, see :meth:`ImageTokenizer.decode`); the RoPE tables are
derived, non-persistent buffers. Upstream key -> our key (a converter renames; shapes are equal except
the two 1x1 convs, whose ``[out, in, 1, 1]`` weights become ``[out, in]``):

=================================================  ==============================================
``latent_tokens``                                  ``encoder.latent_tokens``
``encoder.patch_embed.*``                          ``encoder.patch_embed.*``
``encoder.latent_token_positional_embedding``      ``encoder.latent_pos_embed``
``{enc,dec}oder.ln_pre.* / ln_post.*``             ``{enc,dec}oder.norm_pre.* / norm_post.*``
``{enc,dec}oder.transformer.{i}.ln_1 / ln_2``      ``{enc,dec}oder.blocks.{i}.norm1 / norm2``
``{enc,dec}oder.transformer.{i}.attn.qkv / proj``  ``{enc,dec}oder.blocks.{i}.attn.qkv / proj``
``{enc,dec}oder.transformer.{i}.mlp.w12 / w3``     ``{enc,dec}oder.blocks.{i}.mlp.w12 / w3``
``encoder.conv_out.*``                             ``encoder.to_moments.*`` (squeeze 1x1)
``decoder.decoder_embed.*``                        ``decoder.latent_embed.*``
``decoder.mask_token``                             ``decoder.mask_token``
``decoder.latent_token_positional_embedding``      ``decoder.latent_pos_embed``
``decoder.text_guidance_proj.*``                   ``decoder.text_proj.*``
``decoder.text_guidance_positional_embedding``     ``decoder.text_pos_embed``
``decoder.ffn.0.*``                                ``decoder.to_pixels.*`` (squeeze 1x1)
``decoder.conv_out.*``                             ``decoder.conv_out.*``
``{enc,dec}oder.positional_embedding.freqs_{cos,sin}``  dropped (equal to ``rope.cos`` / ``rope.sin``)
=================================================  ==============================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import preset as named_preset
from ..errors import ConfigError, InvalidInputError
from ..modeling import PretrainedMixin
from ..nn import Attention, Mlp, SwiGLU, count_parameters
from ..nn.rope import RotaryEmbedding2D

# Images may overshoot [0, 1] a little (bicubic resizing rings); a range far outside it means the
# caller passed [-1, 1] or [0, 255] images, which the tokenizer would silently turn into garbage.
_RANGE_SLACK = 0.25


@dataclass
class TokenizerConfig:
    """Sizes of the image tokenizer. The defaults are the paper's 256 px FlowTiTok."""

    image_size: int = 256
    patch_size: int = 16
    num_latent_tokens: int = 77  # K
    token_channels: int = 16  # C
    encoder_width: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_width: int = 1024
    decoder_depth: int = 24
    decoder_heads: int = 16
    text_dim: int = 768  # width of the text states the decoder reads; 0 = no text path
    text_len: int = 77  # number of text states the decoder reads (CLIP's context length upstream)
    mlp_type: Literal["swiglu", "gelu"] = "swiglu"  # upstream blocks have both; FlowTiTok uses SwiGLU
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0
    scale_factor: float = 1.0143  # latents are multiplied by this before flow matching
    logvar_min: float = -30.0
    logvar_max: float = 20.0

    def __post_init__(self) -> None:
        positive = ("image_size", "patch_size", "num_latent_tokens", "token_channels", "encoder_width",
                    "encoder_depth", "encoder_heads", "decoder_width", "decoder_depth", "decoder_heads")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"tokenizer {name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"tokenizer image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        for part in ("encoder", "decoder"):
            width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if width % heads:
                raise ConfigError(f"tokenizer {part}_width {width} is not divisible by {part}_heads {heads}")
            if (width // heads) % 4:
                raise ConfigError(
                    f"tokenizer {part} head width {width // heads} must be divisible by 4 for 2D RoPE"
                )
        if self.text_dim < 0 or (self.text_dim > 0 and self.text_len <= 0):
            raise ConfigError(
                f"tokenizer text_dim must be >= 0 and text_len > 0 when text_dim > 0, "
                f"got text_dim={self.text_dim}, text_len={self.text_len}"
            )
        if self.mlp_ratio <= 0:
            raise ConfigError(f"tokenizer mlp_ratio must be positive, got {self.mlp_ratio}")
        if not self.scale_factor > 0:
            raise ConfigError(f"tokenizer scale_factor must be positive, got {self.scale_factor}")
        if not self.logvar_min < self.logvar_max:
            raise ConfigError(
                f"tokenizer logvar_min {self.logvar_min} must be below logvar_max {self.logvar_max}"
            )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.num_latent_tokens, self.token_channels)

    def mlp_hidden(self, width: int) -> int:
        # The exact upstream expression; int(8 * w / 3) can differ by one for some widths.
        hidden = int(width * self.mlp_ratio)
        return int(2 / 3 * hidden) if self.mlp_type == "swiglu" else hidden


_PAPER = TokenizerConfig()

TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    # The paper's tokenizer: ViT-B encoder, ViT-L decoder reading CLIP-L/14 text states (77 x 768).
    "flowtitok-256": _PAPER,
    # The released FlowTiTok_512.bin: the same network at 512 px (32 x 32 patch grid); only the RoPE
    # tables depend on the image size, so the weights have the same shapes as at 256 px.
    "flowtitok-512": replace(_PAPER, image_size=512),
    # The procedural shapes world: 128 px, patch 8 (16 x 16 grid), 32 x 16 latents, about 9.5M
    # parameters (the bundled model must stay small). The decoder reads no text: flat-coloured shapes
    # are fully described by the latent, and this keeps tokenizer training independent of the text encoder.
    # Measured: 300 s on one H100 (batch 128, bf16, torch.compile, AdamW lr 1e-3 cosine, L2 + KL 1e-6)
    # gave 42.6 dB PSNR on held-out shapes (>= 32 dB after ~140 s). Its latent std is ~0.3, not ~1: the
    # tokenizer stage's export measures scale_factor (1 / std, 3.09 for the bundled model) on training images.
    "shapes-128": TokenizerConfig(
        image_size=128, patch_size=8, num_latent_tokens=32, token_channels=16,
        encoder_width=256, encoder_depth=4, encoder_heads=4,
        decoder_width=256, decoder_depth=8, decoder_heads=4,
        text_dim=0,
    ),
    # CPU unit tests: milliseconds per forward, with the text path on.
    "tiny": TokenizerConfig(
        image_size=32, patch_size=8, num_latent_tokens=4, token_channels=4,
        encoder_width=32, encoder_depth=1, encoder_heads=2,
        decoder_width=32, decoder_depth=1, decoder_heads=2,
        text_dim=8, text_len=4,
    ),
}


class DiagonalGaussian:
    """The KL bottleneck's posterior over latents ``[B, K, C]``, kept in float32.

    ``moments`` is ``[B, K, 2C]``: the first C channels are the mean, the last C the log-variance,
    which is clamped to ``[logvar_min, logvar_max]`` so that ``exp`` can neither vanish nor overflow.
    """

    def __init__(self, moments: torch.Tensor, logvar_min: float = -30.0, logvar_max: float = 20.0) -> None:
        mean, logvar = moments.float().chunk(2, dim=-1)
        self.mean = mean
        self.logvar = logvar.clamp(logvar_min, logvar_max)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps; ``generator`` must live on the posterior's device."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, ``[B]``, summed over tokens and channels."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2))


class TokenizerBlock(nn.Module):
    """Pre-norm transformer block; the RoPE hook rotates only the patch tokens."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, mlp_type: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width)
        # Upstream's GELU variant uses exact GELU, not the tanh approximation of DiT.
        self.mlp = SwiGLU(width, mlp_hidden) if mlp_type == "swiglu" else Mlp(width, mlp_hidden, approximate="none")

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope=rope)
        return x + self.mlp(self.norm2(x))


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, rope: RotaryEmbedding2D, use_checkpoint: bool) -> torch.Tensor:
    for block in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(block, x, rope, use_reentrant=False)
        else:
            x = block(x, rope)
    return x


class TokenizerEncoder(nn.Module):
    """Images [B, 3, H, W] -> posterior moments [B, K, 2C]."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        c = config
        width = c.encoder_width
        self.num_patches = c.grid_size**2
        self.patch_embed = nn.Conv2d(3, width, kernel_size=c.patch_size, stride=c.patch_size)
        self.latent_tokens = nn.Parameter(width**-0.5 * torch.randn(c.num_latent_tokens, width))
        self.latent_pos_embed = nn.Parameter(width**-0.5 * torch.randn(c.num_latent_tokens, width))
        self.rope = RotaryEmbedding2D(width // c.encoder_heads, c.grid_size, c.rope_theta)
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            TokenizerBlock(width, c.encoder_heads, c.mlp_hidden(width), c.mlp_type) for _ in range(c.encoder_depth)
        )
        self.norm_post = nn.LayerNorm(width)
        self.to_moments = nn.Linear(width, 2 * c.token_channels)
        self.gradient_checkpointing = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, g*g, W], row-major
        latents = (self.latent_tokens + self.latent_pos_embed).to(patches.dtype)
        x = torch.cat([patches, latents.expand(patches.shape[0], -1, -1)], dim=1)
        x = _run_blocks(self.blocks, self.norm_pre(x), self.rope, self.gradient_checkpointing)
        return self.to_moments(self.norm_post(x[:, self.num_patches:]))


class TokenizerDecoder(nn.Module):
    """Latents [B, K, C] (+ text states [B, L, text_dim]) -> images [B, 3, H, W], unclamped."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        c = config
        width = c.decoder_width
        self.grid = c.grid_size
        self.patch = c.patch_size
        self.text_dim = c.text_dim
        self.latent_embed = nn.Linear(c.token_channels, width)
        self.mask_token = nn.Parameter(width**-0.5 * torch.randn(1, 1, width))
        self.latent_pos_embed = nn.Parameter(width**-0.5 * torch.randn(c.num_latent_tokens, width))
        if c.text_dim > 0:
            self.text_proj = nn.Linear(c.text_dim, width)
            self.text_pos_embed = nn.Parameter(width**-0.5 * torch.randn(c.text_len, width))
        self.rope = RotaryEmbedding2D(width // c.decoder_heads, c.grid_size, c.rope_theta)
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            TokenizerBlock(width, c.decoder_heads, c.mlp_hidden(width), c.mlp_type) for _ in range(c.decoder_depth)
        )
        self.norm_post = nn.LayerNorm(width)
        self.to_pixels = nn.Linear(width, c.patch_size * c.patch_size * 3)
        self.conv_out = nn.Conv2d(3, 3, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, latents: torch.Tensor, text_states: torch.Tensor | None) -> torch.Tensor:
        b = latents.shape[0]
        g, p = self.grid, self.patch
        tokens = self.latent_embed(latents) + self.latent_pos_embed
        parts = [self.mask_token.to(tokens.dtype).expand(b, g * g, -1), tokens]
        if self.text_dim > 0:
            parts.append(self.text_proj(text_states) + self.text_pos_embed)
        x = _run_blocks(self.blocks, self.norm_pre(torch.cat(parts, dim=1)), self.rope, self.gradient_checkpointing)
        pixels = self.to_pixels(self.norm_post(x[:, : g * g]))  # [B, g*g, p*p*3], channels (p_row, p_col, rgb)
        image = pixels.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)
        return self.conv_out(image)


class ImageTokenizer(nn.Module, PretrainedMixin):
    """FlowTiTok: images in [0, 1] <-> unscaled latents ``[B, K, C]``.

    ``decode`` returns images in the [0, 1] convention but NOT clamped (the training loss wants the raw
    output); call :meth:`postprocess` (or clamp yourself) before viewing or saving.
    """

    config_class = TokenizerConfig
    model_type = "flowtok_image_tokenizer"

    def __init__(self, config: TokenizerConfig | None = None) -> None:
        super().__init__()
        self.config = config or TokenizerConfig()
        self.encoder = TokenizerEncoder(self.config)
        self.decoder = TokenizerDecoder(self.config)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, SwiGLU):  # apply() visits it after its Linears
            module.zero_padding()

    @property
    def scale_factor(self) -> float:
        """Flow latents are unscaled latents times this (applied by :meth:`scale_latents`)."""
        return self.config.scale_factor

    @property
    def reads_text(self) -> bool:
        """Whether the decoder has a text path (``text_dim > 0``) and so reads the prompt's text states."""
        return self.config.text_dim > 0

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.config.latent_shape

    def quantize_decoder_fp8(self, emulate: bool = False,
                             calibrate: Callable[[], Any] | None = None) -> ImageTokenizer:
        """FP8 inference for the image decoder on Hopper / Ada GPUs: the Linears of its transformer blocks
        (attention qkv and output, the MLP's input: 78% of the paper decoder's block FLOPs) become
        :class:`flowtok.nn.fp8.FP8Linear`. The MLP's output Linear keeps its dtype: its input, the SwiGLU
        product, has the widest range (on the bundled shapes decoder, world v1, quantising it too cost 0.09 dB
        of reconstruction PSNR against bf16 instead of 0.03), as do the embeddings, the pixel head, the norms
        and the whole encoder.

        Without ``calibrate``: per-channel weight scales and per-token input scales computed on the fly. With
        ``calibrate``, a callable that decodes representative latents (reconstructing or generating a few
        images): each layer's largest input becomes a static per-tensor scale, so quantising an input is a cast
        that fuses into the kernel before it and the GEMMs take cuBLAS's fast tensorwise FP8 path. Check the
        reconstruction PSNR on your data (``flowtok eval recon --fp8``). In place, inference only (no backward,
        no ``save_pretrained`` afterwards); call it before ``torch.compile`` or the pipeline's fast path.
        ``emulate=True`` computes the same quantised numbers with float matmuls on any device. Returns self."""
        from ..nn.fp8 import quantize_blocks_fp8

        def keep(name: str, _layer: nn.Module) -> bool:
            return name.endswith((".mlp.w3", ".mlp.fc2"))

        quantize_blocks_fp8(self.decoder.blocks, emulate=emulate, calibrate=calibrate, keep=keep)
        return self.requires_grad_(False)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward: needed to train the ViT-L decoder at large batch."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    # -- input checks ---------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if not isinstance(images, torch.Tensor):
            raise InvalidInputError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise InvalidInputError(f"images must be [B, 3, {size}, {size}], got shape {tuple(images.shape)}")
        if images.shape[-2:] != (size, size):
            raise InvalidInputError(
                f"images must be {size}x{size} for this tokenizer, got {images.shape[-2]}x{images.shape[-1]}"
            )
        if not images.is_floating_point():
            raise InvalidInputError(f"images must be float in [0, 1], got dtype {images.dtype}")
        if images.numel() == 0:
            raise InvalidInputError("images is an empty batch")
        if torch.compiler.is_compiling():
            return  # the value checks below need a host sync, which would break the compiled graph
        lo, hi = (v.item() for v in torch.aminmax(images.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi)):  # aminmax propagates NaN
            raise InvalidInputError("images contain NaN or infinite values")
        if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            raise InvalidInputError(f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")

    def _check_latents(self, latents: torch.Tensor) -> None:
        k, c = self.latent_shape
        if not isinstance(latents, torch.Tensor) or latents.dim() != 3 or tuple(latents.shape[1:]) != (k, c):
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise InvalidInputError(f"latents must be [B, {k}, {c}], got {shape}")

    def _text_or_zeros(self, text_states: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        dim, length = self.config.text_dim, self.config.text_len
        if dim == 0:
            if text_states is not None:
                raise InvalidInputError("this tokenizer's decoder reads no text (text_dim=0); pass text_states=None")
            return None
        if text_states is None:
            return torch.zeros(batch, length, dim, device=like.device, dtype=like.dtype)
        if not isinstance(text_states, torch.Tensor) or tuple(text_states.shape) != (batch, length, dim):
            shape = tuple(text_states.shape) if isinstance(text_states, torch.Tensor) else type(text_states).__name__
            raise InvalidInputError(f"text_states must be [{batch}, {length}, {dim}], got {shape}")
        return text_states.to(like.dtype)

    # -- public API -----------------------------------------------------------------------------
    def encode_posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        """Images ``[B, 3, H, W]`` in [0, 1] -> the posterior over latents ``[B, K, C]``."""
        self._check_images(images)
        moments = self.encoder(images.to(self.encoder.patch_embed.weight.dtype))
        return DiagonalGaussian(moments, self.config.logvar_min, self.config.logvar_max)

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> latents ``[B, K, C]`` float32, NOT multiplied by :attr:`scale_factor`.

        The posterior mode by default (deterministic); ``sample=True`` draws from the posterior.
        """
        posterior = self.encode_posterior(images)
        return posterior.sample(generator) if sample else posterior.mode()

    def decode(self, latents: torch.Tensor, text_states: torch.Tensor | None = None) -> torch.Tensor:
        """Latents ``[B, K, C]`` (unscaled) -> images ``[B, 3, H, W]``, [0, 1] convention, unclamped.

        ``text_states`` ``[B, text_len, text_dim]`` are the text encoder's token states (all positions
        are attended, padding included, as upstream does with CLIP). When the decoder has a text path
        and ``text_states`` is None, all-zero states are used, so the text tokens reduce to the
        projection bias plus their position embeddings: a fixed "no text" input. A decoder meant to
        work without text should be trained with that input too (or built with ``text_dim=0``).
        """
        self._check_latents(latents)
        dtype = self.decoder.latent_embed.weight.dtype
        latents = latents.to(dtype)
        text = self._text_or_zeros(text_states, latents.shape[0], latents)
        return self.decoder(latents, text)

    # -- the flows' side: scaled latents ---------------------------------------------------------
    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (from :meth:`encode` or pre-tokenised shards) -> the flows' unit-variance latents."""
        return latents * self.scale_factor

    def encode_for_flow(self, images: torch.Tensor, sample: bool = False,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> the flows' latents ``[B, K, C]`` (:meth:`encode`, then scaled)."""
        return self.scale_latents(self.encode(images, sample=sample, generator=generator))

    def decode_from_flow(self, latents: torch.Tensor, text_states: torch.Tensor | None = None) -> torch.Tensor:
        """The flows' latents ``[B, K, C]`` -> images ``[B, 3, H, W]`` clamped to [0, 1].

        ``text_states`` are the prompt's text states; they are passed to the decoder only if it
        :attr:`reads_text`, so a caller hands over what it has and never branches on the config.
        """
        return self._decode_clamped(latents / self.scale_factor, text_states)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, text_states: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0, 1] -> their reconstruction from the posterior mode, clamped to [0, 1]; ``text_states``
        as in :meth:`decode_from_flow` (None: the decoder's "no text" input)."""
        return self._decode_clamped(self.encode(images), text_states)

    def _decode_clamped(self, latents: torch.Tensor, text_states: torch.Tensor | None) -> torch.Tensor:
        return self.decode(latents, text_states if self.reads_text else None).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor, text_states: torch.Tensor | None = None,
                sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Training pass: (reconstruction ``[B, 3, H, W]`` unclamped, posterior)."""
        posterior = self.encode_posterior(images)
        latents = posterior.sample() if sample else posterior.mode()
        return self.decode(latents, text_states), posterior

    @staticmethod
    def postprocess(images: torch.Tensor) -> torch.Tensor:
        """Clamp decoder output to the valid [0, 1] range (as upstream does before evaluation)."""
        return images.clamp(0.0, 1.0)


def latent_scale_factor(latents: torch.Tensor) -> float:
    """``1 / std`` of a batch of unscaled latents: the ``scale_factor`` that gives the flow unit-variance
    image latents. Measure it once on a few thousand training images after training the tokenizer
    (the paper's 1.0143 is this number for the released FlowTiTok)."""
    std = latents.detach().float().std().item()
    if not std > 0:
        raise InvalidInputError(f"cannot derive a scale factor from latents with std {std}")
    return 1.0 / std


def latent_usage(means: torch.Tensor, variances: torch.Tensor, thresholds: tuple[int, ...] = (1, 10, 100)
                 ) -> dict[str, int]:
    """How many of the latent's numbers carry signal, from the posteriors of a batch of images.

    ``means`` and ``variances`` are the posteriors' ``[N, K, C]`` (or ``[N, K * C]``) mean and variance, in
    any one unit. A number's ratio is the variance of its mean across the ``N`` images over its mean
    posterior variance; ``snr_above_T`` counts the numbers whose ratio exceeds ``T``. A KL weight too strong
    for the data leaves most numbers at the prior (ratio well under 1): the decoder learns to ignore them and
    the encoder stops putting anything there.
    """
    if means.shape != variances.shape or means.dim() < 2 or means.shape[0] < 2:
        raise InvalidInputError(f"latent_usage needs [N >= 2, ...] means and variances of one shape, got "
                                f"{tuple(means.shape)} and {tuple(variances.shape)}")
    ratio = means.detach().float().flatten(1).var(0) / variances.detach().float().flatten(1).mean(0).clamp_min(1e-12)
    return {"numbers": int(ratio.numel()), **{f"snr_above_{t}": int((ratio > t).sum()) for t in thresholds}}


def tokenizer_param_counts(preset: str | TokenizerConfig) -> dict[str, int]:
    """Parameter counts ``{"encoder", "decoder", "total"}``, built on the meta device (no memory)."""
    config = named_preset(TOKENIZER_PRESETS, preset) if isinstance(preset, str) else preset
    with torch.device("meta"):
        model = ImageTokenizer(config)
    enc = count_parameters(model.encoder)
    dec = count_parameters(model.decoder)
    return {"encoder": enc, "decoder": dec, "total": enc + dec}
