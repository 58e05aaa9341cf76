"""The one training loop. Every stage (tokenizer, text decoder, T2I, I2T, distillation) is a
:class:`Stage` handed to :class:`Trainer`; there is no second copy of this loop.

Launch on one device: ``flowtok train configs/shapes/t2i.yaml``. On N GPUs of one node:
``torchrun --nproc_per_node N -m flowtok.cli train CONFIG`` or ``accelerate launch -m flowtok.cli train CONFIG``
(both set RANK / WORLD_SIZE / LOCAL_RANK, which is all this loop reads; :mod:`.distributed` holds the
process group, the DDP wrapper and the collectives). ``train.batch_size`` is the
GLOBAL batch: each of the N processes takes ``batch_size / N`` samples per step, so the same config
gives the same optimisation on any number of GPUs. Several nodes: torchrun's ``--nnodes`` and
``--rdzv-endpoint`` as usual.

Exact resume: the data of step s and every random draw in it are pure functions of (seed, s, rank),
so ``--resume latest`` after a kill continues the same loss curve as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..config import atomic_write_text
from ..errors import ConfigError, FlowTokError
from ..flow import FlowTransformer
from . import checkpoint as ckpt
from . import distributed as ranks
from .ema import EMA
from .prefetch import Prefetched, finite_flag, prefetch, set_rng_state
from .resume import Restore, process_age, resume_run
from .stages.base import Stage

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # global batch over all processes and accumulation micro-steps
    grad_accum: int = 1  # micro-batches per optimizer step: batch_size / (processes * grad_accum) each
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0 disables the EMA (the raw weights are exported)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    ckpt_every: int = 500
    keep_last: int = 3
    log_every: int = 50
    eval_every: int = 0  # 0: only at the end
    nan_policy: Literal["skip", "stop"] = "skip"
    max_consecutive_nan: int = 20
    compile: bool = False
    # What train.compile compiles: "stage", the whole stage's forward (one large graph: a cold compile of a
    # FlowTok-XL stage takes minutes); "blocks", regionally, each flow's blocks (FlowTransformer.compile_blocks,
    # as benchmarks/train_step.py) with the rest eager (cold compile: one block's). Both compile the text tower.
    compile_scope: Literal["stage", "blocks"] = "stage"
    max_minutes: float = 0.0  # >0: stop (checkpoint, evaluate, export) once this much wall time has passed
    prefetch: bool = True  # draw the next step's batch while this step's backward runs (see training/prefetch.py)
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("train.steps, train.batch_size and train.grad_accum must be positive")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        # Caught here, not as a ZeroDivisionError or an optimizer traceback after the model is built.
        for name in ("ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "keep_last", "warmup_steps", "max_consecutive_nan"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be 0 or more, got {getattr(self, name)}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must lie in [0, 1), got {list(self.betas)}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.weight_decay < math.inf or not 0 <= self.max_minutes < math.inf:
            raise ConfigError("train.weight_decay and train.max_minutes must be finite and 0 or more")
        if math.isnan(self.grad_clip):
            raise ConfigError("train.grad_clip must be a number (0 or less disables clipping)")


class NonFiniteLossError(FlowTokError, FloatingPointError):
    """Training met a NaN or inf loss or gradient under ``nan_policy: stop`` (or too many in a row)."""


def _nonfinite_key(batch: dict[str, Any]) -> str | None:
    """The first floating-point tensor of ``batch`` holding NaN or inf, or None (one host sync when clean)."""
    flag = finite_flag(batch)
    if flag is None or bool(flag):
        return None
    return next(k for k, v in batch.items() if torch.is_tensor(v) and v.is_floating_point()
                and not bool(torch.isfinite(v).all()))


@dataclass
class _Loop:
    """What :meth:`Trainer.fit` sets up and carries from step to step."""

    opt: torch.optim.Optimizer
    ema: EMA | None
    forward: Callable[[dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    ddp: nn.parallel.DistributedDataParallel | None  # for no_sync() on accumulation micro-steps
    params: list[nn.Parameter]
    ckpt_dir: Path
    writer: Any  # a TensorBoard SummaryWriter, or None
    bar: tqdm | None
    step: int
    stop_at: int  # train.steps, or the step at which the time budget ran out
    lr: float = 0.0
    nan_run: int = 0  # non-finite steps in a row
    running: dict[str, torch.Tensor] = field(default_factory=dict)  # metric sums since the last log step
    n_running: int = 0
    n_last: int = 0  # samples since the last log step
    data_s: float = 0.0  # seconds spent getting batches since the last log step (the GPU idles meanwhile)
    start: int = 0  # the step this process started (or resumed) at
    restore: Restore | None = None  # a resume's optimizer and EMA restore, until the first optimizer step
    prefetched: Prefetched | None = None  # the next step's batch, drawn during this step's backward
    t_last: float = field(default_factory=time.perf_counter)
    t_begin: float = field(default_factory=time.perf_counter)


def _memory() -> dict[str, float]:
    """Peak GPU memory allocated and this process's resident host memory, GiB."""
    out = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/statm") as fh:
            out["host_rss_gib"] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        pass
    return out




class Trainer:
    def __init__(self, stage: Stage, cfg: TrainConfig, run_dir: str | os.PathLike, seed: int = 0,
                 device: str | None = None, resolved_config: dict[str, Any] | None = None) -> None:
        self.stage = stage
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.rank, self.world, local = ranks.dist_info()
        ranks.join(self.world)
        self.device = ranks.process_device(device, local)
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by {self.world} processes x "
                              f"{cfg.grad_accum} accumulation steps")
        self.local_batch = cfg.batch_size // self.world  # per process and optimizer step
        self.micro_batch = self.local_batch // cfg.grad_accum
        self.resolved_config = resolved_config or {}
        self.is_main = self.rank == 0

    # -- helpers -----------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        c = self.cfg
        if c.warmup_steps and step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.schedule == "cosine":
            span = max(1, c.steps - c.warmup_steps)
            frac = min(1.0, (step - c.warmup_steps) / span)
            return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
        return c.lr

    def _autocast(self):
        use_bf16 = self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and self.device.type == "cuda")
        if use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def _seed_step(self, step: int) -> None:
        # Every random draw of a step (dropout, t, noise, null flags) depends only on (seed, step, rank).
        torch.manual_seed((self.seed * 1_000_003 + step) * 64 + self.rank)

    def _log_jsonl(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, resume: str | None = None, allow_config_change: bool = False) -> Path:
        """Train to ``train.steps`` (or the time budget), checkpointing, logging and evaluating on the way;
        export the EMA weights and return the export folder. The run folder is locked for the run, and a
        resume that changes the seed, batch size or data is refused unless ``allow_config_change``."""
        from .rundir import check_resume_config, claim_run_dir

        with claim_run_dir(self.run_dir) if self.is_main else contextlib.nullcontext():
            if resume and self.is_main and (resume != "latest" or ckpt.list_checkpoints(self.run_dir / "checkpoints")):
                check_resume_config(self.run_dir, self.resolved_config, allow_config_change)
            return self._fit(resume)

    def _fit(self, resume: str | None) -> Path:
        loop = self._set_up(resume)
        while loop.step < loop.stop_at:
            if not self._step(loop):
                continue  # a skipped non-finite step: nothing to log, evaluate or save
            if loop.step % self.cfg.log_every == 0 or loop.step == loop.stop_at:
                self._log(loop)
            if self.cfg.eval_every and loop.step % self.cfg.eval_every == 0 and loop.step != loop.stop_at:
                self._evaluate(loop.ema, loop.step, loop.writer)
            self._stop_when_out_of_time(loop)
            if loop.step % self.cfg.ckpt_every == 0 or loop.step == loop.stop_at:
                self._save(loop.ckpt_dir, loop.step, self.stage, loop.ema, loop.opt, loop.prefetched)
        return self._finish(loop)

    def _set_up(self, resume: str | None) -> _Loop:
        """The run folder and its config, the stage on its device, optimizer, EMA, resume state, the
        (distributed, compiled) forward, and the loggers."""
        cfg, stage = self.cfg, self.stage
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main and self.resolved_config:
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.resolved_config, sort_keys=False))
        stage.to(self.device)
        stage.setup(self.device)
        if cfg.compile:
            stage.compile_helpers()
        params = [p for p in stage.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"stage '{stage.name}' has no trainable parameters")
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, fused=self.device.type == "cuda",
        )
        ema = EMA(stage, cfg.ema_decay) if cfg.ema_decay > 0 else None
        ckpt_dir = self.run_dir / "checkpoints"
        restore = resume_run(self, resume, ckpt_dir, opt, ema, process_age()) if resume else None
        start = restore.step if restore is not None else 0
        ddp = ranks.wrap(stage, self.device, self.world, stage.ddp_find_unused_parameters)
        model: nn.Module = ddp if ddp is not None else stage
        forward: Any = model
        if cfg.compile and cfg.compile_scope == "blocks":
            for m in stage.modules():
                if isinstance(m, FlowTransformer):
                    m.compile_blocks()
        elif cfg.compile:
            forward = torch.compile(model)
        bar = None
        if self.is_main and cfg.progress:
            bar = tqdm(total=cfg.steps, initial=start, desc=stage.name, dynamic_ncols=True)
        stage.train()
        return _Loop(opt=opt, ema=ema, forward=forward, params=params, ckpt_dir=ckpt_dir,
                     writer=self._open_writer(), bar=bar, step=start, stop_at=cfg.steps, start=start, restore=restore,
                     ddp=ddp)

    def _open_writer(self) -> Any:
        if not (self.is_main and self.cfg.tensorboard):
            return None
        try:  # optional: tensorboard is not a dependency of flowtok
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed; scalars go to metrics.jsonl only")
            return None
        return SummaryWriter(str(self.run_dir / "tb"))

    def _step(self, loop: _Loop) -> bool:
        """One optimisation step; False when it was skipped for a non-finite batch, loss or gradient."""
        cfg, step = self.cfg, loop.step
        self._seed_step(step)
        loop.lr = self.lr_at(step)
        for g in loop.opt.param_groups:
            g["lr"] = loop.lr
        loss, metrics, bad_input = self._forward_backward(loop, step)
        finite = bad_input is None
        if finite:
            gnorm = torch.nn.utils.clip_grad_norm_(loop.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            # One sync for all: a non-finite loss gives non-finite gradients, which are never applied; the
            # next batch, drawn meanwhile, is checked in the same read-back.
            flags = [torch.isfinite(gnorm) & torch.isfinite(loss.detach())]
            if cfg.prefetch and step + 1 < loop.stop_at:
                loop.prefetched, waited = prefetch(
                    step + 1, self.device, self._seed_step,
                    lambda s: self.stage.batch(s, self.micro_batch, self.rank, self.world * cfg.grad_accum),
                    self.stage.data_state)
                loop.data_s += waited
                if loop.prefetched.finite is not None:
                    flags.append(loop.prefetched.finite)
            read = torch.stack(flags).tolist()
            finite = bool(read[0])
            if len(read) > 1 and loop.prefetched is not None:
                loop.prefetched.clean = bool(read[1])
        if not finite:
            self._skip(loop, bad_input)
            return False
        loop.nan_run = 0
        self._settle(loop)
        loop.opt.step()
        loop.opt.zero_grad(set_to_none=True)
        if loop.ema is not None:
            loop.ema.update(self.stage, step)
        loop.step += 1
        loop.n_last += self.local_batch * self.world
        # Metrics stay on the device until a log step, so the loop never waits on the GPU for them.
        for k, v in {"loss": loss, **metrics}.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            loop.running[k] = loop.running[k] + v if k in loop.running else v
        loop.n_running += 1
        if loop.step == loop.start + 1:  # how long a (re)start takes to its first optimizer step
            first, age = time.perf_counter() - loop.t_begin, process_age()
            resumed = {}
            if loop.restore is not None:
                log.info("%s", loop.restore.report(first, age))
                resumed = {"resume_timings": loop.restore.timings, "resume_setup_s": loop.restore.setup_s}
                loop.restore = None
            self._log_jsonl({"step": loop.step, "first_step_s": first, "since_process_start_s": age, **resumed})
        if loop.bar is not None:
            loop.bar.update(1)
        return True

    def _forward_backward(self, loop: _Loop, step: int) -> tuple[Any, dict[str, Any], str | None]:
        """Loss and gradients of the step's ``train.grad_accum`` micro-batches; the name of a batch entry
        holding NaN or inf instead, if one does (checked before the forward: models refuse NaN input
        with an error, which would end the run instead of applying nan_policy).

        Micro-batch m of this process is "rank m * world + rank of world * grad_accum": the step reads
        the samples of one batch of ``batch_size``, so accumulation equals the larger batch.
        """
        accum = self.cfg.grad_accum
        sums: dict[str, Any] = {}
        loss = None
        metrics: dict[str, Any] = {}
        for m in range(accum):
            pre, loop.prefetched = (loop.prefetched, None) if m == 0 else (None, loop.prefetched)
            if pre is not None and pre.step == step:
                batch = pre.batch
                set_rng_state(pre.rng, self.device)  # as if drawn just now, after this step's seed
                bad_input = None if pre.clean else _nonfinite_key(batch)
            else:
                t0 = time.perf_counter()
                batch = self.stage.batch(step, self.micro_batch, m * self.world + self.rank, self.world * accum)
                loop.data_s += time.perf_counter() - t0
                if loop.restore is not None:
                    loop.restore.start()  # loader workers are forked by now: the background restore may begin
                bad_input = _nonfinite_key(batch)
            if bad_input is not None:
                return None, {}, bad_input
            sync = loop.ddp is None or m == accum - 1
            with (loop.ddp.no_sync() if loop.ddp is not None and not sync else contextlib.nullcontext(),
                  self._autocast()):
                loss, metrics = loop.forward(batch)
            (loss / accum if accum > 1 else loss).backward()
            if accum > 1:
                sums = {k: sums.get(k, 0) + (v.detach() if torch.is_tensor(v) else v) / accum
                        for k, v in {"loss": loss, **metrics}.items()}
        if accum > 1:
            loss, metrics = sums.pop("loss"), sums
        return loss, metrics, None

    def _settle(self, loop: _Loop) -> None:
        """Wait for a resume's background restore of the optimizer and EMA (then the step's lr again: the
        restored optimizer state carries the lr it was saved with)."""
        if loop.restore is not None:
            loop.restore.wait()
            for g in loop.opt.param_groups:
                g["lr"] = loop.lr

    def _skip(self, loop: _Loop, bad_input: str | None) -> None:
        """Drop a non-finite step's gradients, or stop the run when ``nan_policy`` says so."""
        cfg, step = self.cfg, loop.step
        self._settle(loop)
        loop.opt.zero_grad(set_to_none=True)
        loop.nan_run += 1
        msg = (f"non-finite values in batch['{bad_input}'] at step {step}" if bad_input is not None
               else f"non-finite loss or gradient at step {step}")
        if cfg.nan_policy == "stop" or loop.nan_run > cfg.max_consecutive_nan:
            why = "nan_policy is 'stop'" if cfg.nan_policy == "stop" else f"{loop.nan_run} in a row"
            raise NonFiniteLossError(f"{msg} ({why}); stopping, weights and EMA left untouched; "
                                     f"resume from the last checkpoint in {loop.ckpt_dir}")
        log.warning("%s; step skipped (%d in a row)", msg, loop.nan_run)
        self._log_jsonl({"step": step, "skipped": "non-finite"})
        loop.step += 1

    def _log(self, loop: _Loop) -> None:
        """Averages of the metrics since the last log step, and throughput, to metrics.jsonl, TensorBoard
        and the progress bar."""
        dt = time.perf_counter() - loop.t_last
        rec = self._mean_over_ranks(loop.running, loop.n_running)
        rec.update(step=loop.step, lr=loop.lr, samples_per_s=loop.n_last / max(dt, 1e-9),
                   data_wait_s=loop.data_s / max(loop.n_running, 1), data_wait_frac=loop.data_s / max(dt, 1e-9),
                   **_memory())
        self._log_jsonl(rec)
        if loop.writer is not None:
            for k, v in rec.items():
                if k != "step":
                    loop.writer.add_scalar(f"train/{k}", v, loop.step)
        if loop.bar is not None:
            loop.bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['samples_per_s']:.0f}")
        loop.running, loop.t_last, loop.n_last, loop.n_running, loop.data_s = {}, time.perf_counter(), 0, 0, 0.0

    def _mean_over_ranks(self, running: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        """Running metric means, averaged over all ranks (one collective per log step)."""
        keys = sorted(running)
        if not keys:
            return {}
        vals = torch.stack([running[k].float().reshape(()) for k in keys]) / max(n, 1)
        vals = ranks.mean_over_ranks(vals, self.world, self.device)
        return dict(zip(keys, vals.tolist()))

    def _stop_when_out_of_time(self, loop: _Loop) -> None:
        """Past ``train.max_minutes``, make this step the last (on every rank at once)."""
        if self.cfg.max_minutes <= 0 or loop.stop_at != self.cfg.steps:
            return
        over = time.perf_counter() - loop.t_begin > 60 * self.cfg.max_minutes
        if ranks.any_rank(over, self.world, self.device):  # every rank stops at the same step
            loop.stop_at = loop.step
            log.info("time budget of %.1f min reached at step %d", self.cfg.max_minutes, loop.step)

    def _finish(self, loop: _Loop) -> Path:
        """The final evaluation and the export, both with the EMA weights."""
        self._settle(loop)  # a resume at the last step takes no step: the EMA must still be in place
        if loop.bar is not None:
            loop.bar.close()
        self._evaluate(loop.ema, loop.step, loop.writer)
        out = self.run_dir / "export"
        if self.is_main:
            self._with_ema(loop.ema, lambda: self.stage.export(out))
        if loop.writer is not None:
            loop.writer.close()
        ranks.barrier(self.world)
        return out

    def _with_ema(self, ema: EMA | None, fn):
        if ema is None:
            return fn()
        backup = {k: v.detach().clone() for k, v in self.stage.state_dict().items()}
        ema.copy_to(self.stage)
        self.stage.eval()
        try:
            return fn()
        finally:
            self.stage.load_state_dict(backup)
            self.stage.train()

    def _evaluate(self, ema: EMA | None, step: int, writer) -> None:
        if self.is_main:
            self._evaluate_main(ema, step, writer)
        ranks.barrier(self.world)  # the others wait for rank 0's evaluation here, not in a collective that times out

    def _evaluate_main(self, ema: EMA | None, step: int, writer) -> None:
        metrics, images = self._with_ema(ema, lambda: self.stage.evaluate(step))
        if metrics:
            self._log_jsonl({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
            log.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(f"eval/{k}", v, step)
            for k, img in images.items():
                writer.add_image(f"eval/{k}", img.clamp(0, 1).cpu(), step)
        for k, img in images.items():
            arr = (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
            (self.run_dir / "previews").mkdir(exist_ok=True)
            Image.fromarray(arr).save(self.run_dir / "previews" / f"{k}-{step:07d}.png")

    def _save(self, ckpt_dir: Path, step: int, stage: Stage, ema: EMA | None, opt,
              prefetched: Prefetched | None = None) -> None:
        # A batch already drawn for the next step is not consumed yet: the position from before its draw.
        data = prefetched.data_state if prefetched is not None else stage.data_state()
        states = ranks.gather_objects(data, self.world) if data is not None else []
        if self.is_main:
            self._save_main(ckpt_dir, step, stage, ema, opt, states)
        ranks.barrier(self.world)  # no rank runs ahead of a checkpoint rank 0 is still writing

    def _save_main(self, ckpt_dir: Path, step: int, stage: Stage, ema: EMA | None, opt, data: list) -> None:
        model_state = {k: v.detach().cpu() for k, v in stage.state_dict().items()}
        ema_state = ema.state_dict() if ema is not None else model_state
        ckpt.save_checkpoint(ckpt_dir, step, model_state, {k: v.cpu() for k, v in ema_state.items()},
                             opt.state_dict(), {"step": step, "samples_seen": step * self.cfg.batch_size,
                                                "world_size": self.world, "seed": self.seed,
                                                "stage": stage.name, **({"data": data} if data else {})},
                             keep_last=self.cfg.keep_last)
