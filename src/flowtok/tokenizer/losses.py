"""Training losses of the image tokenizer (the TA-TiTok recipe the paper follows).

Generator side: ``L = w_rec * MSE(x, x_hat) + w_kl * KL + w_p * perceptual + w_adv * (-E[D(x_hat)])``,
with KL summed over the K x C latent values and averaged over the batch (the TA-TiTok reduction, for
which the paper's KL weight 1e-6 is meant). Paper weights: reconstruction 1.0, perceptual 1.1,
adversarial 0.1 from step 200k with LeCam 0.001, KL 1e-6 (:data:`PAPER_LOSS`).

Two parts need care offline:

- Perceptual: LPIPS needs an ImageNet-trained VGG16, which cannot be downloaded here. We implement the
  LPIPS-VGG network (:class:`VGGPerceptualLoss`) and read its weights from a safetensors file the user
  provides (``perceptual_weights``). Without that file a perceptual weight > 0 logs one warning and
  the term is left out, or raises ConfigError when ``require_perceptual`` is set. (TA-TiTok's
  perceptual loss adds a ConvNeXt-S logit term to LPIPS; that part is not implemented.)
- Adversarial: :class:`PatchDiscriminator`, hinge loss, LeCam regulariser on EMAs of the mean logits.
  The trainer owns a second optimiser over ``loss.discriminator.parameters()`` and, once
  ``loss.adversarial_active(step)``, alternates ``loss(...)`` (generator) and
  ``loss.discriminator_loss(...)`` (discriminator).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import CheckpointError, ConfigError
from ..modeling import check_state_dict, load_safetensors
from .model import DiagonalGaussian

logger = logging.getLogger(__name__)


@dataclass
class TokenizerLossConfig:
    """Loss weights. Defaults: L2 + KL only (what works offline); see :data:`PAPER_LOSS`."""

    reconstruction: Literal["l2", "l1"] = "l2"
    reconstruction_weight: float = 1.0
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0
    perceptual_weights: str | None = None  # safetensors file of VGGPerceptualLoss weights
    require_perceptual: bool = False  # raise instead of warning when the perceptual weights are missing
    discriminator_weight: float = 0.0
    discriminator_start: int = 0  # step from which the discriminator trains and the generator sees it
    discriminator_channels: int = 64
    discriminator_layers: int = 3
    lecam_weight: float = 0.001
    lecam_ema_decay: float = 0.999

    def __post_init__(self) -> None:
        for name in ("reconstruction_weight", "kl_weight", "perceptual_weight", "discriminator_weight",
                     "lecam_weight", "discriminator_start"):
            if getattr(self, name) < 0:
                raise ConfigError(f"tokenizer loss {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.lecam_ema_decay < 1.0:
            raise ConfigError(f"tokenizer loss lecam_ema_decay must be in [0, 1), got {self.lecam_ema_decay}")
        if self.discriminator_channels <= 0 or self.discriminator_layers <= 0:
            raise ConfigError("tokenizer loss discriminator_channels and discriminator_layers must be positive")


PAPER_LOSS = TokenizerLossConfig(perceptual_weight=1.1, discriminator_weight=0.1, discriminator_start=200_000)


# -- perceptual ----------------------------------------------------------------------------------

# VGG16 "features" as torchvision numbers them, so its state-dict keys (features.N.*) load unchanged.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices (into features) of the ReLUs LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_LPIPS_TAPS = (3, 8, 15, 22, 29)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class VGGPerceptualLoss(nn.Module):
    """LPIPS (v0.1, VGG16 backbone) between images in [0, 1]; one value per image, ``[B]``.

    Weight file keys: ``features.N.weight/bias`` (torchvision's ``vgg16().features``) and
    ``lins.K.weight`` ``[1, C_K, 1, 1]`` (lpips' ``linK.model.1.weight``). The network is frozen.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, int(item), 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = int(item)
        self.features = nn.Sequential(*layers[: _LPIPS_TAPS[-1] + 1])
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS)
        # LPIPS' fixed input scaling (on [-1, 1] images), not learned, not saved.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> VGGPerceptualLoss:
        model = cls()
        state = load_safetensors(path)
        check_state_dict(model, state, str(path))
        model.load_state_dict(state)
        return model

    def train(self, mode: bool = True) -> VGGPerceptualLoss:
        return super().train(False)  # always frozen

    shift: torch.Tensor
    scale: torch.Tensor

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _LPIPS_TAPS:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = ((a * 2 - 1) - self.shift) / self.scale
        b = ((b * 2 - 1) - self.shift) / self.scale
        total = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b)):
            total = total + lin((fa - fb).pow(2)).mean(dim=(1, 2, 3))
        return total


# -- adversarial ---------------------------------------------------------------------------------

class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming NLayerDiscriminator): a logit per overlapping patch, ``[B, 1, h, w]``.

    GroupNorm replaces BatchNorm so that the logits of a sample do not depend on its batch (and no
    SyncBatchNorm is needed across GPUs). Takes images in [0, 1].
    """

    def __init__(self, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()

        def norm(c: int) -> nn.GroupNorm:
            return nn.GroupNorm(min(32, c // 4) or 1, c)

        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, num_layers + 1):
            nxt = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(ch, nxt, 4, stride=stride, padding=1, bias=False), norm(nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(real))] + E[relu(1 + D(fake))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def lecam_regularizer(real_mean: torch.Tensor, fake_mean: torch.Tensor,
                      ema_real_mean: torch.Tensor, ema_fake_mean: torch.Tensor) -> torch.Tensor:
    """LeCam (Tseng et al. 2021): keeps the mean logits near the EMA of the other side's."""
    return F.relu(real_mean - ema_fake_mean).pow(2).mean() + F.relu(ema_real_mean - fake_mean).pow(2).mean()


# -- the combined loss ---------------------------------------------------------------------------

class TokenizerLoss(nn.Module):
    """Generator loss via ``forward``; discriminator loss via :meth:`discriminator_loss`.

    A checkpoint of this module holds the discriminator and the LeCam EMAs (and the frozen VGG, when
    one is loaded); the trainer may save ``state_dict()`` as is.
    """

    ema_real_logits: torch.Tensor
    ema_fake_logits: torch.Tensor

    def __init__(self, config: TokenizerLossConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TokenizerLossConfig()
        self.perceptual: VGGPerceptualLoss | None = None
        if config.perceptual_weight > 0:
            self.perceptual = self._load_perceptual(config)
        self.discriminator: PatchDiscriminator | None = None
        if config.discriminator_weight > 0:
            self.discriminator = PatchDiscriminator(config.discriminator_channels, config.discriminator_layers)
        self.register_buffer("ema_real_logits", torch.zeros(()))
        self.register_buffer("ema_fake_logits", torch.zeros(()))

    @staticmethod
    def _load_perceptual(config: TokenizerLossConfig) -> VGGPerceptualLoss | None:
        path = config.perceptual_weights
        problem = None
        if not path:
            problem = "no perceptual_weights file was given"
        elif not Path(path).is_file():
            problem = f"perceptual_weights file not found: {path}"
        if problem is None:
            try:
                return VGGPerceptualLoss.from_file(path)  # type: ignore[arg-type]
            except CheckpointError as exc:
                problem = str(exc)
        if config.require_perceptual:
            raise ConfigError(f"perceptual loss required but {problem}")
        logger.warning(
            "perceptual loss disabled (perceptual_weight=%g): %s; LPIPS needs VGG16 weights that cannot "
            "be downloaded here, training continues with L2 + KL (+ GAN) only",
            config.perceptual_weight, problem,
        )
        return None

    def adversarial_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.config.discriminator_start

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor, posterior: DiagonalGaussian,
                step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images and reconstructions ``[B, 3, H, W]`` in [0, 1] -> (total, detached weighted parts)."""
        c = self.config
        x, y = images.float(), reconstructions.float()  # losses in float32 whatever the autocast
        rec = F.mse_loss(y, x) if c.reconstruction == "l2" else F.l1_loss(y, x)
        kl = posterior.kl().mean()
        parts = {"reconstruction": c.reconstruction_weight * rec, "kl": c.kl_weight * kl}
        if self.perceptual is not None:
            parts["perceptual"] = c.perceptual_weight * self.perceptual(x, y).mean()
        if self.adversarial_active(step):
            parts["adversarial"] = c.discriminator_weight * self.generator_adv_loss(y)
        total: torch.Tensor = functools.reduce(torch.add, parts.values())
        out = {k: v.detach() for k, v in parts.items()}
        out["kl_raw"] = kl.detach()
        out["total"] = total.detach()
        return total, out

    def generator_adv_loss(self, reconstructions: torch.Tensor) -> torch.Tensor:
        """-E[D(x_hat)]; gradients reach the reconstructions, never the discriminator's weights."""
        if self.discriminator is None:
            raise ConfigError("generator_adv_loss needs discriminator_weight > 0")
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        return -functional_call(self.discriminator, frozen, (reconstructions.float(),)).mean()

    def discriminator_loss(self, images: torch.Tensor, reconstructions: torch.Tensor
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge + LeCam loss of the discriminator (reconstructions are detached); updates the EMAs."""
        if self.discriminator is None:
            raise ConfigError("discriminator_loss needs discriminator_weight > 0")
        c = self.config
        logits_real = self.discriminator(images.float().detach())
        logits_fake = self.discriminator(reconstructions.float().detach())
        hinge = hinge_discriminator_loss(logits_real, logits_fake)
        real_mean, fake_mean = logits_real.mean(), logits_fake.mean()
        lecam = lecam_regularizer(real_mean, fake_mean, self.ema_real_logits, self.ema_fake_logits)
        total = hinge + c.lecam_weight * lecam
        with torch.no_grad():
            d = c.lecam_ema_decay
            self.ema_real_logits.mul_(d).add_((1 - d) * real_mean.detach())
            self.ema_fake_logits.mul_(d).add_((1 - d) * fake_mean.detach())
        parts = {
            "hinge": hinge.detach(), "lecam": (c.lecam_weight * lecam).detach(), "total": total.detach(),
            "logits_real": real_mean.detach(), "logits_fake": fake_mean.detach(),
        }
        return total, parts


def paper_loss_config(**overrides: object) -> TokenizerLossConfig:
    """The paper's weights with optional changes, e.g. ``paper_loss_config(perceptual_weights=path)``."""
    return replace(PAPER_LOSS, **overrides)  # type: ignore[arg-type]
