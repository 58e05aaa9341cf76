"""MFU of a FlowTok training step on one GPU: the largest batch that fits, with and without checkpointing.

One step = the flow-matching loss (:class:`flowtok.flow.FlowObjective`) on random [B, 77, 16] text and
image latents, backward, fused AdamW; fp32 master weights under bf16 autocast, as the trainer runs.
MFU counts the model's FLOPs (3x a forward: :func:`flowtok.flow.flop_count`) over the step time, against
both the bf16 ``mm`` rate measured in the same run and the datasheet peak; with gradient checkpointing
the hardware also redoes the forward (4x), reported as ``hfu``.

The largest batch is searched among ``--batches`` from the top down (the first that runs is kept);
``--ckpt-batches`` are run with checkpointing (1,024 per GPU is the paper's FlowTok-H setting: batch 8K
on 8 A100 80 GB). ``--search-presets`` only looks for the largest batch without checkpointing.

    python benchmarks/train_step.py --out results/train.json        # the GPU run (see run_gpu.sh)
    python benchmarks/train_step.py --tiny --device cpu             # seconds on a CPU: checks the script
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    Budget,
    Results,
    datasheet_tflops,
    env_info,
    free_memory,
    log,
    matmul_tflops,
    pick_device,
    time_call,
)

from flowtok.flow import FLOW_PRESETS, FlowObjective, FlowTransformer, flop_count  # noqa: E402


def build(preset: str, tiny: bool, device: torch.device, compiled: bool, compile_mode: str | None = None):
    cfg = dataclasses.replace(FLOW_PRESETS["tiny"]) if tiny else FLOW_PRESETS[preset]
    with torch.device(device):
        model = FlowTransformer(cfg)
    if compiled:
        model.compile_blocks(**({"mode": compile_mode} if compile_mode else {}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.03, fused=device.type == "cuda")
    return model, opt


def step_fn(model: FlowTransformer, opt: torch.optim.Optimizer, batch: int, device: torch.device):
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, cfg.num_tokens, cfg.in_channels, generator=gen).to(device)
    x1 = torch.randn(batch, cfg.num_tokens, cfg.in_channels, generator=gen).to(device)
    objective = FlowObjective()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> None:
        with autocast:
            loss, _ = objective.loss(model, x0, x1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(model, opt, batch: int, ckpt: bool, device: torch.device, args, mm_rate: float | None,
            peak: float | None) -> dict[str, Any]:
    model.set_grad_checkpointing(ckpt)
    step = step_fn(model, opt, batch, device)
    t = time_call(step, device, args.warmup, args.iters)
    model_flops = 3 * flop_count(model.config, batch)
    hw_flops = model_flops * (4 / 3 if ckpt else 1)
    rate = model_flops / t["median_s"] / 1e12
    return {**t, "samples_per_s": batch / t["median_s"], "model_tflops": rate,
            "mfu_vs_mm": rate / mm_rate if mm_rate else None, "mfu_vs_datasheet": rate / peak if peak else None,
            "hfu_vs_datasheet": hw_flops / t["median_s"] / 1e12 / peak if peak else None}


def reset_after_oom(model, opt, device) -> None:
    opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = None
    free_memory(device)


def run_preset(preset: str, compiled: bool, search_only: bool, args, device, results: Results, budget: Budget,
               mm_rate, peak) -> None:
    variant = "compile" if compiled else "eager"
    reserve = args.reserve_compile if compiled else args.reserve
    if not budget.allows(reserve):
        results.add({"name": f"{preset} train {variant}", "status": "skipped", "reason": "time budget"})
        return
    model, opt = build(preset, args.tiny, device, compiled, args.compile_mode)
    tags = {"model": preset, "variant": variant}
    largest = None
    tries = 0
    candidates = args.batches
    ckpt_batches = args.ckpt_batches
    if compiled:
        found = [i["largest_batch"] for i in results.data["items"]
                 if i.get("kind") == "largest_batch" and i["model"] == preset and i["largest_batch"]]
        candidates = [b for b in args.batches if not found or b <= found[0]]
        ckpt_batches = ckpt_batches[:1]
    for batch in candidates:  # top down: the first that runs is the largest that fits
        if tries >= args.max_tries:
            break
        tries += 1
        item = results.run(f"{preset} train {variant} b{batch}", lambda b=batch: measure(
            model, opt, b, False, device, args, mm_rate, peak), device, budget, reserve,
            **tags, checkpointing=False, batch=batch)
        if item is not None:
            largest = batch
            break
        reset_after_oom(model, opt, device)
        if results.data["items"][-1]["status"] != "oom":  # skipped for time, or broken: smaller won't help
            break
    results.add({"name": f"{preset} largest batch without checkpointing ({variant})", "status": "ok",
                 "kind": "largest_batch", **tags, "largest_batch": largest, "searched": candidates[:tries]})
    if not search_only:
        for batch in ckpt_batches:
            if results.run(f"{preset} train {variant} ckpt b{batch}", lambda b=batch: measure(
                    model, opt, b, True, device, args, mm_rate, peak), device, budget, reserve,
                    **tags, checkpointing=True, batch=batch) is None:
                reset_after_oom(model, opt, device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--preset", default="FlowTok-XL")
    p.add_argument("--variants", default="eager,compile")
    p.add_argument("--batches", default=None, help="candidates without checkpointing, largest first "
                   "(default 1280,1024,896,768,640,512,384,256; tiny 8,4)")
    p.add_argument("--ckpt-batches", default=None, help="run with checkpointing (default 1024,2048; tiny 8)")
    p.add_argument("--search-presets", default="FlowTok-H", help="only the largest-batch search, eager")
    p.add_argument("--compile-mode", default=None, choices=["default", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of the compiled variant (default: inductor's default)")
    p.add_argument("--max-tries", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--deadline", type=float, default=None, help="seconds from now; default $BENCH_DEADLINE")
    p.add_argument("--reserve", type=float, default=15.0)
    p.add_argument("--reserve-compile", type=float, default=75.0)
    args = p.parse_args(argv)
    default_batches = "8,4" if args.tiny else "1280,1024,896,768,640,512,384,256"
    args.batches = sorted((int(b) for b in (args.batches or default_batches).split(",")), reverse=True)
    args.ckpt_batches = [int(b) for b in (args.ckpt_batches or ("8" if args.tiny else "1024,2048")).split(",") if b]
    args.variants = [v for v in args.variants.split(",") if v]
    if set(args.variants) - {"eager", "compile"}:
        p.error("variants must be among eager, compile")
    args.search_presets = [s for s in args.search_presets.split(",") if s]
    for name in (args.preset, *args.search_presets):
        if name not in FLOW_PRESETS:
            p.error(f"unknown preset {name}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = pick_device(args.device)
    budget = Budget(args.deadline)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "deadline")}
    results = Results(args.out, env_info(device), settings)
    mm_rate = matmul_tflops(device, n=256 if args.tiny else 8192)
    peak = datasheet_tflops(device)
    results.data["env"].update(bf16_mm_tflops=mm_rate, datasheet_bf16_tflops=peak)
    log(f"bf16 mm rate: {mm_rate:.1f} TFLOP/s; datasheet {peak}")
    # Eager first (it finds the largest batch), then the search-only presets, then the compiled step
    # at the batch eager found: compiling is per shape (a minute each), so the compiled variant does
    # not search, and runs only the first checkpointed batch.
    order = [v for v in args.variants if v == "eager"] + ["search"] + [v for v in args.variants if v == "compile"]
    for step in order:
        if step == "search":
            for preset in args.search_presets:
                run_preset(preset, False, True, args, device, results, budget, mm_rate, peak)
        else:
            run_preset(args.preset, step == "compile", False, args, device, results, budget, mm_rate, peak)
    results.save()
    log(f"\n{'model':11s} {'variant':8s} {'ckpt':5s} {'batch':>5s} {'step s':>7s} {'samples/s':>9s} "
        f"{'TFLOP/s':>8s} {'MFU(mm)':>8s} {'MFU(ds)':>8s} {'peak GiB':>8s}")
    for i in results.data["items"]:
        if i.get("status") == "ok" and "median_s" in i:
            mm = f"{i['mfu_vs_mm']:.0%}" if i.get("mfu_vs_mm") else ""
            ds = f"{i['mfu_vs_datasheet']:.0%}" if i.get("mfu_vs_datasheet") else ""
            log(f"{i['model']:11s} {i['variant']:8s} {str(i['checkpointing']):5s} {i['batch']:5d} "
                f"{i['median_s']:7.3f} {i['samples_per_s']:9.1f} {i['model_tflops']:8.1f} {mm:>8s} {ds:>8s} "
                f"{i['peak_gib'] if i['peak_gib'] is not None else '':>8}")
        elif i.get("kind") == "largest_batch":
            log(f"{i['model']} ({i['variant']}): largest batch without checkpointing = {i['largest_batch']} "
                f"(tried {i['searched']})")
        elif i.get("status") != "ok":
            log(f"{i['name']}: {i['status']} {i.get('reason', i.get('error', ''))[:120]}")
    return results.data


if __name__ == "__main__":
    main()
