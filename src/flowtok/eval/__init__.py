"""Evaluation: FID/KID (:mod:`.fid`), caption metrics (:mod:`.captions`) and PSNR/SSIM (:mod:`.recon`);
``flowtok eval`` lives in :mod:`.cli`. The shapes-world benchmarks built on them are
:mod:`flowtok.shapes.benchmark`.

Submodules import their heavy dependencies (scipy, pycocoevalcap, the Inception file) lazily, so
importing this package is cheap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence


def plot_curve(xs: Sequence[float], ys_by_label: Mapping[str, Sequence[float]], path: str | os.PathLike,
               xlabel: str, ylabel: str, title: str | None = None, logx: bool = False) -> None:
    """One line per label over ``xs``, saved to ``path`` (PNG or SVG) for docs/results.md."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    from ..errors import InvalidInputError

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    try:
        for label, ys in ys_by_label.items():
            if len(ys) != len(xs):
                raise InvalidInputError(f"curve {label!r} has {len(ys)} values for {len(xs)} x positions")
            ax.plot(list(xs), list(ys), marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log")
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(ys_by_label) > 1:
            ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
