"""The processes of one training run, for :class:`~flowtok.training.trainer.Trainer`.

Who this process is (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, as torchrun and ``accelerate launch``
set them: all the loop reads), its device, the process group, the DDP wrapper, and the few
collectives the loop needs. On one process every collective is a no-op that returns its input, so
the loop reads the same on one process or many.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def dist_info() -> tuple[int, int, int]:
    """This process's rank, the number of processes and its rank on its node (0, 1, 0 when not launched)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def join(world: int) -> None:
    """Join the run's process group (NCCL with CUDA, gloo otherwise) when there are several processes."""
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def process_device(device: str | None, local: int) -> torch.device:
    """The device this process trains on: ``device``, or CUDA when there is one; a bare "cuda" means the
    GPU of this process's local rank, made current, with TF32 matmuls allowed."""
    out = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if out.type == "cuda" and out.index is None:
        out = torch.device("cuda", local)
    if out.type == "cuda":
        torch.cuda.set_device(out)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return out


def wrap(module: nn.Module, device: torch.device, world: int,
         find_unused_parameters: bool) -> nn.parallel.DistributedDataParallel | None:
    """``module`` in DistributedDataParallel when there are several processes, else None."""
    if world <= 1:
        return None
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters)


def broadcast_from_main(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if world <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world <= 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(values: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """The mean of ``values`` over all ranks (one collective)."""
    if world <= 1:
        return values
    values = values.to(device)
    dist.all_reduce(values)
    return values / world


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank, so that all ranks act at the same step."""
    if world <= 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t)
    return t.item() > 0


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for on one process)."""
    if world > 1:
        dist.barrier()
