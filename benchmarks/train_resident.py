"""``flowtok train`` with its data resident on the device: the streaming run's same-work baseline.

The run is built from the same config as the streaming run (same stage, batch, compile settings, frozen text
tower and jointly trained projector in the step); only its source is replaced, after set-up, by one that
hands back the first batch it read (already on the device) at every step. The stage still draws the image
posterior and runs the text tower on it each step, so the two runs do the same work, and the streaming
run's samples/s over this one's is what reading from disk costs.

    python benchmarks/train_resident.py RUN.yaml [--device cuda]   # metrics in RUN's run_dir/metrics.jsonl
"""

from __future__ import annotations

import argparse
from typing import Any

from flowtok.training.run import build_run


class ResidentSource:
    """The first batch of ``source``, served for every step (``len`` and attributes of the original)."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.batch: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def __len__(self) -> int:
        return len(self.source)

    def get(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        if self.batch is None:
            self.batch = self.source.get(step, local_batch, rank, world)
        return dict(self.batch)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    trainer = build_run(args.config, device=args.device)
    stage, setup = trainer.stage, trainer.stage.setup

    def setup_resident(device: Any) -> None:
        setup(device)
        stage.source = ResidentSource(stage.source)

    stage.setup = setup_resident  # type: ignore[method-assign]
    trainer.fit()


if __name__ == "__main__":
    main()
