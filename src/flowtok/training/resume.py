"""``--resume``: choose the checkpoint, restore the run from it, and say where the time went.

A FlowTok-XL run's checkpoint is about 11 GB (fp32 weights, EMA, AdamW moments). The checkpoint is read
once (rank 0 verifies and reads the one it chooses; a single process does not read it again), the weights go
straight onto the device, and the two parts the first forward does not need, the optimizer state
(memory-mapped) and the EMA, are restored on a background thread while the first step runs (from its
batch on: the forward, where the model compiles, and the backward);
the trainer waits for them right before the first optimizer step. One INFO line after the first step gives
the breakdown (see :meth:`Restore.report`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError
from ..modeling import check_state_dict
from . import checkpoint as ckpt
from . import distributed as ranks

if TYPE_CHECKING:
    from .ema import EMA
    from .trainer import Trainer

log = logging.getLogger(__name__)


def process_age() -> float | None:
    """Seconds since this process started (Linux), None elsewhere."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Restore:
    """What a resume restored, the background restore of the optimizer and EMA, and the timings."""

    def __init__(self, found: ckpt.Checkpoint, setup_s: float | None, opt: torch.optim.Optimizer,
                 ema: EMA | None) -> None:
        self.found, self.opt, self.ema = found, opt, ema
        self.step = found.step
        self.timings: dict[str, float] = dict(found.timings)
        self.setup_s = setup_s  # process start to the start of the resume (imports, model building)
        self._thread: threading.Thread | None = None
        self.started = False
        self._error: BaseException | None = None

    def start(self) -> None:
        """Restore the optimizer state and EMA on a background thread. The trainer calls this once the first
        batch is fetched: loader workers are forked then, and a fork with a thread running may deadlock."""
        if self.started:
            return
        self.started = True
        opt, ema = self.opt, self.ema

        def work() -> None:
            try:
                t0 = time.perf_counter()
                opt.load_state_dict(self.found.optimizer)  # the mapped moments, copied to the parameters' device
                self.found.optimizer = {}  # the mapping is not needed any more
                self.timings["optimizer_restore_s"] = (t1 := time.perf_counter()) - t0
                if ema is not None:
                    ema.load_state_dict(self.found.ema)
                    self.found._ema = None
                    self.timings["ema_restore_s"] = time.perf_counter() - t1
                if opt.param_groups and opt.param_groups[0]["params"][0].is_cuda:
                    torch.cuda.current_stream().synchronize()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=work, name="flowtok-resume", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the optimizer state and EMA are in place (raises what the restore raised)."""
        self.start()
        if self._thread is None:
            return
        t0 = time.perf_counter()
        self._thread.join()
        self._thread = None
        self.timings["waited_s"] = self.timings.get("waited_s", 0.0) + time.perf_counter() - t0
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointError(f"checkpoint {self.found.path}: optimizer or EMA state cannot be restored "
                                  f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None

    def report(self, first_step_s: float, since_start: float | None) -> str:
        t = self.timings
        read = sum(t.get(k, 0.0) for k in ("verify_s", "read_optimizer_s", "read_model_s", "validate_s"))
        setup = f"{self.setup_s:.2f} s" if self.setup_s is not None else "n/a"
        total = f"{since_start:.2f} s" if since_start is not None else "n/a"
        return (f"resume timing: setup before the resume {setup}; checkpoint read {read:.2f} s (verify "
                f"{t.get('verify_s', 0):.2f}, optimizer map {t.get('read_optimizer_s', 0):.2f}, model "
                f"{t.get('read_model_s', 0):.2f}, checks {t.get('validate_s', 0):.2f}); weights restore "
                f"{t.get('weights_restore_s', 0):.2f} s; data position {t.get('data_restore_s', 0):.2f} s; "
                f"in the background: optimizer {t.get('optimizer_restore_s', 0):.2f} s, EMA read "
                f"{t.get('read_ema_s', 0):.2f} s + restore {t.get('ema_restore_s', 0):.2f} s (waited for "
                f"{t.get('waited_s', 0):.2f} s); first step (compile) {first_step_s:.2f} s; first step done "
                f"{total} after process start")


def check_resumable(trainer: Trainer, found: ckpt.Checkpoint) -> None:
    """A checkpoint of another stage or other shapes is a one-line error, not a load_state_dict dump."""
    kind = found.state.get("stage")
    stage = trainer.stage
    if kind is not None and kind != stage.name:
        raise CheckpointError(f"checkpoint {found.path} was written by stage '{kind}', "
                              f"this run trains '{stage.name}'")
    check_state_dict(stage, found.model, f"checkpoint {found.path}")
    if found.state.get("world_size", trainer.world) != trainer.world:
        # Each step reads the same samples on any number of processes, but random draws are
        # seeded per rank, so the run goes on correctly yet not bit-identical to an uninterrupted one.
        log.warning("checkpoint %s was written by %s processes, resuming on %d: not bit-identical to "
                    "an uninterrupted run", found.path, found.state.get("world_size"), trainer.world)


def choose_checkpoint(trainer: Trainer, resume: str, ckpt_dir: Path,
                      sound: Callable[[ckpt.Checkpoint], Any]) -> ckpt.Checkpoint | None:
    """Rank 0 picks the checkpoint and every rank loads that one: ranks that saw different folders
    (a checkpoint being written, a slow file system) would resume at different steps and hang. The one
    rank 0 chose is not read again."""
    path: str | None = None
    found: ckpt.Checkpoint | None = None
    if trainer.is_main:
        if resume == "latest":
            found = ckpt.load_latest(ckpt_dir, sound, trainer.device)
            path = str(found.path) if found is not None else None
        else:
            path = resume
    path = ranks.broadcast_from_main(path, trainer.world)
    if found is not None or path is None:
        return found
    return ckpt.load_checkpoint(Path(path), sound, trainer.device)


def resume_run(trainer: Trainer, resume: str, ckpt_dir: Path, opt: torch.optim.Optimizer,
               ema: EMA | None, setup_s: float | None) -> Restore | None:
    """Load the stage from ``resume`` ('latest' or a checkpoint) and start restoring the optimizer and EMA in
    the background (:meth:`Restore.start` once the first batch is in, :meth:`Restore.wait` before the first
    optimizer step); None when there is no checkpoint."""
    # A checkpoint whose files verify but whose contents do not fit is skipped like a corrupt one.
    def sound(c: ckpt.Checkpoint) -> None:
        check_resumable(trainer, c)
        ckpt.check_optimizer_state(c, opt)

    found = choose_checkpoint(trainer, resume, ckpt_dir, sound)
    if found is None:
        log.info("no checkpoint in %s; starting from scratch", ckpt_dir)
        return None
    restore = Restore(found, setup_s, opt, ema)
    t0 = time.perf_counter()
    trainer.stage.load_state_dict(found.model)
    found.model = {}
    restore.timings["weights_restore_s"] = (t1 := time.perf_counter()) - t0
    data_states = found.state.get("data")
    if isinstance(data_states, list) and len(data_states) == trainer.world:
        trainer.stage.load_data_state(data_states[trainer.rank])
    restore.timings["data_restore_s"] = time.perf_counter() - t1
    log.info("resumed from %s at step %d", found.path, found.step)
    return restore
