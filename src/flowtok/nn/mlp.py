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
    """SiLU(x W1) * (x W3) -> W2. The default hidden width int(2/3 * 4 d) keeps the FLOPs of a 4d MLP.

    Such widths are rarely a multiple of 8 (2730 for the paper decoder's d = 1024), and a GEMM whose
    inner dimension is not falls back to slow kernels (on an H100, the paper decoder ran its MLP on
    2-element-aligned cuBLAS kernels). So the weights are held zero-padded to ``multiple_of``: the padded
    units compute SiLU(0) * 0 = 0, receive zero gradients and stay zero, so outputs are unchanged.
    Checkpoints keep the logical ``hidden`` shapes (``w12``: ``[2 * hidden, dim]``, first half gated;
    ``w3``: ``[dim, hidden]``): padding is added on load and removed in ``state_dict()``.
    """

    def __init__(self, dim: int, hidden: int | None = None, bias: bool = True, multiple_of: int = 64) -> None:
        super().__init__()
        hidden = hidden or int(2 * 4 * dim / 3)
        self.hidden = hidden
        self.padded = -(-hidden // multiple_of) * multiple_of
        self.w12 = nn.Linear(dim, 2 * self.padded, bias=bias)
        self.w3 = nn.Linear(self.padded, dim, bias=bias)
        if self.padded != hidden:
            self.zero_padding()
            self.register_state_dict_post_hook(SwiGLU._unpad_hook)
            self.register_load_state_dict_pre_hook(SwiGLU._pad_hook)

    @torch.no_grad()
    def zero_padding(self) -> None:
        """Zero the padded units; call it after re-initialising the Linears (a model's weight init)."""
        h, p = self.hidden, self.padded
        for t in (self.w12.weight, self.w12.bias):
            if t is not None:
                t[h:p].zero_()
                t[p + h:].zero_()
        self.w3.weight[:, h:].zero_()

    @property
    def padding_numel(self) -> int:
        """Parameters that exist only as zero padding (not in checkpoints, not counted)."""
        extra = self.padded - self.hidden
        return extra * (2 * self.w12.in_features + self.w3.out_features + (2 if self.w12.bias is not None else 0))

    @staticmethod
    def _pad_hook(module: SwiGLU, state_dict: dict, prefix: str, *args) -> None:
        """Checkpoint (logical shapes) -> held shapes: zero rows after each half of w12, zero columns on w3."""
        h, p = module.hidden, module.padded
        for key in (prefix + "w12.weight", prefix + "w12.bias"):
            v = state_dict.get(key)
            if v is not None and v.shape[0] == 2 * h:
                pad = v.new_zeros((p - h, *v.shape[1:]))
                state_dict[key] = torch.cat([v[:h], pad, v[h:], pad])
        v = state_dict.get(prefix + "w3.weight")
        if v is not None and v.shape[-1] == h:
            state_dict[prefix + "w3.weight"] = torch.cat([v, v.new_zeros(v.shape[0], p - h)], dim=1)

    @staticmethod
    def _unpad_hook(module: SwiGLU, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        """Held shapes -> checkpoint (logical) shapes."""
        h, p = module.hidden, module.padded
        for key in (prefix + "w12.weight", prefix + "w12.bias"):
            if key in state_dict:
                v = state_dict[key]
                state_dict[key] = torch.cat([v[:h], v[p:p + h]])
        if prefix + "w3.weight" in state_dict:
            state_dict[prefix + "w3.weight"] = state_dict[prefix + "w3.weight"][:, :h]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameter count of ``module`` as checkpoints hold it: SwiGLU's zero padding is not counted."""
    total = sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
    return total - sum(m.padding_numel for m in module.modules()
                       if isinstance(m, SwiGLU) and (m.w12.weight.requires_grad or not trainable_only))
