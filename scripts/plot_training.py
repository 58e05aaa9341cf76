"""Plot training runs from their metrics.jsonl: loss against step, and the flow loss binned by t.

    python scripts/plot_training.py --run "T2I flow=docs/training/t2i.metrics.jsonl" \\
        --run "I2T flow=docs/training/i2t.metrics.jsonl" --out docs/training

A resumed run appends to its metrics.jsonl and repeats the steps after its last checkpoint; the last
record of each step is kept. Writes loss_curves.png (every run's ``loss``) and loss_by_t.png (the
``flow_t*`` bins of the flow runs at their last step).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowtok.eval import plot_curve


def read_metrics(path: str | Path) -> list[dict]:
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "step" in rec and "loss" in rec:
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=PATH to a metrics.jsonl (repeatable)")
    ap.add_argument("--out", default="docs/training")
    args = ap.parse_args()
    runs = {}
    for spec in args.run:
        label, _, path = spec.partition("=")
        runs[label] = read_metrics(path)
    out = Path(args.out)
    # One curve per run on a shared axis of fraction of the run's steps would hide the step counts, so
    # each run is drawn against its own steps, one figure with all runs (log-scaled loss).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, recs in runs.items():
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("flowtok-shapes training runs")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)

    bins: dict[str, list[float]] = {}
    edges: list[str] = []
    for label, recs in runs.items():
        keys = sorted(k for k in recs[-1] if k.startswith("flow_t"))
        if keys:
            edges = [k.removeprefix("flow_t") for k in keys]
            bins[label] = [recs[-1][k] for k in keys]
    if bins:
        mids = [sum(float(x) for x in e.split("-")) / 2 for e in edges]
        plot_curve(mids, bins, out / "loss_by_t.png", "t (bin centre)", "flow loss at the last step",
                   title="flow loss by t")
    for label, recs in runs.items():
        print(f"{label}: {len(recs)} records, steps {recs[0]['step']}..{recs[-1]['step']}, "
              f"final loss {recs[-1]['loss']:.4g}")


if __name__ == "__main__":
    main()
