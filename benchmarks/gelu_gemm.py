"""The flow's fc1 and its tanh-GELU alone: which GEMM computes ``GELU(x @ W^T + b)`` fastest at FlowTok-XL's shape?

On one H200 (the fused path's profile of 2026-12-04) cuBLASLt's GEMM with the GELU epilogue
(``torch._addmm_activation``, what the fused path runs) took 0.755 ms a call at batch 256 with CFG
(39,424 x 1,152 -> 4,608): 555 TFLOP/s, against about 630 for qkv's GEMM with a bias epilogue in the same profile.
That gap is about 4% of the flow's time. Timed here with CUDA events (the median call, by ``fp8_gemm.timer``), each
against the same inputs, its output checked against fp32:

* ``addmm, bias epilogue``: the same GEMM without the GELU, the rate to reach;
* ``cuBLASLt GELU epilogue``: what the fused path runs (``gelu_gemm="pytorch"``);
* ``addmm then GELU in place``: two kernels;
* ``inductor``: ``GELU(linear)`` compiled by ``torch.compile``, default mode and ``max-autotune-no-cudagraphs``
  (Triton GEMM templates with the GELU fused, against cuBLAS, picked by timing; persistent TMA templates on);
* ``triton linear_gelu``: flowtok's kernel (``gelu_gemm="triton"``) at its default launch and others, its tiles
  loaded through tensor descriptors (TMA) and by pointers.

Then the same in FP8 (static per-tensor scales, as the fused path's FP8 fc1 with calibrated scales; on a GPU with
FP8 matmuls): ``_scaled_mm`` with its bias epilogue alone; ``_scaled_mm`` then the GELU and fc2's e4m3
quantisation in one compiled pass (what the fused FP8 path runs); ``linear_gelu`` on the e4m3 operands writing
fc2's e4m3 input itself, at six launch shapes. Those rows are checked against the GELU of the dequantised product
in fp32; their TFLOP/s are FP8 FLOPs.

    python benchmarks/gelu_gemm.py --out results/gelu_gemm.json    # one GPU, a few minutes (max-autotune)
    python benchmarks/gelu_gemm.py --device cpu --rows 512         # checks the script (no Triton rows)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import Budget, Results, env_info, log, matmul_tflops, pick_device  # noqa: E402
from fp8_gemm import timer  # noqa: E402

from flowtok.nn import triton_ops  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages): the default first, then wider, narrower and deeper tiles
LAUNCHES_FP8 = [triton_ops.LINEAR_GELU_LAUNCH_FP8, (128, 256, 128, 8, 8, 4), (128, 128, 128, 8, 4, 4),
                (128, 128, 128, 8, 8, 4), (256, 128, 128, 8, 8, 3), (128, 256, 64, 8, 8, 4)]
LAUNCHES = [triton_ops.LINEAR_GELU_LAUNCH, (128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 3),
            (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 4), (128, 256, 32, 8, 8, 5), (64, 256, 64, 8, 4, 4),
            (128, 128, 128, 8, 8, 3)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--rows", type=int, default=512 * 77, help="tokens (FlowTok-XL at batch 256 with CFG: 39,424)")
    p.add_argument("--width", type=int, default=1152)
    p.add_argument("--hidden", type=int, default=4608)
    p.add_argument("--calls", type=int, default=30, help="timed calls (median; after 3 warm-ups)")
    p.add_argument("--no-autotune", dest="autotune", action="store_false", help="skip inductor's max-autotune")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m, k, n = args.rows, args.width, args.hidden
    results = Results(args.out, env_info(device), vars(args))
    results.data["env"]["bf16_mm_tflops"] = matmul_tflops(device, n=256 if device.type != "cuda" else 8192)
    budget = Budget(None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
    b = (0.1 * torch.randn(n, generator=gen)).to(device, dtype)
    with torch.no_grad():
        ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    flops = 2 * m * k * n

    def item(name: str, fn: Callable[[], torch.Tensor], gelu: bool = True, fp8_ref: dict[str, Any] | None = None,
             **tags: Any) -> None:
        def measure() -> dict[str, Any]:
            with torch.no_grad():
                out = fn()
                if fp8_ref is None:
                    target = ref if gelu else F.linear(x.float(), w.float(), b.float())
                else:  # against the dequantised operands' product; an e4m3 output dequantised by its scale
                    target = fp8_ref["gelu" if gelu else "product"]
                    out = out.float() * fp8_ref["scale"] if out.dtype == torch.float8_e4m3fn else out
                err = float((out.float() - target).norm() / target.norm())
                seconds = timer(device, 3, args.calls)(fn)
            tflops = flops / seconds / 1e12
            return {"us": 1e6 * seconds, "tflops": tflops, "rel_err": err,
                    "frac_of_mm": tflops / results.data["env"]["bf16_mm_tflops"]}

        results.run(name, measure, device, budget, **tags)

    item("addmm, bias epilogue (no GELU)", lambda: torch.addmm(b, x, w.t()), gelu=False)
    item("cuBLASLt GELU epilogue (_addmm_activation)",
         lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
    item("addmm then GELU in place", lambda: torch.ops.aten.gelu_(torch.addmm(b, x, w.t()), approximate="tanh"))

    def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    if device.type == "cuda":
        compiled = torch.compile(linear_gelu, dynamic=False, fullgraph=True)
        item("inductor default", lambda: compiled(x, w, b))
        if args.autotune:
            import torch._inductor.config as inductor_config

            if hasattr(inductor_config.triton, "enable_persistent_tma_matmul"):
                inductor_config.triton.enable_persistent_tma_matmul = True
            tuned = torch.compile(linear_gelu, mode="max-autotune-no-cudagraphs", dynamic=False, fullgraph=True)
            item("inductor max-autotune", lambda: tuned(x, w, b))
    if triton_ops.available(x):
        # tiles through tensor descriptors (TMA, Hopper and newer; the interpreter too) and by pointer loads
        loads = ("tma", "ptr") if not x.is_cuda or torch.cuda.get_device_capability(device) >= (9, 0) else ("ptr",)
        for launch in LAUNCHES:
            for load in loads:
                item(f"triton linear_gelu {load} {'x'.join(map(str, launch[:3]))} g{launch[3]} w{launch[4]} "
                     f"s{launch[5]}", lambda launch=launch, load=load: triton_ops.linear_gelu(
                         x, w, b, launch, tma=load == "tma"), launch=list(launch), loads=load)
    fp8_items(x, w, b, device, item)
    results.save()
    for it in results.data["items"]:
        if it.get("status") == "ok":
            log(f"{it['name']:<48} {it['us']:8.1f} us  {it['tflops']:6.1f} TFLOP/s  err {it['rel_err']:.2e}")
        else:
            log(f"{it['name']:<48} {it.get('status')}: {it.get('error', '')[:200]}")
    return results.data


def fp8_items(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, device: torch.device,
              item: Callable[..., None]) -> None:
    """The FP8 rows of the module docstring, where the device has FP8 matmuls (or Triton's interpreter runs)."""
    from flowtok.nn.fp8 import E4M3_MAX, fp8_supported, quantize_tensor, to_e4m3

    cuda_fp8 = fp8_supported(device)
    if not cuda_fp8 and not triton_ops.available_fp8(x):
        return
    (qx, sx), (qw, sw) = quantize_tensor(x), quantize_tensor(w)
    with torch.no_grad():
        product = (qx.float() * sx) @ (qw.float() * sw).t() + b.float()
        ref = F.gelu(product, approximate="tanh")
    out_scale = (ref.abs().amax() / E4M3_MAX).float()
    fp8_ref = {"gelu": ref, "product": product, "scale": out_scale}
    if cuda_fp8:
        b16 = b.to(torch.bfloat16)

        def scaled_mm() -> torch.Tensor:
            return torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw, bias=b16, out_dtype=torch.bfloat16,
                                    use_fast_accum=True)

        def gelu_quantize(y: torch.Tensor) -> torch.Tensor:
            return to_e4m3(F.gelu(y, approximate="tanh"), out_scale)

        quantize = torch.compile(gelu_quantize, dynamic=False, fullgraph=True)
        item("fp8 _scaled_mm, bias epilogue (no GELU)", scaled_mm, gelu=False, fp8_ref=fp8_ref)
        item("fp8 _scaled_mm then GELU + e4m3 (compiled)", lambda: quantize(scaled_mm()), fp8_ref=fp8_ref)
    if triton_ops.available_fp8(x):
        loads = ("tma", "ptr") if not x.is_cuda or torch.cuda.get_device_capability(device) >= (9, 0) else ("ptr",)
        for launch in LAUNCHES_FP8:
            for load in loads:
                item(f"fp8 triton linear_gelu -> e4m3 {load} {'x'.join(map(str, launch[:3]))} g{launch[3]} "
                     f"w{launch[4]} s{launch[5]}", lambda launch=launch, load=load: triton_ops.linear_gelu(
                         qx, qw, b, launch, tma=load == "tma", x_scale=sx, w_scale=sw, out_scale=out_scale),
                     fp8_ref=fp8_ref, launch=list(launch), loads=load)


if __name__ == "__main__":
    main()
