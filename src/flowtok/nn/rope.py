"""2D rotary position embedding over a square grid of patch tokens.

The FlowTiTok tokenizer gives positions to its patch tokens by RoPE alone (they carry no absolute
position embedding) while its latent and text tokens keep learned absolute embeddings. The patch
tokens come first in every tokenizer sequence, so :class:`RotaryEmbedding2D` rotates the first
``grid**2`` tokens of q and k and passes the rest through unchanged.

Layout (the one of the released FlowTiTok weights, so that a converted checkpoint sees the same
attention scores): a head of width ``d`` is split in half; the first ``d/2`` channels rotate with the
patch's row index, the last ``d/2`` with its column index. Inside each half, channels are rotated in
adjacent pairs ``(x[2i], x[2i+1])`` at frequency ``theta ** (-4i / d)``, ``i < d/4``. Tokens are
numbered row-major (``row * grid + col``), the order a strided patch conv flattens to.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): a quarter turn of each adjacent pair."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rope_2d_tables(head_dim: int, grid: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each ``[grid*grid, head_dim]`` float32, for :class:`RotaryEmbedding2D`."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head width divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim)
    # Positions are computed as arange(g) / g * g (the "fine / pretrained length" rescale of the
    # upstream table with both lengths equal) so that the tables match the released ones bit for bit.
    pos = torch.arange(grid, dtype=torch.float32) / grid * grid
    angles = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # [g, head_dim/2]
    rows = angles[:, None, :].expand(grid, grid, axis_dim)
    cols = angles[None, :, :].expand(grid, grid, axis_dim)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return table.cos(), table.sin()


class RotaryEmbedding2D(nn.Module):
    """Rotates the first ``grid**2`` tokens of q and k (``[B, H, N, head_dim]``); others pass through.

    Callable as ``rope(q, k) -> (q, k)``, the hook :class:`flowtok.nn.Attention` takes. The tables are
    non-persistent buffers: they are derived from the config, never learned, so they are not saved.
    """

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.grid = grid
        self.num_tokens = grid * grid
        cos, sin = rope_2d_tables(head_dim, grid, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    cos: torch.Tensor
    sin: torch.Tensor

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_tokens
        if x.shape[-2] < n or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"RoPE expects at least {n} tokens of width {self.head_dim}, got {tuple(x.shape[-2:])}"
            )
        grid_part, rest = x[..., :n, :], x[..., n:, :]
        # The rotation runs in float32 (the tables' precision) and casts back, so bf16 q/k keep their dtype.
        g = grid_part.float()
        rotated = (g * self.cos + rotate_pairs(g) * self.sin).to(x.dtype)
        return torch.cat([rotated, rest], dim=-2) if rest.shape[-2] else rotated

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotate(q), self.rotate(k)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, grid={self.grid}"
