"""A training run: one YAML file (stage, data, train, model sections) plus ``key=value`` overrides.

The resolved config is written beside the run as ``config.yaml``, so every run can be reproduced.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import apply_overrides, from_dict, load_yaml, to_dict
from ..errors import ConfigError
from .data import DataConfig
from .trainer import TrainConfig, Trainer


@dataclass
class RunConfig:
    stage: str = ""
    run_dir: str = "runs/run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # numpy seeds must be >= 0 and the per-step torch seed (seed * 1_000_003 + step) * 64 + rank must fit 64 bits.
        if not 0 <= self.seed < 2**31:
            raise ConfigError(f"seed must be an integer from 0 to 2**31 - 1, got {self.seed}")


def build_run(config: str | Path | dict[str, Any], overrides: list[str] | None = None,
              device: str | None = None, resume: str | None = None) -> Trainer:
    """The :class:`Trainer` of a config. With ``resume`` naming a checkpoint (or "latest" and the run has
    one), the stage is built directly on its accelerator: its initial weights are about to be replaced by
    the checkpoint's, and initialising a FlowTok-XL on the host costs seconds to tens of seconds of the
    restart. A fresh run is always initialised on the host, so its weights do not depend on the device."""
    from . import checkpoint as ckpt
    from . import distributed as ranks
    from .stages import STAGES

    data = load_yaml(config) if not isinstance(config, dict) else dict(config)
    data = apply_overrides(data, overrides or [])
    run = from_dict(RunConfig, data)
    if run.stage not in STAGES:
        raise ConfigError(f"unknown stage '{run.stage}' (choose from {', '.join(STAGES)})")
    stage_cls, stage_cfg_cls = STAGES[run.stage]
    stage_cfg = from_dict(stage_cfg_cls, run.model, "model")
    # The initial weights come from ``seed`` too: without this two runs of one config start apart, and a
    # resumed run could only ever match the run it resumed, never a fresh run of the same config.
    build_on = torch.device("cpu")
    if resume and (resume != "latest" or ckpt.list_checkpoints(Path(run.run_dir) / "checkpoints")):
        build_on = ranks.process_device(device, ranks.dist_info()[2])
    on_device = build_on if build_on.type != "cpu" else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[build_on] if build_on.type == "cuda" else []), on_device:
        torch.manual_seed(run.seed)
        try:
            stage = stage_cls(stage_cfg, run.data, run.seed)
        except (RuntimeError, MemoryError, OverflowError, TypeError) as exc:
            # Sizes that pass every per-field check can still be absurd (a 10**20-token latent, a
            # terabyte of weights): torch's allocator message, on one line, beats its traceback.
            if isinstance(exc, TypeError) and "Overflow" not in str(exc):
                raise
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"the '{run.stage}' model cannot be built with these sizes: {first}") from None
    resolved = to_dict(run)
    resolved["model"] = to_dict(stage_cfg)
    return Trainer(stage, run.train, run.run_dir, seed=run.seed, device=device, resolved_config=resolved)
