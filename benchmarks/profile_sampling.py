"""Where the time of FlowTok sampling goes: ``torch.profiler`` over the flow loop and the decoder.

Random weights of a FlowTok preset in bf16 (as :mod:`sampling` builds them); one profiled call of each
part after a warm-up: the Euler loop with CFG (conditional and null halves in one batch) and the
paper-preset tokenizer decoder on one chunk of images. For each part it records the wall time, the
GPU kernel time summed by operator, and the share of the wall time the GPU was busy, then writes the
top operators to a JSON (and, with ``--trace``, a Chrome trace per part).

    python benchmarks/profile_sampling.py --batches 64,256 --out results/profile.json      # GPU
    python benchmarks/profile_sampling.py --tiny --device cpu                              # checks the script
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import env_info, log, pick_device, sync  # noqa: E402
from sampling import make_sampler  # noqa: E402
from sampling_models import Shapes, build_flowtok, tiny_shapes  # noqa: E402


def profiled(fn, device: torch.device, trace: str | None) -> tuple[float, list[dict[str, Any]], float]:
    """Wall seconds of one ``fn()`` and its operators, by self device time (CPU time on a CPU)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t0
    if trace:
        prof.export_chrome_trace(trace)
    on_device = device.type == "cuda"
    rows = []
    for e in prof.key_averages():
        # On a GPU, kernels only: an aten op's device time is its kernels' time again. "Command Buffer
        # Full" marks the host waiting on a full launch queue, not work.
        if on_device and (e.device_type != DeviceType.CUDA or e.key == "Command Buffer Full"):
            continue
        self_us = e.self_device_time_total if on_device else e.self_cpu_time_total
        if self_us > 0:
            rows.append({"op": e.key, "calls": e.count, "self_ms": self_us / 1e3})
    rows.sort(key=lambda r: -r["self_ms"])
    busy = sum(r["self_ms"] for r in rows) / 1e3
    return wall, rows, busy


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--model", default="FlowTok-XL")
    p.add_argument("--batches", default=None, help="default 64,256 (tiny: 2)")
    p.add_argument("--variants", default="eager,compile+graph")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--decode-chunk", type=int, default=64)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None)
    p.add_argument("--trace", default=None, help="folder for Chrome traces")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    shapes = tiny_shapes() if args.tiny else Shapes(tiny=False)
    batches = [int(b) for b in (args.batches or ("2" if args.tiny else "64,256")).split(",")]
    flow, projector, tokenizer = build_flowtok(args.model, shapes, device, torch.bfloat16)
    cfg = flow.config
    record: dict[str, Any] = {"env": env_info(device), "settings": vars(args), "items": []}
    gen = torch.Generator().manual_seed(0)

    def add(name: str, fn) -> None:
        fn()  # warm-up: compile, capture, lazy init
        wall, rows, busy = profiled(fn, device, args.trace and str(Path(args.trace) / f"{name}.json"))
        item = {"name": name, "wall_s": wall, "busy_s": busy, "busy_frac": busy / wall, "top": rows[: args.top]}
        record["items"].append(item)
        log(f"\n{name}: wall {wall * 1e3:.1f} ms, device busy {busy * 1e3:.1f} ms ({busy / wall:.0%})")
        for r in rows[: args.top]:
            log(f"  {r['self_ms']:9.2f} ms {r['calls']:6d}x  {r['op'][:90]}")

    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
    for variant in args.variants.split(","):
        if "compile" in variant and not getattr(flow, "_bench_compiled", False):
            flow.compile_blocks()
            flow._bench_compiled = True
        for batch in batches:
            x0 = torch.randn(batch, cfg.num_tokens, cfg.in_channels, generator=gen).to(device, torch.bfloat16)
            sampler = make_sampler(flow, variant, args.steps, args.guidance)
            add(f"flow {variant} b{batch}", lambda s=sampler, x=x0: s(x))
            del sampler
    chunk = min(args.decode_chunk, max(batches))
    lat = torch.randn(chunk, cfg.num_tokens, cfg.in_channels, generator=gen).to(device, torch.bfloat16)
    states = torch.randn(chunk, shapes.clip_len, shapes.clip_dim, generator=gen).to(device, torch.bfloat16)
    with torch.no_grad():
        add(f"decoder b{chunk}", lambda: tokenizer.decode(lat, states))
        add(f"projector b{chunk}", lambda: projector(states, sample=True))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
