"""The next step's batch, drawn while the accelerator still runs this step's backward.

A step has one host sync: reading back whether its loss and gradients are finite. Drawn after that sync,
the next batch (loader wait, host-to-device copy, the posterior draw and the frozen text tower's launch)
would leave the GPU idle; drawn just before it, all of that overlaps the backward. The batch of step s
is still drawn right after ``manual_seed(seed, s)``, in a forked RNG whose state afterwards is handed to
step s, so every random draw of a step is the one an unprefetched (or resumed) run makes.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Prefetched:
    step: int
    batch: dict[str, Any]
    finite: torch.Tensor | None  # device bool: every float tensor of the batch is finite; None: none to check
    rng: tuple[torch.Tensor, torch.Tensor | None]  # CPU and device generator states just after the draw
    data_state: dict[str, Any] | None  # the source's position before the draw (what a checkpoint must hold)
    clean: bool = True  # ``finite``, as read back with the step's one host sync


def finite_flag(batch: dict[str, Any]) -> torch.Tensor | None:
    """A device bool, true when every floating-point tensor of ``batch`` is finite (no host sync)."""
    floats = [v for v in batch.values() if torch.is_tensor(v) and v.is_floating_point()]
    if not floats:
        return None
    return torch.stack([torch.isfinite(v).all() for v in floats]).all()


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def prefetch(step: int, device: torch.device, seed_step: Callable[[int], None],
             draw: Callable[[int], dict[str, Any]], data_state: Callable[[], dict[str, Any] | None]
             ) -> tuple[Prefetched, float]:
    """Draw step ``step``'s batch now, and the seconds the accelerator may have idled waiting for it.

    That wait is an upper bound: on CUDA it is the draw's wall time when the work queued before the draw
    had finished by the end of the draw (the GPU ran dry at some point during it), else 0; on a CPU every
    draw is waited for.
    """
    before = copy.deepcopy(data_state())
    queued = None
    if device.type == "cuda":
        queued = torch.cuda.Event()
        queued.record()
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        seed_step(step)
        batch = draw(step)
        rng = _rng_state(device)
    dt = time.perf_counter() - t0
    waited = dt if queued is None or queued.query() else 0.0
    return Prefetched(step, batch, finite_flag(batch), rng, before), waited
