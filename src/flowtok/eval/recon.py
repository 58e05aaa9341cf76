"""Reconstruction metrics for the image tokenizer: PSNR, SSIM (and rFID via :mod:`.fid`).

Images are ``[B, 3, H, W]`` in [0, 1]; both metrics return one value per image so callers can
average, bin or report the spread. SSIM follows Wang et al. (2004): an 11x11 Gaussian window with
sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, valid (unpadded) filtering, averaged over the SSIM
map and the three colour channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise InvalidInputError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4:
        raise InvalidInputError(f"expected images [B, C, H, W], got shape {tuple(a.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, ``[B]`` float64; ``inf`` where the images are identical."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM, ``[B]`` float64; 1 for identical images."""
    _check_pair(a, b)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise InvalidInputError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(a.shape[-2:])}")
    x, y = a.double(), b.double()
    c = x.shape[1]
    win = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, x.dtype, x.device).expand(c, 1, -1, -1)

    def filt(t: torch.Tensor) -> torch.Tensor:  # depthwise, so channels never mix
        return F.conv2d(t, win, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    # Local (co)variances as E[xy] - E[x]E[y] under the window: Wang et al.'s estimator.
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return smap.flatten(1).mean(1)


PROTOCOL = {
    "psnr": "per-image 10 log10(1 / MSE) on [0, 1] RGB, averaged over images",
    "ssim": f"Wang et al. 2004, Gaussian {SSIM_WINDOW}x{SSIM_WINDOW} sigma {SSIM_SIGMA}, K=({SSIM_K1}, {SSIM_K2}), "
            "valid filtering, mean over map and RGB channels, averaged over images",
}
