"""The fused DiT path's memory-bound passes alone, at FlowTok-XL's batch-256 CFG shapes, on one GPU.

For ``LayerNorm(x + pending) * (1 + scale) + shift`` over ``x [2, 256 * 77, 1152]`` (bf16): flowtok's Triton
kernel at its default launch configuration and at the others of a small grid (rows per program x warps),
against the same function compiled by inductor and in eager PyTorch. For the gate fold ``diag(gate_g) W`` of
fc2 (``W [1152, 4608]``, two groups): the Triton kernel against PyTorch's broadcast multiply. Each is timed as
the median of CUDA-event timings of 50 calls after warm-up, and reported as GB/s (bytes read + written, the
least each pass must move) beside the device-to-device copy rate measured the same way.

    python benchmarks/triton_ops_bench.py --out results/triton_ops.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import env_info, log  # noqa: E402

from flowtok.nn import fused_dit, triton_ops  # noqa: E402


def cuda_ms(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256 * 77, help="rows per CFG group (batch x tokens)")
    p.add_argument("--width", type=int, default=1152)
    p.add_argument("--hidden", type=int, default=4608)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    if not torch.cuda.is_available() or not triton_ops.available(torch.zeros(1, device=device)):
        raise SystemExit("needs a CUDA GPU and Triton")
    dtype, g, r, d = torch.bfloat16, 2, args.rows, args.width
    x = torch.randn(g, r, d, device=device, dtype=dtype)
    pending, shift, scale = (0.1 * torch.randn(g, 1, d, device=device, dtype=dtype) for _ in range(3))
    moved = 2 * x.numel() * x.element_size()  # read x, write y

    def gbs(ms: float, nbytes: int) -> float:
        return nbytes / ms / 1e6

    items: dict[str, dict] = {}
    src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src))
    items["device copy"] = {"ms": ms, "gb_s": gbs(ms, moved)}

    ref = fused_dit._modulated_layer_norm_eager(x, pending, shift, scale, 1e-6)
    ms = cuda_ms(lambda: fused_dit._modulated_layer_norm_eager(x, pending, shift, scale, 1e-6))
    items["layernorm+modulate eager"] = {"ms": ms, "gb_s": gbs(ms, moved)}
    compiled = torch.compile(fused_dit._modulated_layer_norm_eager, dynamic=False, fullgraph=True)
    ms = cuda_ms(lambda: compiled(x, pending, shift, scale, 1e-6))
    items["layernorm+modulate inductor"] = {"ms": ms, "gb_s": gbs(ms, moved)}
    out = triton_ops.add_layer_norm_modulate(x, pending, shift, scale, 1e-6)
    err = float((out.float() - ref.float()).abs().max())
    ms = cuda_ms(lambda: triton_ops.add_layer_norm_modulate(x, pending, shift, scale, 1e-6))
    block_d = 1 << (d - 1).bit_length()
    items["layernorm+modulate triton (default)"] = {"ms": ms, "gb_s": gbs(ms, moved), "max_abs_diff_vs_eager": err,
                                                    "rows_warps": list(triton_ops._rows_per_program(block_d))}
    y = torch.empty_like(x)
    xs, ps, shs, scs = x, pending.reshape(g, d), shift.reshape(g, d).contiguous(), scale.reshape(g, d).contiguous()
    for rows_per in (1, 2, 4, 8):
        for warps in (2, 4, 8, 16):
            def launch(rows_per: int = rows_per, warps: int = warps) -> None:
                grid = ((g * r + rows_per - 1) // rows_per,)
                triton_ops._add_layer_norm_modulate_kernel[grid](xs, ps, shs, scs, y, g * r, r, d, 1e-6,
                                                                 BLOCK_D=block_d, ROWS=rows_per, MODULATE=True,
                                                                 num_warps=warps)
            try:
                ms = cuda_ms(launch, iters=20)
            except Exception as exc:  # noqa: BLE001 - a configuration that does not fit is recorded, not fatal
                items[f"layernorm+modulate triton rows{rows_per} warps{warps}"] = {"error": str(exc)[:200]}
                continue
            items[f"layernorm+modulate triton rows{rows_per} warps{warps}"] = {"ms": ms, "gb_s": gbs(ms, moved)}

    w = torch.randn(d, args.hidden, device=device, dtype=dtype)
    gate = torch.randn(g, d, device=device, dtype=dtype)
    fold_bytes = w.numel() * w.element_size() * (1 + g)
    ms = cuda_ms(lambda: w.unsqueeze(0) * gate.unsqueeze(2))
    items["gate fold torch"] = {"ms": ms, "gb_s": gbs(ms, fold_bytes)}
    same = bool(torch.equal(triton_ops.scale_rows(w, gate), w.unsqueeze(0) * gate.unsqueeze(2)))
    ms = cuda_ms(lambda: triton_ops.scale_rows(w, gate))
    items["gate fold triton"] = {"ms": ms, "gb_s": gbs(ms, fold_bytes), "equal_to_torch": same}
    for name, item in items.items():
        log(f"{name:<45} " + (f"{item['ms'] * 1e3:8.1f} us {item['gb_s']:7.0f} GB/s" if "ms" in item
                              else item["error"]))
    data = {"env": env_info(device), "shapes": {"groups": g, "rows": r, "width": d, "hidden": args.hidden},
            "items": items}
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1))
    return data


if __name__ == "__main__":
    main()
