"""The adaLN-Zero transformer block and final layer of DiT (Peebles & Xie, 2023).

A condition vector ``c [B, D]`` (timestep embedding plus whatever else the model adds) is turned by
``SiLU -> Linear`` into per-channel shift / scale / gate vectors that modulate parameter-free
LayerNorms. The owning model zero-initialises the modulation Linears, so every block starts as the
identity (all gates 0) and the final layer outputs exactly 0: "adaLN-Zero".

Layout facts kept identical to DiT and to the FlowTok release, so that their weights load by name:
the modulation Linear is index 1 of ``adaLN_modulation`` (index 0 is the SiLU); its output splits,
in this order, into shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp (block) and
shift, scale (final layer); LayerNorms have eps 1e-6 and no affine parameters; attention has a
fused qkv Linear with bias; the MLP is GELU-tanh.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from .attention import Attention
from .mlp import Mlp


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] * (1 + scale [B, D]) + shift [B, D]; ``1 + scale`` makes scale = 0 the identity."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """Pre-norm self-attention + MLP, each modulated and gated by the condition."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D] tokens; c: [B, D] condition."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

    def zero_init_modulation(self) -> None:
        """Start as the identity map: every shift, scale and gate is 0."""
        linear = cast(nn.Linear, self.adaLN_modulation[1])
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)


class FinalLayer(nn.Module):
    """Modulated LayerNorm then a Linear to ``out_channels`` per token."""

    def __init__(self, dim: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))

    def zero_init(self) -> None:
        """Zero modulation and output: the network predicts exactly 0 until it has learned something."""
        for layer in (cast(nn.Linear, self.adaLN_modulation[1]), self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
