"""The fused DiT path's memory-bound passes alone, at FlowTok-XL's batch-256 CFG shapes, on one GPU.

For ``LayerNorm(x + pending) * (1 + scale) + shift`` over ``x [2, 256 * 77, 1152]`` (bf16): flowtok's Triton
kernel at its default launch configuration and at the others of a small grid (rows per program x warps),
against the same function compiled by inductor and in eager PyTorch. For the gate fold ``diag(gate_g) W`` of
fc2 (``W [1152, 4608]``, two groups, the gated bias added to the pending vector): the Triton kernel against
PyTorch's ops, ten folds in a CUDA graph as the sampler runs them. Each is timed as the median of CUDA-event
timings of 50 calls after warm-up, and reported as GB/s (bytes read + written, the
least each pass must move) beside the device-to-device copy rate measured the same way.

    python benchmarks/triton_ops_bench.py --out results/triton_ops.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import env_info, log  # noqa: E402
from fp8_gemm import timer  # noqa: E402

from flowtok.nn import fused_dit, triton_ops  # noqa: E402


def cuda_ms(fn, iters: int = 50) -> float:
    """Median milliseconds of ``iters`` CUDA-event-timed calls after 5 warm-up calls."""
    return 1e3 * timer(torch.device("cuda"), 5, iters)(fn)


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
    main_d, tail, rows_default, warps_default = triton_ops._launch_shape(d)
    items["layernorm+modulate triton (default)"] = {"ms": ms, "gb_s": gbs(ms, moved), "max_abs_diff_vs_eager": err,
                                                    "main_tail_rows_warps": [main_d, tail, rows_default,
                                                                             warps_default]}
    y = torch.empty_like(x)
    ps, shs, scs = pending.reshape(g, d), shift.reshape(g, d), scale.reshape(g, d)
    for rows_per in (1, 2, 4):
        for warps in (1, 2, 4, 8):
            def launch(rows_per: int = rows_per, warps: int = warps) -> None:
                grid = ((g * r + rows_per - 1) // rows_per,)
                triton_ops._add_layer_norm_modulate_kernel[grid](x, ps, d, shs, scs, d, y, ps, g * r, r, d, 1e-6,
                                                                 MAIN=main_d, TAIL=tail, ROWS=rows_per,
                                                                 MODULATE=True, QUANT=0, num_warps=warps)
            try:
                ms = cuda_ms(launch, iters=20)
            except Exception as exc:  # noqa: BLE001 - a configuration that does not fit is recorded, not fatal
                items[f"layernorm+modulate triton rows{rows_per} warps{warps}"] = {"error": str(exc)[:200]}
                continue
            items[f"layernorm+modulate triton rows{rows_per} warps{warps}"] = {"ms": ms, "gb_s": gbs(ms, moved)}

    # The fold inside a CUDA graph, as the sampler runs it (a lone launch is mostly the host's launch time).
    w = torch.randn(d, args.hidden, device=device, dtype=dtype)
    bias = torch.randn(d, device=device, dtype=dtype)
    gate = torch.randn(g, d, device=device, dtype=dtype)
    fold_bytes = w.numel() * w.element_size() * (1 + g)
    folds = {"torch": lambda: (w.unsqueeze(0) * gate.unsqueeze(2), pending + (gate * bias).unsqueeze(1)),
             "triton": lambda: triton_ops.fold_gate(w, bias, gate, pending)}
    same = bool(torch.equal(folds["triton"]()[0], folds["torch"]()[0]))
    for name, fold in folds.items():
        fold()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                fold()
        ms = cuda_ms(graph.replay) / 10
        items[f"gate fold {name} (graph)"] = {"ms": ms, "gb_s": gbs(ms, fold_bytes)}
    items["gate fold triton (graph)"]["equal_to_torch"] = same

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
