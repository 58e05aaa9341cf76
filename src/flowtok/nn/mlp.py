"""Feed-forward blocks: the GELU MLP of DiT and the SwiGLU of the FlowTok tokenizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """Linear -> GELU (tanh approximation, as DiT) -> Linear."""

    def __init__(self, dim: int, hidden: int, approximate: str = "tanh") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """SiLU(x W1) * (x W3) -> W2. The default hidden width int(2/3 * 4 d) keeps the FLOPs of a 4d MLP."""

    def __init__(self, dim: int, hidden: int | None = None, bias: bool = True) -> None:
        super().__init__()
        hidden = hidden or int(2 * 4 * dim / 3)
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)
