"""Exponential moving average of a module's parameters, kept in fp32."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    def _decay_at(self, step: int) -> float:
        # Warm-up so the average is not dominated by the random init in short runs.
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = self._decay_at(step)
        state = module.state_dict()
        floats = [k for k, v in state.items() if v.is_floating_point()]
        # Two fused kernels for all tensors instead of two per tensor: small models are launch-bound.
        shadow = [self.shadow[k] for k in floats]
        current = [state[k].detach().float() for k in floats]
        torch._foreach_mul_(shadow, d)
        torch._foreach_add_(shadow, current, alpha=1 - d)
        for k, v in state.items():
            if not v.is_floating_point():
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the fp32 shadow in place (read straight onto the device: no other copy)."""
        missing = [k for k in self.shadow if k not in state]
        if missing:
            raise KeyError(f"EMA state has no '{missing[0]}' ({len(missing)} missing in all)")
        for k, v in self.shadow.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(f"EMA state '{k}' has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
            v.copy_(state[k])

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})
