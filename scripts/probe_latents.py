"""How readable is each attribute of a shape from an image tokenizer's latent, on colour-shape pairs it never saw?

    python scripts/probe_latents.py                                   # the bundled model's tokenizer, v2 world
    python scripts/probe_latents.py --model runs/new-model --world v1 --out probe.json

Image to text has to name shapes in colour-shape pairs held out of training. If the tokenizer's latent keeps
shape apart from colour, a probe trained on seen pairs reads held-out ones too; if it does not, no flow trained
on seen pairs will. This script measures that directly, without any flow:

* single-object scenes of the chosen world, ``--n-train`` from the training split (seen pairs) and ``--n-test``
  from the held-out split (every one shows a held-out pair), encoded to the posterior mode (the latent the
  pipeline encodes an image to), flattened and standardised with the training set's statistics;
* two probes, both trained full-batch with AdamW for ``--epochs`` on the seen scenes: a linear classifier per
  attribute, and an MLP of one hidden layer shared by the four attributes' heads;
* reported: each probe's accuracy on colour, shape, size and region, on the seen scenes it trained on and on the
  held-out ones; and how many of the latent's K x C numbers carry signal on the seen scenes
  (:func:`flowtok.tokenizer.latent_usage`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from flowtok.config import atomic_write_text
from flowtok.pipelines import BUNDLED_MODEL
from flowtok.shapes import CELLS, COLORS, HELDOUT_COLOR_SHAPES, SHAPES, SIZES, shapes_batch
from flowtok.tokenizer import ImageTokenizer, latent_usage

ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES, "region": CELLS}


def tokenizer_folder(model: str | None) -> Path:
    """The tokenizer of a pipeline folder (default: the bundled model's), or a tokenizer folder itself."""
    path = BUNDLED_MODEL if model is None else Path(model)
    return path / "tokenizer" if (path / "tokenizer").is_dir() else path


@torch.no_grad()
def encode(tok: ImageTokenizer, world: str, split: str, n: int, seed: int, batch: int = 250,
           device: str = "cpu"):
    """Flattened mode latents [n, K * C] of ``n`` single-object scenes, their labels per attribute, the fraction
    showing a held-out pair, and the posterior variances [n, K * C] (raw units, as the latents)."""
    feats, variances, labels = [], [], {a: [] for a in ATTRIBUTES}
    held = 0
    for start in range(0, n, batch):
        images, _, scenes = shapes_batch(seed, start, min(batch, n - start), split=split, num_objects=1,
                                         size=tok.config.image_size, device=device, world=world)
        posterior = tok.encode_posterior(images)
        feats.append(posterior.mean.flatten(1).float())
        variances.append(posterior.var.flatten(1).float())
        for scene in scenes:
            obj = scene.objects[0]
            held += (obj.color, obj.shape) in HELDOUT_COLOR_SHAPES
            for attr, value in (("color", obj.color), ("shape", obj.shape), ("size", obj.size),
                                ("region", scene.layout)):
                labels[attr].append(ATTRIBUTES[attr].index(value))
    labels_t = {a: torch.tensor(v, device=device) for a, v in labels.items()}
    return torch.cat(feats), labels_t, held / n, torch.cat(variances)


class Probe(nn.Module):
    """One linear head per attribute on the features, or on a shared hidden layer (``hidden`` > 0)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.GELU()) if hidden else nn.Identity()
        width = hidden or dim
        self.heads = nn.ModuleDict({a: nn.Linear(width, len(v)) for a, v in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {a: head(h) for a, head in self.heads.items()}


def fit(x: torch.Tensor, y: dict[str, torch.Tensor], hidden: int, epochs: int, seed: int) -> Probe:
    torch.manual_seed(seed)
    probe = Probe(x.shape[1], hidden).to(x.device)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        out = probe(x)
        sum(nn.functional.cross_entropy(out[a], y[a]) for a in ATTRIBUTES).backward()
        opt.step()
    return probe


@torch.no_grad()
def accuracy(probe: Probe, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
    out = probe(x)
    return {a: round((out[a].argmax(1) == y[a]).float().mean().item(), 4) for a in ATTRIBUTES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="pipeline or tokenizer folder (default: the bundled model)")
    p.add_argument("--world", choices=["v1", "v2"], default="v2")
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--hidden", type=int, default=512, help="the MLP probe's hidden width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (results match up to float rounding)")
    p.add_argument("--out", default=None, help="results JSON (written atomically)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    folder = tokenizer_folder(args.model)
    tok = ImageTokenizer.from_pretrained(folder, device=args.device).eval()
    x_train, y_train, _, variances = encode(tok, args.world, "train", args.n_train, args.seed, device=args.device)
    x_test, y_test, held, _ = encode(tok, args.world, "test", args.n_test, args.seed + 1, device=args.device)
    usage = latent_usage(x_train, variances)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-4
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, hidden in (("linear", 0), ("mlp", args.hidden)):
        probe = fit(x_train, y_train, hidden, args.epochs, args.seed)
        results[name] = {"seen": accuracy(probe, x_train, y_train), "held_out": accuracy(probe, x_test, y_test)}
    print(f"{'probe':8s} {'split':9s} " + " ".join(f"{a:>7s}" for a in ATTRIBUTES))
    for name, by_split in results.items():
        for split, acc in by_split.items():
            print(f"{name:8s} {split:9s} " + " ".join(f"{100 * acc[a]:6.1f}%" for a in ATTRIBUTES))
    print(f"latent numbers with signal over posterior noise: {usage['snr_above_1']} of {usage['numbers']} "
          f"(> 10x: {usage['snr_above_10']}, > 100x: {usage['snr_above_100']})")
    if args.out:
        report = {"tokenizer": str(folder), "world": args.world, "n_train": args.n_train, "n_test": args.n_test,
                  "epochs": args.epochs, "hidden": args.hidden, "seed": args.seed,
                  "held_out_pair_fraction": held, "accuracy": results, "latent_usage": usage,
                  "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_text(Path(args.out), json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
