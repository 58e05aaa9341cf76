"""The flow-matching objective, kept apart from the network (as minRF's ``rf.py``).

Source x0 sits at t = 0 and target x1 at t = 1. For text-to-image x0 is the text latent and x1 the
image latent; for image-to-text the roles swap. The path and its velocity are those of the FlowTok
release (diffusion/flow_matching.py, ``psi`` / ``Dt_psi`` with sigma_max = 1)::

    x_t = (1 - (1 - s) t) x0 + t x1        v = x1 - (1 - s) x0        s = sigma_min = 1e-5

and the loss is the per-sample mean squared error of the predicted velocity, averaged over the batch.
The gradient also flows through x0 (the text latent comes from a projector trained jointly), as upstream.

Classifier-free guidance follows CrossFlow: there is no empty prompt to drop to, so a fraction of the
batch gets ``null_indicator = 1`` and, among those flagged samples only, the targets are rolled by
one place, so the network learns a velocity from a text latent to an *unrelated* image. With fewer
than two flagged samples a roll would pair a sample with itself, so (as upstream) none is flagged.
Everything here runs on the device without host synchronisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import ConfigError, InvalidInputError

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _rand(shape: tuple[int, ...], device: torch.device | str | None, generator: torch.Generator | None,
          normal: bool = False) -> torch.Tensor:
    # A generator lives on one device; draw there and move, so a CPU generator can seed CUDA training.
    where = generator.device if generator is not None else device
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, device=where).to(device)


@dataclass
class FlowObjectiveConfig:
    """The objective's settings (a stage's ``model.objective`` in YAML)."""

    sigma_min: float = 1e-5
    t_sampler: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    null_prob: float = 0.1  # share of the batch flagged for classifier-free guidance

    def __post_init__(self) -> None:
        if self.t_sampler not in ("logit_normal", "uniform"):
            raise ConfigError(f"t_sampler must be 'logit_normal' or 'uniform', got {self.t_sampler!r}")
        if not 0.0 <= self.null_prob <= 1.0:
            raise ConfigError(f"null_prob must be in [0, 1], got {self.null_prob}")
        if not 0.0 <= self.sigma_min < 1.0:
            raise ConfigError(f"sigma_min must be in [0, 1), got {self.sigma_min}")
        if self.logit_std <= 0:
            raise ConfigError(f"logit_std must be positive, got {self.logit_std}")


class FlowObjective:
    """Path, time sampler, CFG null indicator and loss of FlowTok's flow matching."""

    def __init__(self, sigma_min: float = 1e-5, t_sampler: Literal["logit_normal", "uniform"] = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0, null_prob: float = 0.1) -> None:
        self.config = FlowObjectiveConfig(sigma_min, t_sampler, logit_mean, logit_std, null_prob)
        self.sigma_min = sigma_min
        self.t_sampler = t_sampler
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.null_prob = null_prob

    @classmethod
    def from_config(cls, config: FlowObjectiveConfig) -> FlowObjective:
        return cls(**dataclasses.asdict(config))

    def __repr__(self) -> str:
        return (f"FlowObjective(sigma_min={self.sigma_min}, t_sampler={self.t_sampler!r}, "
                f"logit_mean={self.logit_mean}, logit_std={self.logit_std}, null_prob={self.null_prob})")

    def sample_t(self, batch_size: int, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """[B] float32 times in (0, 1): logit-normal (SD3's choice, upstream's) or uniform."""
        if self.t_sampler == "uniform":
            return _rand((batch_size,), device, generator)
        z = _rand((batch_size,), device, generator, normal=True)
        return torch.sigmoid(z * self.logit_std + self.logit_mean)

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t on the path from x0 (t = 0) to x1 (t = 1); t: [B]."""
        t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1 - (1 - self.sigma_min) * t) * x0 + t * x1

    def target_velocity(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """d x_t / dt, constant along the path."""
        return x1 - (1 - self.sigma_min) * x0

    def make_null_indicator(self, batch_size: int, generator: torch.Generator | None = None,
                            device: torch.device | str | None = None) -> torch.Tensor:
        """[B] bool, each sample flagged null with probability ``null_prob``; all False if fewer than 2."""
        null = _rand((batch_size,), device, generator) < self.null_prob
        return null & (null.sum() > 1)

    @staticmethod
    def roll_null_targets(x1: torch.Tensor, null_indicator: torch.Tensor) -> torch.Tensor:
        """x1 with each flagged sample's target replaced by the next flagged sample's (cyclically).

        Unflagged samples keep their own target. Built from a gather, without boolean indexing, so no
        host sync: sort the flagged indices to the front (stable), shift each of the first n by one
        modulo n, and scatter back.
        """
        null = null_indicator.bool()
        b = null.shape[0]
        order = torch.argsort((~null).to(torch.int8), stable=True)  # flagged first, in batch order
        n = null.sum()
        pos = torch.arange(b, device=null.device)
        nxt = torch.where(pos < n, torch.remainder(pos + 1, n.clamp(min=1)), pos)
        src = torch.empty_like(order)
        src[order] = order[nxt]
        return x1.index_select(0, src)

    def loss(self, model: VelocityModel, x0: torch.Tensor, x1: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Flow-matching loss of ``model(x_t, t, null_indicator)`` on one batch.

        Returns ``(loss, info)``; ``info`` holds detached tensors: ``per_sample_loss`` [B], ``t`` [B],
        ``null_indicator`` [B] (for :func:`binned_losses` and logging, which decide when to sync).
        """
        if x0.shape != x1.shape:
            raise InvalidInputError(f"source latent shape {tuple(x0.shape)} differs from target {tuple(x1.shape)}")
        b = x0.shape[0]
        t = self.sample_t(b, x0.device, generator)
        null = self.make_null_indicator(b, generator, x0.device)
        x1 = self.roll_null_targets(x1, null)
        x_t = self.interpolate(x0, x1, t)
        target = self.target_velocity(x0, x1)
        pred = model(x_t, t, null)
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        loss = per_sample.mean()
        info = {"per_sample_loss": per_sample.detach(), "t": t, "null_indicator": null}
        return loss, info


def _bin_sums(t: torch.Tensor, per_sample_loss: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = (t.detach().float() * bins).long().clamp_(0, bins - 1)
    sums = torch.zeros(bins, device=t.device).index_add_(0, idx, per_sample_loss.detach().float())
    counts = torch.zeros(bins, device=t.device).index_add_(0, idx, torch.ones_like(sums[idx]))
    return sums, counts


def _bin_name(i: int, bins: int) -> str:
    return f"t{i / bins:.2f}-{(i + 1) / bins:.2f}"


def binned_losses(t: torch.Tensor, per_sample_loss: torch.Tensor, bins: int = 4) -> dict[str, float]:
    """Mean loss per equal-width bin of t, e.g. ``{"t0.00-0.25": 0.41, ...}``; empty bins are left out.

    A cheap diagnostic: the flow is hardest near the middle of the path and easiest at the ends.
    Syncs with the host once (it exists to produce logging numbers).
    """
    sums, counts = _bin_sums(t, per_sample_loss, bins)
    out = {}
    for i, (s, c) in enumerate(zip(sums.tolist(), counts.tolist())):
        if c > 0:
            out[_bin_name(i, bins)] = s / c
    return out


def binned_loss_tensors(t: torch.Tensor, per_sample_loss: torch.Tensor, bins: int = 4) -> dict[str, torch.Tensor]:
    """:func:`binned_losses` without the host sync: 0-d tensors on the device (0 for an empty bin),
    for a training loop that reads its metrics only at log steps."""
    sums, counts = _bin_sums(t, per_sample_loss, bins)
    means = sums / counts.clamp_min(1)
    return {_bin_name(i, bins): means[i] for i in range(bins)}
