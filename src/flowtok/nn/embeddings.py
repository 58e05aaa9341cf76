"""Fixed sin-cos position tables and the sinusoidal timestep embedder of DiT."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn


def sincos_1d(num_positions: int, dim: int) -> torch.Tensor:
    """[num_positions, dim] table: first half sin, second half cos (the MAE/DiT convention)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    pos = torch.arange(num_positions, dtype=torch.float64)
    out = pos[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] table: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be a multiple of 4, got {dim}")
    one = sincos_1d(grid, dim // 2)
    rows = one[:, None, :].expand(grid, grid, dim // 2)
    cols = one[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([cols, rows], dim=-1).reshape(grid * grid, dim)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (scaled by ``scale``) -> sinusoidal features -> MLP, as in DiT."""

    def __init__(self, hidden: int, freq_dim: int = 256, scale: float = 1000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.frequencies(t * self.scale, self.freq_dim)
        return self.mlp(freq.to(cast(nn.Linear, self.mlp[0]).weight.dtype))
