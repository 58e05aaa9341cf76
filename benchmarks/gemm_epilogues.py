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
* ``triton linear_gelu``: flowtok's kernel (``gemm_epilogues="triton"``) at ten launch shapes, each with its tiles
  loaded through tensor descriptors (TMA) and scheduled a program a tile (``tiles``), a program an SM
  (``persistent``: a tile's epilogue overlapping the next tile's loads) or a program an SM with warp
  specialisation (``persistent-ws``, 8 warps); the default launch also by pointer loads.

Then the same in FP8 (static per-tensor scales, as the fused path's FP8 blocks with calibrated scales; on a GPU
with FP8 matmuls, or under Triton's interpreter): ``_scaled_mm`` with its bias epilogue alone; ``_scaled_mm`` then
the GELU and fc2's e4m3 quantisation in one compiled pass (what the fused FP8 path runs); ``linear_gelu`` on the e4m3
operands writing fc2's e4m3 input itself, at eight launch shapes in the same forms.

fc2 (4,608 -> 1,152) into the residual stream of two CFG groups, ``x[g] += gate[g] * (a @ W^T + b)``:

* bf16, ``cuBLAS baddbmm``: the gate folded into the weight per group, one batched GEMM accumulating into the
  stream (what the fused path runs for a plain fc2; the fold not timed); ``triton linear_residual`` at its default
  launch in each form;
* FP8: ``_scaled_mm then addcmul_`` (what the fused path runs for an FP8 fc2), and ``triton linear_residual``
  reading and writing the stream in its epilogue, at eight launch shapes in each form.

Rows run in order of what they tell: what runs now and each kernel's default launch first, inductor's rows next
(max-autotune compiles for a minute or more), the launch sweeps last; a deadline (``--deadline`` or
``$BENCH_DEADLINE``) skips the rest.

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

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages): the default first, then the other candidates (wider,
# narrower and deeper tiles, and last those small enough for two blocks an SM, where one block's epilogue overlaps
# the other's main loop; kernel_compile.py estimates the blocks an SM)
_CANDIDATES = [(128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4),
               (128, 128, 64, 8, 8, 4), (128, 256, 32, 8, 8, 5), (64, 256, 64, 8, 4, 4), (128, 128, 128, 8, 8, 3),
               (128, 128, 64, 8, 4, 3), (128, 128, 64, 8, 8, 3)]
_CANDIDATES_FP8 = [(128, 256, 128, 8, 8, 3), (128, 256, 128, 8, 8, 4), (128, 128, 128, 8, 4, 4),
                   (128, 128, 128, 8, 8, 4), (256, 128, 128, 8, 8, 3), (128, 256, 64, 8, 8, 4),
                   (128, 128, 128, 8, 4, 3), (128, 256, 128, 8, 8, 2)]
LAUNCHES = [triton_ops.LINEAR_LAUNCH] + [c for c in _CANDIDATES if c != triton_ops.LINEAR_LAUNCH]
LAUNCHES_FP8 = [triton_ops.LINEAR_LAUNCH_FP8] + [c for c in _CANDIDATES_FP8 if c != triton_ops.LINEAR_LAUNCH_FP8]
Check = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> (output, fp32 reference)
Row = tuple[str, Callable[[], Any], Check, dict[str, Any]]  # name, timed call, check, tags
Form = tuple[tuple[int, ...], str, str]  # launch, loads ("tma" / "ptr"), schedule (triton_ops.LINEAR_SCHEDULES)


def forms(launches: list[tuple[int, ...]], device: torch.device) -> tuple[list[Form], list[Form]]:
    """The kernel forms to time, in two lists: the default launch in every form first (tiles loaded through TMA and
    by pointers, persistent, and warp-specialised at 8 warps), then the other launches (tiles through TMA,
    persistent, warp-specialised at 8 warps). TMA and the persistent schedules need Hopper (or the interpreter)."""
    hopper = device.type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)

    def of(launch: tuple[int, ...], first: bool) -> list[Form]:
        if not hopper:
            return [(launch, "ptr", "tiles")]
        out = [(launch, "tma", "tiles")] + ([(launch, "ptr", "tiles")] if first else [])
        out.append((launch, "tma", "persistent"))
        if launch[4] == 8:  # warp specialisation did not compile with 4 warps (Triton 3.6, kernel_compile.py)
            out.append((launch, "tma", "persistent-ws"))
        return out

    return of(launches[0], True), [f for launch in launches[1:] for f in of(launch, False)]


def form_name(form: Form) -> str:
    launch, load, schedule = form
    return f"{schedule} {load} {'x'.join(map(str, launch[:3]))} g{launch[3]} w{launch[4]} s{launch[5]}"


def kernel_rows(prefix: str, launches: list[tuple[int, ...]], device: torch.device, tags: dict[str, Any],
                row: Callable[[Form], tuple[Callable[[], Any], Check]],
                head_only: bool = False) -> tuple[list[Row], list[Row]]:
    """A kernel's rows in its :func:`forms`, ``row(form)`` giving the timed call and its check: (the default
    launch's rows, the other launches' rows; none of those if ``head_only``)."""
    head, rest = forms(launches, device)

    def rows(group: list[Form]) -> list[Row]:
        return [(f"{prefix} {form_name(form)}", *row(form),
                 {**tags, "launch": list(form[0]), "loads": form[1], "schedule": form[2]}) for form in group]

    return rows(head), [] if head_only else rows(rest)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--rows", type=int, default=512 * 77, help="tokens (FlowTok-XL at batch 256 with CFG: 39,424)")
    p.add_argument("--width", type=int, default=1152)
    p.add_argument("--hidden", type=int, default=4608)
    p.add_argument("--calls", type=int, default=30, help="timed calls (median; after 3 warm-ups)")
    p.add_argument("--no-autotune", dest="autotune", action="store_false", help="skip inductor's max-autotune")
    p.add_argument("--deadline", type=float, default=None, help="seconds from now; default $BENCH_DEADLINE")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = Results(args.out, env_info(device), vars(args))
    results.data["env"]["bf16_mm_tflops"] = matmul_tflops(device, n=256 if device.type != "cuda" else 8192)
    budget = Budget(args.deadline)
    flops = 2 * args.rows * args.width * args.hidden
    gen = torch.Generator().manual_seed(0)
    first, sweep, compiled = [], [], []
    for rows in (fc1_rows(args, device, dtype, gen), fc2_rows(args, device, dtype, gen)):
        first += rows[0]
        sweep += rows[1]
        compiled += rows[2]
    # what runs now and each kernel's default launch first, inductor next, the launch sweeps last: a deadline cuts
    # the least telling rows
    for name, fn, check, tags in first + compiled + sweep:
        def measure(fn: Callable[[], Any] = fn, check: Check = check) -> dict[str, Any]:
            with torch.no_grad():
                out, target = check()
                err = float((out.float() - target).norm() / target.norm())
                seconds = timer(device, 3, args.calls)(fn)
            tflops = flops / seconds / 1e12
            return {"us": 1e6 * seconds, "tflops": tflops, "rel_err": err,
                    "frac_of_mm": tflops / results.data["env"]["bf16_mm_tflops"]}

        results.run(name, measure, device, budget, reserve_s=5.0 if "inductor" not in name else 60.0, **tags)
    results.save()
    for it in results.data["items"]:
        if it.get("status") == "ok":
            log(f"{it['name']:<64} {it['us']:8.1f} us  {it['tflops']:6.1f} TFLOP/s  err {it['rel_err']:.2e}")
        else:
            log(f"{it['name']:<64} {it.get('status')}: {str(it.get('error', it.get('reason', '')))[:200]}")
    return results.data


def fc1_rows(args, device: torch.device, dtype: torch.dtype,
             gen: torch.Generator) -> tuple[list[Row], list[Row], list[Row]]:
    """fc1 and its GELU, bf16 (fp32 on a CPU) then FP8: (first rows, launch sweep, inductor rows)."""
    m, k, n = args.rows, args.width, args.hidden
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
    b = (0.1 * torch.randn(n, generator=gen)).to(device, dtype)
    with torch.no_grad():
        product = F.linear(x.float(), w.float(), b.float())
        ref = F.gelu(product, approximate="tanh")
    tags = {"gemm": "fc1"}

    def plain(fn: Callable[[], torch.Tensor], target: torch.Tensor = ref) -> Check:
        return lambda: (fn(), target)

    def bias_only() -> torch.Tensor:
        return torch.addmm(b, x, w.t())

    def epilogue() -> torch.Tensor:
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)

    def two_kernels() -> torch.Tensor:
        return torch.ops.aten.gelu_(torch.addmm(b, x, w.t()), approximate="tanh")

    first: list[Row] = [("fc1 addmm, bias epilogue (no GELU)", bias_only, plain(bias_only, product), tags),
                        ("fc1 cuBLASLt GELU epilogue (_addmm_activation)", epilogue, plain(epilogue), tags),
                        ("fc1 addmm then GELU in place", two_kernels, plain(two_kernels), tags)]
    sweep: list[Row] = []
    compiled: list[Row] = []

    def add_kernel_rows(prefix: str, launches: list[tuple[int, ...]], call: Callable[[Form], torch.Tensor],
                        check: Callable[[Callable[[], torch.Tensor]], Check]) -> None:
        def row(form: Form) -> tuple[Callable[[], Any], Check]:
            def fn() -> torch.Tensor:
                return call(form)

            return fn, check(fn)

        head, rest = kernel_rows(prefix, launches, device, tags, row)
        first.extend(head)
        sweep.extend(rest)

    if triton_ops.available(x):
        add_kernel_rows("fc1 triton linear_gelu", LAUNCHES, lambda f: triton_ops.linear_gelu(
            x, w, b, f[0], tma=f[1] == "tma", schedule=f[2]), plain)
    if device.type == "cuda":
        def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return F.gelu(F.linear(x, w, b), approximate="tanh")

        inductor = torch.compile(linear_gelu, dynamic=False, fullgraph=True)
        compiled.append(("fc1 inductor default", lambda: inductor(x, w, b), plain(lambda: inductor(x, w, b)), tags))
        if args.autotune:
            import torch._inductor.config as inductor_config

            if hasattr(inductor_config.triton, "enable_persistent_tma_matmul"):
                inductor_config.triton.enable_persistent_tma_matmul = True
            tuned = torch.compile(linear_gelu, mode="max-autotune-no-cudagraphs", dynamic=False, fullgraph=True)
            compiled.append(("fc1 inductor max-autotune", lambda: tuned(x, w, b), plain(lambda: tuned(x, w, b)),
                             tags))
    cuda_fp8 = fp8_supported(device)
    if not cuda_fp8 and not triton_ops.available_fp8(x):
        return first, sweep, compiled
    (qx, sx), (qw, sw) = quantize_tensor(x), quantize_tensor(w)
    with torch.no_grad():
        product8 = (qx.float() * sx) @ (qw.float() * sw).t() + b.float()
        ref8 = F.gelu(product8, approximate="tanh")
    out_scale = (ref8.abs().amax() / E4M3_MAX).float()

    def dequantised(fn: Callable[[], torch.Tensor]) -> Check:
        return lambda: (fn().float() * out_scale, ref8)

    if cuda_fp8:
        b16 = b.to(torch.bfloat16)

        def scaled_mm() -> torch.Tensor:
            return torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw, bias=b16, out_dtype=torch.bfloat16,
                                    use_fast_accum=True)

        def gelu_quantize(y: torch.Tensor) -> torch.Tensor:
            return to_e4m3(F.gelu(y, approximate="tanh"), out_scale)

        quantize = torch.compile(gelu_quantize, dynamic=False, fullgraph=True)

        def two_passes() -> torch.Tensor:
            return quantize(scaled_mm())

        first.append(("fc1 fp8 _scaled_mm, bias epilogue (no GELU)", scaled_mm, plain(scaled_mm, product8), tags))
        first.append(("fc1 fp8 _scaled_mm then GELU + e4m3 (compiled)", two_passes, dequantised(two_passes), tags))
    if triton_ops.available_fp8(x):
        add_kernel_rows("fc1 fp8 triton linear_gelu -> e4m3", LAUNCHES_FP8, lambda f: triton_ops.linear_gelu(
            qx, qw, b, f[0], tma=f[1] == "tma", x_scale=sx, w_scale=sw, out_scale=out_scale, schedule=f[2]),
            dequantised)
    return first, sweep, compiled


def fc2_rows(args, device: torch.device, dtype: torch.dtype,
             gen: torch.Generator) -> tuple[list[Row], list[Row], list[Row]]:
    """fc2 into the residual stream of two CFG groups, bf16 then FP8: (first rows, launch sweep, no inductor rows).
    Each timed call adds to a stream of its own; the check runs once on a fresh copy."""
    m, k, n = args.rows, args.hidden, args.width
    groups = 2
    stream0 = torch.randn(groups, m // groups, n, generator=gen).to(device, dtype)
    rows = groups * (m // groups)
    a = F.gelu(torch.randn(rows, k, generator=gen), approximate="tanh").to(device, dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
    b = (0.1 * torch.randn(n, generator=gen)).to(device, dtype)
    gate = (0.5 * torch.randn(groups, 3 * n, generator=gen)).to(device, dtype)[:, n:2 * n]  # an adaLN chunk
    folded = w.unsqueeze(0) * gate.unsqueeze(2)  # what the fused path's fold writes, once a step
    tags = {"gemm": "fc2"}

    def expected(product: torch.Tensor) -> torch.Tensor:
        return stream0.float() + gate.float().unsqueeze(1) * product.view(groups, -1, n)

    def into(update: Callable[[torch.Tensor], Any], target: torch.Tensor, bias_after: bool = False) -> Check:
        def check() -> tuple[torch.Tensor, torch.Tensor]:
            s = stream0.clone()
            update(s)
            if bias_after:  # the fused path moves the gated bias to the next LayerNorm's pending vector
                s = s.float() + (gate.float() * b.float()).unsqueeze(1)
            return s, target
        return check

    timed = stream0.clone()
    ref = expected(F.linear(a.float(), w.float(), b.float()))

    def baddbmm(s: torch.Tensor) -> torch.Tensor:
        return s.baddbmm_(a.view(groups, -1, k), folded.transpose(1, 2))

    first: list[Row] = [("fc2 cuBLAS baddbmm into the stream (gate folded)", lambda: baddbmm(timed),
                         into(baddbmm, ref, True), tags)]
    sweep: list[Row] = []

    def add_kernel_rows(prefix: str, launches: list[tuple[int, ...]], call: Callable[[torch.Tensor, Form], None],
                        target: torch.Tensor, head_only: bool = False) -> None:
        def row(form: Form) -> tuple[Callable[[], Any], Check]:
            def update(s: torch.Tensor) -> None:
                call(s, form)

            return (lambda: update(timed)), into(update, target)

        head, rest = kernel_rows(prefix, launches, device, tags, row, head_only)
        first.extend(head)
        sweep.extend(rest)

    if triton_ops.available(a):  # bf16: the default launch only (cuBLAS accumulating into the stream is the bar)
        add_kernel_rows("fc2 triton linear_residual", LAUNCHES, lambda s, f: triton_ops.linear_residual(
            s, a, w, b, gate, f[0], tma=f[1] == "tma", schedule=f[2]), ref, head_only=True)
    cuda_fp8 = fp8_supported(device)
    if not cuda_fp8 and not triton_ops.available_fp8(a):
        return first, sweep, []
    (qa, sa), (qw, sw) = quantize_tensor(a), quantize_tensor(w)
    ref8 = expected((qa.float() * sa) @ (qw.float() * sw).t() + b.float())
    if cuda_fp8:
        b16 = b.to(torch.bfloat16)

        def scaled_addcmul(s: torch.Tensor) -> torch.Tensor:
            y = torch._scaled_mm(qa, qw.t(), scale_a=sa, scale_b=sw, bias=b16, out_dtype=torch.bfloat16,
                                 use_fast_accum=True)
            return s.addcmul_(y.view(groups, -1, n), gate.unsqueeze(1))

        first.append(("fc2 fp8 _scaled_mm then addcmul_", lambda: scaled_addcmul(timed), into(scaled_addcmul, ref8),
                      tags))
    if triton_ops.available_fp8(a):
        add_kernel_rows("fc2 fp8 triton linear_residual", LAUNCHES_FP8, lambda s, f: triton_ops.linear_residual(
            s, qa, qw, b, gate, f[0], tma=f[1] == "tma", x_scale=sa, w_scale=sw, schedule=f[2]), ref8)
    return first, sweep, []


if __name__ == "__main__":
    main()
