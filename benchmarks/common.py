"""Helpers shared by the benchmarks: environment record, timing, peak memory, matmul ceiling, time budget.

Every benchmark writes one JSON file whose ``env`` block says where and when the numbers were taken
(device, driver-side versions, date, command line) and whose ``items`` list holds one record per
measurement, or the error that stopped it, so that one failed variant never loses the others.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peak of the SXM parts (NVIDIA datasheets), for a second MFU figure beside the
# one against the matmul rate measured in the same run.
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def log(*parts: object) -> None:
    print(*parts, flush=True)


def env_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
    for name in ("transformers", "diffusers", "triton"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as absent
            info[name] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            timeout=5, cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:  # noqa: BLE001 - the device machine gets a work tree without .git
        info["git_commit"] = None
    return info


def datasheet_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int = 1, iters: int = 3,
              max_timed_s: float | None = None) -> dict[str, float]:
    """Median wall time of ``fn()`` after ``warmup`` calls; the first call's time (compile, capture) apart.

    Each call is up to seconds long (a whole sampling loop or a training step), so a host clock read
    after a device synchronisation is exact enough and includes any host overhead a user would also
    pay. Timed calls stop early once ``max_timed_s`` seconds are timed (at least one call), to fit
    a benchmark of several-second calls into one device session.
    """
    times: list[float] = []
    first = None
    for i in range(warmup + iters):
        if times and max_timed_s is not None and sum(times) >= max_timed_s:
            break
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        if i == 0:
            first = dt
        if i >= warmup:
            times.append(dt)
    return {"median_s": statistics.median(times), "min_s": min(times), "first_call_s": first, "iters": len(times)}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def matmul_tflops(device: torch.device, n: int = 8192, iters: int = 10, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense ``mm`` rate on random data (zeros run faster than real data on Hopper)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    dt = (time.perf_counter() - t0) / iters
    del a, b
    free_memory(device)
    return 2 * n**3 / dt / 1e12


def sustained_matmul_tflops(device: torch.device, n: int = 8192, seconds: float = 3.0,
                            dtype: torch.dtype = torch.bfloat16) -> float:
    """The ``mm`` rate once the GPU has run ``mm`` back to back for ``seconds``, the last third timed: the rate at
    the clock its power limit allows under a long load (:func:`matmul_tflops` times a burst of 10 calls, which
    a GPU runs at its boost clock)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 2 * seconds / 3:
        for _ in range(10):
            a @ b
        sync(device)
    t1 = time.perf_counter()
    timed = 0
    while time.perf_counter() - t1 < seconds / 3:
        for _ in range(10):
            a @ b
        sync(device)
        timed += 10
    dt = (time.perf_counter() - t1) / timed
    del a, b
    free_memory(device)
    return 2 * n**3 / dt / 1e12


def mm_fractions(tflops: float, env: dict) -> dict[str, float | None]:
    """``tflops`` as fractions of the ``mm`` rates recorded in ``env``: the burst (``bf16_mm_tflops``,
    :func:`matmul_tflops`) and, where measured, the sustained (``bf16_mm_tflops_sustained``)."""
    burst, sustained = env.get("bf16_mm_tflops"), env.get("bf16_mm_tflops_sustained")
    return {"frac_of_mm": tflops / burst if burst else None,
            "frac_of_sustained_mm": tflops / sustained if sustained else None}


class Budget:
    """Wall-clock budget: items are skipped (and say so) once less than ``reserve_s`` is left.

    The deadline comes from ``--deadline`` (seconds from now) or the ``BENCH_DEADLINE`` environment
    variable (a Unix time shared by all scripts of one run); neither means no limit.
    """

    def __init__(self, seconds: float | None = None) -> None:
        if seconds is not None:
            self.deadline: float | None = time.time() + seconds
        elif os.environ.get("BENCH_DEADLINE"):
            self.deadline = float(os.environ["BENCH_DEADLINE"])
        else:
            self.deadline = None

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def allows(self, reserve_s: float) -> bool:
        return self.left() > reserve_s


class Results:
    """The JSON record of one benchmark: ``env``, ``settings``, ``items``, written after every item."""

    def __init__(self, path: str | os.PathLike | None, env: dict[str, Any], settings: dict[str, Any]) -> None:
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {"env": env, "settings": settings, "items": []}
        self.save()

    def add(self, item: dict[str, Any]) -> dict[str, Any]:
        self.data["items"].append(item)
        self.save()
        return item

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    def run(self, name: str, fn: Callable[[], dict[str, Any]], device: torch.device, budget: Budget,
            reserve_s: float = 0.0, **tags: Any) -> dict[str, Any] | None:
        """Run one measurement; record its result, its error (OOM included), or that it was skipped."""
        base = {"name": name, **tags}
        if not budget.allows(reserve_s):
            log(f"[skip] {name}: time budget ({budget.left():.0f} s left)")
            self.add({**base, "status": "skipped", "reason": "time budget"})
            return None
        free_memory(device)
        reset_peak(device)
        t0 = time.perf_counter()
        failure: dict[str, Any] | None = None
        try:
            out = fn()
        except torch.OutOfMemoryError:
            log(f"[oom] {name}")
            failure = {**base, "status": "oom", "wall_s": round(time.perf_counter() - t0, 1)}
        except Exception as exc:  # noqa: BLE001 - one broken variant must not lose the rest of the run
            lines = traceback.format_exc().strip().splitlines()
            log(f"[error] {name}: {type(exc).__name__}: {str(exc)[:300]}")
            failure = {**base, "status": "error", "error": f"{type(exc).__name__}: {str(exc)[:2000]}",
                       "traceback_tail": lines[-12:]}
        if failure is not None:
            # Outside the except block: the traceback's frames, which hold the failed step's
            # activations, are gone, so their memory really returns to the allocator.
            free_memory(device)
            self.add(failure)
            return None
        item = {**base, "status": "ok", **out, "peak_gib": peak_gib(device),
                "wall_s": round(time.perf_counter() - t0, 1)}
        log(f"[ok] {name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in item.items()
                                        if k not in ("name", "status") and not isinstance(v, (dict, list))))
        return self.add(item)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
