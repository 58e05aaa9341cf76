"""The variational text projector: frozen text states [B, L, D] -> text latent z [B, L, C].

Architecture-compatible with upstream FlowTok (commit d4d43c5, ``libs/model/trans_autoencoder.py``
``FlowEncoder`` used as ``FlowTok.context_encoder`` in ``libs/model/flowtok_t2i.py``; the losses in
``diffusion/flow_matching.py``). Facts matched:

* 6 post-LN encoder layers, width 768, 8 heads, FFN 1024 with ReLU, dropout 0.1 in three places
  (attention probabilities, after attention, inside the FFN between ReLU and the second Linear) plus
  one on the FFN residual branch: ``t = LN1(x + drop(attn(x)))``, ``y = LN2(t + drop(ffn(t)))``.
* Separate q / k / v / out Linears, all with bias; no positional embedding (the text states carry
  position already); **no attention mask**: upstream's ``FlowEncoder.forward`` takes none, so all 77
  positions (pads included) attend to each other. ``ProjectorConfig.use_mask`` turns a key-padding
  mask on for experiments; it is off by default.
* Upstream's LayerNorm is its own: ``g * (x - mean) / (std + eps) + b`` with the *unbiased* std and
  eps = 1e-5 outside the square root. :class:`StdLayerNorm` reproduces it so converted weights give
  the same numbers.
* Then ``Linear(width, 2C)`` with no final norm (``last_norm=False``); the first C channels are the
  mean, the last C the log-variance (``torch.chunk``), no clamping; ``z = mean + exp(logvar / 2) * eps``.
* Alignment target: ``Linear(D, 512) -> SiLU -> Linear(512, 512) -> SiLU -> Linear(512, C)`` applied
  per token to the *raw text states* (D = the encoder width, not the projector width).
* Contrastive loss: both z [B, L, C] and the target are flattened to [B, L*C] (no pooling, no mask),
  L2-normalised, ``logits = exp(t) * z_n @ target_n.T`` with a learnable ``t`` initialised to
  log(1/0.07) and never clamped; loss = (CE(logits, arange) + CE(logits.T, arange)) / 2. Upstream
  feeds it the *sampled* z (the same z that starts the flow).
* KL: upstream code ``-0.5 * sum(1 + logvar - (0.3 * mu)^6 - exp(logvar))`` summed over every element,
  batch included (weight 0.01 in its configs); the paper reports the standard KL (weight 1e-4).
  ``kl_form`` picks the form ("standard" default, "crossflow" = upstream code) and ``kl_reduction`` the
  reduction ("sum" = upstream, "batch_mean" = per-sample sum averaged over the batch, "mean").

When ``text_dim != width`` an ``input_proj`` Linear comes first (upstream has none: D = width = 768).

Upstream key -> flowtok key (see :func:`convert_upstream_state_dict`)::

    context_encoder.layers.{i}.attn.W_Q / W_K / W_V / W_O   layers.{i}.attn.q_proj / k_proj / v_proj / out_proj
    context_encoder.layers.{i}.feed_forward.ffn_1 / ffn_2   layers.{i}.ffn.fc1 / fc2
    context_encoder.layers.{i}.norm1.g / .b (norm2 alike)   layers.{i}.norm1.weight / .bias
    context_encoder.linear                                  to_moments
    context_projector.{0,2,4}                               align_mlp.{0,2,4}
    t2t_temperature                                         logit_scale
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InvalidInputError
from ..modeling import PretrainedMixin


@dataclass
class ProjectorConfig:
    text_dim: int = 768           # width of the frozen encoder's states (768 CLIP-L, 384 MiniLM)
    width: int = 768
    depth: int = 6
    num_heads: int = 8
    ffn_dim: int = 1024
    dropout: float = 0.1
    latent_channels: int = 16     # C of the 77 x C text latent
    align_hidden: int = 512
    kl_form: Literal["standard", "crossflow"] = "standard"
    kl_reduction: Literal["sum", "batch_mean", "mean"] = "sum"
    use_mask: bool = False        # upstream attends over all positions
    logit_scale_init: float = math.log(1 / 0.07)
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("text_dim", "width", "depth", "num_heads", "ffn_dim", "latent_channels", "align_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"projector.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ConfigError(f"projector.width {self.width} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"projector.dropout must be in [0, 1), got {self.dropout}")


PROJECTOR_PRESETS: dict[str, ProjectorConfig] = {
    "paper": ProjectorConfig(),
    "shapes": ProjectorConfig(text_dim=384, width=256, depth=4, num_heads=4, ffn_dim=512, align_hidden=256),
    "tiny": ProjectorConfig(text_dim=384, width=64, depth=2, num_heads=4, ffn_dim=128, align_hidden=64),
}


class ProjectorOutput(NamedTuple):
    z: torch.Tensor        # [B, L, C], sampled (or the mean when sample=False)
    mean: torch.Tensor     # [B, L, C]
    logvar: torch.Tensor   # [B, L, C]


class StdLayerNorm(nn.Module):
    """Upstream's LayerNorm: (x - mean) / (unbiased std + eps), then affine. Not torch's LayerNorm."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        return self.weight * (x - mean) / (x.std(-1, keepdim=True) + self.eps) + self.bias


class ProjectorAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class ProjectorFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(self.fc1(x))))


class ProjectorLayer(nn.Module):
    """Post-LN: x -> LN1(x + drop(attn(x))) -> LN2(. + drop(ffn(.)))."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.attn = ProjectorAttention(cfg.width, cfg.num_heads, cfg.dropout)
        self.ffn = ProjectorFFN(cfg.width, cfg.ffn_dim, cfg.dropout)
        self.norm1 = StdLayerNorm(cfg.width, cfg.norm_eps)
        self.norm2 = StdLayerNorm(cfg.width, cfg.norm_eps)
        self.drop1 = nn.Dropout(cfg.dropout)
        self.drop2 = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.drop1(self.attn(x, key_mask)))
        return self.norm2(x + self.drop2(self.ffn(x)))


class TextProjector(nn.Module, PretrainedMixin):
    """Frozen text states -> reparameterised text latent, plus its KL and alignment losses."""

    config_class = ProjectorConfig
    model_type = "flowtok_text_projector"

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        # Absent when the widths agree, so the paper preset has exactly upstream's keys.
        self.input_proj = nn.Linear(c.text_dim, c.width) if c.text_dim != c.width else None
        self.layers = nn.ModuleList(ProjectorLayer(c) for _ in range(c.depth))
        self.to_moments = nn.Linear(c.width, 2 * c.latent_channels)
        self.align_mlp = nn.Sequential(
            nn.Linear(c.text_dim, c.align_hidden), nn.SiLU(),
            nn.Linear(c.align_hidden, c.align_hidden), nn.SiLU(),
            nn.Linear(c.align_hidden, c.latent_channels),
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))

    def _check(self, states: torch.Tensor) -> None:
        if states.dim() != 3 or states.shape[-1] != self.config.text_dim:
            raise InvalidInputError(
                f"text states must be [B, L, {self.config.text_dim}], got {list(states.shape)}"
            )

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None, sample: bool = True,
                generator: torch.Generator | None = None) -> ProjectorOutput:
        """states [B, L, text_dim] -> ProjectorOutput(z, mean, logvar), each [B, L, C].

        ``mask`` is used only when ``config.use_mask``; ``sample=False`` returns z = mean.
        """
        self._check(states)
        x = states.to(self.to_moments.weight.dtype)
        if self.input_proj is not None:
            x = self.input_proj(x)
        key_mask = mask.bool() if (mask is not None and self.config.use_mask) else None
        for layer in self.layers:
            x = layer(x, key_mask)
        mean, logvar = self.to_moments(x).chunk(2, dim=-1)
        if not sample:
            return ProjectorOutput(mean, mean, logvar)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return ProjectorOutput(mean + torch.exp(0.5 * logvar) * eps, mean, logvar)

    def kl_loss(self, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL term in the configured form and reduction, computed in float32."""
        mean, logvar = mean.float(), logvar.float()
        if self.config.kl_form == "standard":
            per = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
        else:
            per = -0.5 * (1.0 + logvar - (0.3 * mean).pow(6) - logvar.exp())
        if self.config.kl_reduction == "sum":
            return per.sum()
        if self.config.kl_reduction == "batch_mean":
            return per.flatten(1).sum(1).mean()
        return per.mean()

    def align_target(self, states: torch.Tensor) -> torch.Tensor:
        """The per-token MLP target [B, L, C] computed from the raw text states."""
        self._check(states)
        return self.align_mlp(states.to(self.to_moments.weight.dtype))

    def align_loss(self, z: torch.Tensor, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Symmetric InfoNCE over the batch between flattened, L2-normalised z and the MLP target."""
        target = self.align_target(states)
        if mask is not None and self.config.use_mask:
            keep = mask.to(z.dtype)[..., None]
            z, target = z * keep, target * keep
        zn = F.normalize(z.flatten(1).float(), dim=-1)
        tn = F.normalize(target.flatten(1).float(), dim=-1)
        logits = self.logit_scale.float().exp() * zn @ tn.T
        labels = torch.arange(z.shape[0], device=z.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


_UPSTREAM_RULES = [
    (r"^context_encoder\.layers\.(\d+)\.attn\.W_Q\.", r"layers.\1.attn.q_proj."),
    (r"^context_encoder\.layers\.(\d+)\.attn\.W_K\.", r"layers.\1.attn.k_proj."),
    (r"^context_encoder\.layers\.(\d+)\.attn\.W_V\.", r"layers.\1.attn.v_proj."),
    (r"^context_encoder\.layers\.(\d+)\.attn\.W_O\.", r"layers.\1.attn.out_proj."),
    (r"^context_encoder\.layers\.(\d+)\.feed_forward\.ffn_1\.", r"layers.\1.ffn.fc1."),
    (r"^context_encoder\.layers\.(\d+)\.feed_forward\.ffn_2\.", r"layers.\1.ffn.fc2."),
    (r"^context_encoder\.layers\.(\d+)\.(norm[12])\.g$", r"layers.\1.\2.weight"),
    (r"^context_encoder\.layers\.(\d+)\.(norm[12])\.b$", r"layers.\1.\2.bias"),
    (r"^context_encoder\.linear\.", "to_moments."),
    (r"^context_projector\.", "align_mlp."),
    (r"^t2t_temperature$", "logit_scale"),
]


def upstream_key(key: str) -> str | None:
    """The flowtok name of an upstream FlowTok text-side key, or None for any other key."""
    for pattern, repl in _UPSTREAM_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def convert_upstream_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pick the text-side tensors out of an upstream FlowTok ``nnet`` state dict and rename them.

    A ``module.`` prefix (DDP) is dropped first; every non-text key (the DiT) is ignored.
    """
    out = {}
    for key, value in state.items():
        new = upstream_key(key.removeprefix("module."))
        if new is not None:
            out[new] = value
    return out
