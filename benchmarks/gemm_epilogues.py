"""The flow's GEMMs whose epilogues do more than add a bias, alone: fc1 with its tanh-GELU, and the FP8 output
Linear (fc2) with its gated residual add. Which kernel computes each fastest at FlowTok-XL's shape?

On one H200 (the fused path's profile of 2026-12-04) cuBLASLt's GEMM with the GELU epilogue
(``torch._addmm_activation``, what the fused path runs) took 0.755 ms a call at batch 256 with CFG
(39,424 x 1,152 -> 4,608): 555 TFLOP/s, against about 630 for qkv's GEMM with a bias epilogue in the same profile.
That gap is about 4% of the flow's time. Timed here with CUDA events (the median call, by ``fp8_gemm.timer``), each
against the same inputs, its output checked against fp32. fc1 + GELU:

* ``addmm, bias epilogue``: the same GEMM without the GELU, the rate to reach;
* ``cuBLASLt GELU epilogue``: what the fused path runs (``gemm_epilogues="pytorch"``);
* ``addmm then GELU in place``: two kernels;
* ``inductor``: ``GELU(linear)`` compiled by ``torch.compile``, default mode and ``max-autotune-no-cudagraphs``
  (Triton GEMM templates with the GELU fused, against cuBLAS, picked by timing; persistent TMA templates on);
* ``triton linear_gelu``: flowtok's kernel (``gemm_epilogues="triton"``) at its default launch and others, its tiles
  loaded through tensor descriptors (TMA) and by pointers (ten launches).

Then the same in FP8 (static per-tensor scales, as the fused path's FP8 blocks with calibrated scales; on a GPU
with FP8 matmuls, or under Triton's interpreter): ``_scaled_mm`` with its bias epilogue alone; ``_scaled_mm`` then
the GELU and fc2's e4m3 quantisation in one compiled pass (what the fused FP8 path runs); ``linear_gelu`` on the e4m3
operands writing fc2's e4m3 input itself, at eight launch shapes.

fc2 (4,608 -> 1,152) into the residual stream of two CFG groups, ``x[g] += gate[g] * (a @ W^T + b)``:

* bf16, ``cuBLAS baddbmm``: the gate folded into the weight per group, one batched GEMM accumulating into the
  stream (what the fused path runs for a plain fc2; the fold not timed); ``triton linear_residual`` at two launches;
* FP8: ``_scaled_mm then addcmul_`` (what the fused path runs for an FP8 fc2), and ``triton linear_residual``
  reading and writing the stream in its epilogue, at eight launch shapes.

The FP8 rows are checked against the same arithmetic on the dequantised operands in fp32; their TFLOP/s are FP8
FLOPs.

    python benchmarks/gemm_epilogues.py --out results/gemm_epilogues.json   # one GPU, a few minutes (max-autotune)
    python benchmarks/gemm_epilogues.py --device cpu --rows 512            # checks the script (no Triton rows)
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
from flowtok.nn.fp8 import E4M3_MAX, fp8_supported, quantize_tensor, to_e4m3  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages): the default first, then wider, narrower and deeper tiles, and
# last those small enough for two blocks an SM (one block's epilogue then overlaps the other's main loop;
# kernel_compile.py estimates the blocks an SM)
LAUNCHES = [triton_ops.LINEAR_LAUNCH, (128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 3),
            (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 4), (128, 256, 32, 8, 8, 5), (64, 256, 64, 8, 4, 4),
            (128, 128, 128, 8, 8, 3), (128, 128, 64, 8, 4, 3), (128, 128, 64, 8, 8, 3)]
LAUNCHES_FP8 = [triton_ops.LINEAR_LAUNCH_FP8, (128, 256, 128, 8, 8, 4), (128, 128, 128, 8, 4, 4),
                (128, 128, 128, 8, 8, 4), (256, 128, 128, 8, 8, 3), (128, 256, 64, 8, 8, 4),
                (128, 128, 128, 8, 4, 3), (128, 256, 128, 8, 8, 2)]
Check = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> (output, fp32 reference)


def launch_name(launch: tuple[int, ...], load: str) -> str:
    return f"{load} {'x'.join(map(str, launch[:3]))} g{launch[3]} w{launch[4]} s{launch[5]}"


def loads_for(x: torch.Tensor) -> tuple[str, ...]:
    """Tiles through tensor descriptors (TMA: Hopper and newer, and the interpreter) and by pointer loads."""
    return ("tma", "ptr") if not x.is_cuda or torch.cuda.get_device_capability(x.device) >= (9, 0) else ("ptr",)


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
    results = Results(args.out, env_info(device), vars(args))
    results.data["env"]["bf16_mm_tflops"] = matmul_tflops(device, n=256 if device.type != "cuda" else 8192)
    budget = Budget(None)
    flops = 2 * args.rows * args.width * args.hidden

    def item(name: str, fn: Callable[[], Any], check: Check, **tags: Any) -> None:
        def measure() -> dict[str, Any]:
            with torch.no_grad():
                out, target = check()
                err = float((out.float() - target).norm() / target.norm())
                seconds = timer(device, 3, args.calls)(fn)
            tflops = flops / seconds / 1e12
            return {"us": 1e6 * seconds, "tflops": tflops, "rel_err": err,
                    "frac_of_mm": tflops / results.data["env"]["bf16_mm_tflops"]}

        results.run(name, measure, device, budget, **tags)

    gen = torch.Generator().manual_seed(0)
    fc1_items(args, device, dtype, gen, item)
    fc2_items(args, device, dtype, gen, item)
    results.save()
    for it in results.data["items"]:
        if it.get("status") == "ok":
            log(f"{it['name']:<56} {it['us']:8.1f} us  {it['tflops']:6.1f} TFLOP/s  err {it['rel_err']:.2e}")
        else:
            log(f"{it['name']:<56} {it.get('status')}: {it.get('error', '')[:200]}")
    return results.data


def fc1_items(args, device: torch.device, dtype: torch.dtype, gen: torch.Generator,
              item: Callable[..., None]) -> None:
    """fc1 and its GELU: the bf16 (fp32 on a CPU) rows, then the FP8 ones."""
    m, k, n = args.rows, args.width, args.hidden
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
    b = (0.1 * torch.randn(n, generator=gen)).to(device, dtype)
    with torch.no_grad():
        product = F.linear(x.float(), w.float(), b.float())
        ref = F.gelu(product, approximate="tanh")

    def plain(fn: Callable[[], torch.Tensor], target: torch.Tensor = ref) -> Check:
        return lambda: (fn(), target)

    def gelu_after(y: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.gelu_(y, approximate="tanh")

    def bias_only() -> torch.Tensor:
        return torch.addmm(b, x, w.t())

    def epilogue() -> torch.Tensor:
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)

    def two_kernels() -> torch.Tensor:
        return gelu_after(torch.addmm(b, x, w.t()))

    item("fc1 addmm, bias epilogue (no GELU)", bias_only, plain(bias_only, product), gemm="fc1")
    item("fc1 cuBLASLt GELU epilogue (_addmm_activation)", epilogue, plain(epilogue), gemm="fc1")
    item("fc1 addmm then GELU in place", two_kernels, plain(two_kernels), gemm="fc1")

    def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    if device.type == "cuda":
        compiled = torch.compile(linear_gelu, dynamic=False, fullgraph=True)
        item("fc1 inductor default", lambda: compiled(x, w, b), plain(lambda: compiled(x, w, b)), gemm="fc1")
        if args.autotune:
            import torch._inductor.config as inductor_config

            if hasattr(inductor_config.triton, "enable_persistent_tma_matmul"):
                inductor_config.triton.enable_persistent_tma_matmul = True
            tuned = torch.compile(linear_gelu, mode="max-autotune-no-cudagraphs", dynamic=False, fullgraph=True)
            item("fc1 inductor max-autotune", lambda: tuned(x, w, b), plain(lambda: tuned(x, w, b)), gemm="fc1")
    if triton_ops.available(x):
        for launch in LAUNCHES:
            for load in loads_for(x):
                def kernel(launch=launch, load=load) -> torch.Tensor:
                    return triton_ops.linear_gelu(x, w, b, launch, tma=load == "tma")

                item(f"fc1 triton linear_gelu {launch_name(launch, load)}", kernel, plain(kernel), gemm="fc1",
                     launch=list(launch), loads=load)
    cuda_fp8 = fp8_supported(device)
    if not cuda_fp8 and not triton_ops.available_fp8(x):
        return
    (qx, sx), (qw, sw) = quantize_tensor(x), quantize_tensor(w)
    with torch.no_grad():
        product = (qx.float() * sx) @ (qw.float() * sw).t() + b.float()
        ref = F.gelu(product, approximate="tanh")
    out_scale = (ref.abs().amax() / E4M3_MAX).float()

    def dequantised(fn: Callable[[], torch.Tensor]) -> Check:
        return lambda: (fn().float() * out_scale, ref)

    if cuda_fp8:
        b16 = b.to(torch.bfloat16)

        def scaled_mm() -> torch.Tensor:
            return torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw, bias=b16, out_dtype=torch.bfloat16,
                                    use_fast_accum=True)

        def gelu_quantize(y: torch.Tensor) -> torch.Tensor:
            return to_e4m3(F.gelu(y, approximate="tanh"), out_scale)

        quantize = torch.compile(gelu_quantize, dynamic=False, fullgraph=True)
        item("fc1 fp8 _scaled_mm, bias epilogue (no GELU)", scaled_mm, plain(scaled_mm, product), gemm="fc1")
        def two_passes() -> torch.Tensor:
            return quantize(scaled_mm())

        item("fc1 fp8 _scaled_mm then GELU + e4m3 (compiled)", two_passes, dequantised(two_passes), gemm="fc1")
    if triton_ops.available_fp8(x):
        for launch in LAUNCHES_FP8:
            for load in loads_for(x):
                def kernel8(launch=launch, load=load) -> torch.Tensor:
                    return triton_ops.linear_gelu(qx, qw, b, launch, tma=load == "tma", x_scale=sx, w_scale=sw,
                                                  out_scale=out_scale)

                item(f"fc1 fp8 triton linear_gelu -> e4m3 {launch_name(launch, load)}", kernel8,
                     dequantised(kernel8), gemm="fc1", launch=list(launch), loads=load)


def fc2_items(args, device: torch.device, dtype: torch.dtype, gen: torch.Generator,
              item: Callable[..., None]) -> None:
    """fc2 into the residual stream of two CFG groups: the bf16 rows, then the FP8 ones. Each timed call adds to a
    stream of its own; the check runs once on a fresh copy."""
    m, k, n = args.rows, args.hidden, args.width
    groups = 2
    stream0 = torch.randn(groups, m // groups, n, generator=gen).to(device, dtype)
    rows = groups * (m // groups)
    a = F.gelu(torch.randn(rows, k, generator=gen), approximate="tanh").to(device, dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
    b = (0.1 * torch.randn(n, generator=gen)).to(device, dtype)
    gate = (0.5 * torch.randn(groups, 3 * n, generator=gen)).to(device, dtype)[:, n:2 * n]  # an adaLN chunk
    folded = w.unsqueeze(0) * gate.unsqueeze(2)  # what the fused path's fold writes, once a step

    def expected(product: torch.Tensor) -> torch.Tensor:
        return stream0.float() + gate.float().unsqueeze(1) * product.view(groups, -1, n)

    ref = expected(F.linear(a.float(), w.float(), b.float()))

    def into(update: Callable[[torch.Tensor], Any], target: torch.Tensor, bias_after: bool = False) -> Check:
        def check() -> tuple[torch.Tensor, torch.Tensor]:
            s = stream0.clone()
            update(s)
            if bias_after:  # the fused path moves the gated bias to the next LayerNorm's pending vector
                s = s.float() + (gate.float() * b.float()).unsqueeze(1)
            return s, target
        return check

    timed = stream0.clone()

    def baddbmm(s: torch.Tensor) -> torch.Tensor:
        return s.baddbmm_(a.view(groups, -1, k), folded.transpose(1, 2))

    item("fc2 cuBLAS baddbmm into the stream (gate folded)", lambda: baddbmm(timed), into(baddbmm, ref, True),
         gemm="fc2")
    if triton_ops.available(a):
        for launch in LAUNCHES[:2]:
            load = loads_for(a)[0]

            def residual(s: torch.Tensor, launch=launch, load=load) -> None:
                triton_ops.linear_residual(s, a, w, b, gate, launch, tma=load == "tma")

            item(f"fc2 triton linear_residual {launch_name(launch, load)}", lambda residual=residual: residual(timed),
                 into(residual, ref), gemm="fc2", launch=list(launch), loads=load)
    cuda_fp8 = fp8_supported(device)
    if not cuda_fp8 and not triton_ops.available_fp8(a):
        return
    (qa, sa), (qw, sw) = quantize_tensor(a), quantize_tensor(w)
    ref = expected((qa.float() * sa) @ (qw.float() * sw).t() + b.float())
    if cuda_fp8:
        b16 = b.to(torch.bfloat16)

        def scaled_addcmul(s: torch.Tensor) -> torch.Tensor:
            y = torch._scaled_mm(qa, qw.t(), scale_a=sa, scale_b=sw, bias=b16, out_dtype=torch.bfloat16,
                                 use_fast_accum=True)
            return s.addcmul_(y.view(groups, -1, n), gate.unsqueeze(1))

        item("fc2 fp8 _scaled_mm then addcmul_", lambda: scaled_addcmul(timed), into(scaled_addcmul, ref),
             gemm="fc2")
    if triton_ops.available_fp8(a):
        for launch in LAUNCHES_FP8:
            for load in loads_for(a):
                def residual8(s: torch.Tensor, launch=launch, load=load) -> None:
                    triton_ops.linear_residual(s, qa, qw, b, gate, launch, tma=load == "tma", x_scale=sa,
                                               w_scale=sw)

                item(f"fc2 fp8 triton linear_residual {launch_name(launch, load)}",
                     lambda residual8=residual8: residual8(timed), into(residual8, ref), gemm="fc2",
                     launch=list(launch), loads=load)


if __name__ == "__main__":
    main()
