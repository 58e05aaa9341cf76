"""``fast_inference.py --fp8-flow``: the FlowTok-XL flow in FP8 through the fused path, beside bf16, in one run.

Issue 23 asks for the flow's rate in bf16 and for FP8 reported apart. The fused path
(:mod:`flowtok.nn.fused_dit`) runs FP8 blocks since 2026-12-04: the LayerNorm kernel writes qkv's and fc1's
input in e4m3, the GEMMs are ``torch._scaled_mm`` with static per-tensor scales, and each output Linear either
stays in bf16 (the gate folded in, the residual as the accumulator, as in bf16) or goes FP8 too (bias in the
epilogue, gate and residual in one pass after). Three forms (:data:`FORMS`): ``fp8s`` (all four Linears),
``fp8s-no-proj`` (proj in bf16), ``fp8s-in`` (qkv and fc1 only). Measured, in this order:

1. numerics: the LayerNorm kernel's e4m3 bytes against PyTorch's quantisers (:func:`check_kernel`); one CFG
   forward of the plain bf16 blocks, and of each form's plain and fused FP8 blocks, each against an fp32 copy;
   the fused FP8 path passes if it is no further from fp32 than the plain FP8 blocks are (x 1.1 + 1e-3);
2. the flow alone, 20 Euler steps with CFG and a CUDA graph, at ``--batch`` (256): fused bf16 (the baseline, in
   this run) and each fused FP8 form; TFLOP/s counted in the bf16 model's FLOPs ("bf16-equivalent") and its
   fraction of the bf16 ``mm`` rate;
   where Triton runs FP8, each form again with flowtok's Triton GEMMs doing the epilogues
   (``gemm_epilogues="triton"``: fc1's GELU written as fc2's e4m3 input, FP8 proj / fc2 adding their gated output
   into the stream; the numerics of item 1 check that path for every form too);
3. the 20-step pipeline at batch 64 and 256 (the fast path: fused flow, compiled decoder, one CUDA graph) with
   the fastest FP8 form and epilogues (``--gemm-epilogues`` may fix the epilogues), then with the decoder's
   blocks in FP8
   too, against the PixArt-alpha-shaped pipeline at its best in the same run;
4. if time is left: the flows at batch 64.

Static scales are calibrated on other inputs: a 20-step eager sampling call on 8 random latents (every t).
On a CPU (``--tiny``) FP8 is emulated: the script's checks, not its speed.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import Budget, Results, log

from flowtok.flow import FlowTransformer
from flowtok.nn import triton_ops
from flowtok.nn.fp8 import FP8Linear, fp8_supported
from flowtok.pipelines import FlowTokPipeline
from flowtok.sampling import euler_sample

# variant -> the block Linears in FP8 (``layers`` of FlowTransformer.quantize_fp8). An FP8 proj or fc2 costs a
# quantisation pass and a gated residual pass that its bf16 GEMM, accumulating into the stream, does not: proj's
# GEMM (1/12 of the block's FLOPs) may not save that back, fc2's (1/3) should.
FORMS = {"fp8s": ("qkv", "proj", "fc1", "fc2"), "fp8s-no-proj": ("qkv", "fc1", "fc2"), "fp8s-in": ("qkv", "fc1")}


def quantized(flow: FlowTransformer, form: str, device: torch.device, guidance: float) -> FlowTransformer:
    """A copy of ``flow`` with static FP8 scales calibrated on a 20-step sampling call of other latents."""
    cfg = flow.config
    x0 = torch.randn(8, cfg.num_tokens, cfg.in_channels, generator=torch.Generator().manual_seed(11))
    x0 = x0.to(device, flow.pos_embed.dtype)
    quant = copy.deepcopy(flow)  # (quantize_fp8 calibrates on the plain blocks, and refuses compiled ones)
    quant.quantize_fp8(emulate=not fp8_supported(device), layers=FORMS[form],
                       calibrate=lambda: euler_sample(quant, x0, num_steps=20, guidance_scale=guidance))
    return quant


def check_numerics(flows: dict[str, FlowTransformer], device: torch.device) -> dict[str, Any]:
    """One CFG forward (batch 8 -> 16 rows): plain bf16, plain and fused FP8 blocks, each against fp32."""
    from fast_inference import cfg_inputs

    base = flows["bf16"]
    x, t, ind = cfg_inputs(base, device)
    b = x.shape[0] // 2
    ref32 = copy.deepcopy(base).float()
    dtype = base.pos_embed.dtype

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    out: dict[str, Any] = {}
    with torch.no_grad():
        ref = ref32(x, t.expand(2 * b), ind)
        del ref32
        out["plain_bf16_vs_fp32"] = rel(base(x.to(dtype), t.expand(2 * b), ind), ref)
        for form in FORMS:
            flow = flows[form]
            min_rows = flow.fused_min_rows
            flow.disable_fused_inference()
            plain = flow(x.to(dtype), t.expand(2 * b), ind)
            flow.enable_fused_inference(min_rows=0)
            fused = flow.forward_grouped(x.to(dtype), t, (0, 1))
            flow.enable_fused_inference(min_rows=0, gemm_epilogues="triton")  # as "pytorch" where Triton does not run
            fused_triton_epilogues = flow.forward_grouped(x.to(dtype), t, (0, 1))
            flow.enable_fused_inference(min_rows=0)
            flow.fused_min_rows = min_rows
            out[f"plain_{form}_vs_fp32"] = rel(plain, ref)
            out[f"fused_{form}_vs_fp32"] = rel(fused, ref)
            out[f"fused_vs_plain_{form}"] = rel(fused, plain)
            out[f"fused_triton_epilogues_{form}_vs_fp32"] = rel(fused_triton_epilogues, ref)
            bound = 1.1 * out[f"plain_{form}_vs_fp32"] + 1e-3
            out[f"pass_{form}"] = out[f"fused_{form}_vs_fp32"] <= bound and \
                out[f"fused_triton_epilogues_{form}_vs_fp32"] <= bound
    out["pass"] = all(out[f"pass_{form}"] for form in FORMS)
    return out


def check_kernel(device: torch.device, dtype: torch.dtype, width: int, rows: int = 4928) -> dict[str, Any]:
    """The LayerNorm kernel's e4m3 output against PyTorch's quantisers on the same rows (2 groups x ``rows`` x
    ``width``; 4,928 rows: batch 64 x 77 tokens; static and per-row scales): the share of equal bytes and the
    largest gap in e4m3 steps. Skipped where the kernel does not run (no Triton, or no FP8)."""
    from flowtok.nn import triton_ops
    from flowtok.nn.fp8 import E4M3_MAX, quantize_rows, to_e4m3

    gen = torch.Generator().manual_seed(5)
    x = (3 * torch.randn(2, rows, width, generator=gen) + 1).to(device, dtype)
    if not triton_ops.available_fp8(x):
        return {"skipped": "the e4m3 LayerNorm kernel does not run here"}
    pending, shift, scale = (torch.randn(2, 1, width, generator=gen).to(device, dtype) for _ in range(3))
    y = (torch.nn.functional.layer_norm(x.float() + pending.float(), (width,), eps=1e-6) * (1 + scale.float())
         + shift.float()).reshape(-1, width)
    static = (y.abs().amax() / 2 / E4M3_MAX).float()

    def compare(q: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
        q, ref = q.reshape(ref.shape).float(), ref.float()
        step = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp(min=2 ** -6))) - 3)
        return {"equal": float((q == ref).float().mean()), "max_steps": float(((q - ref).abs() / step).max())}

    out: dict[str, Any] = {}
    q, _ = triton_ops.add_layer_norm_modulate_fp8(x, pending, shift, scale, 1e-6, static)
    out["static"] = compare(q, to_e4m3(y, static))
    q, s = triton_ops.add_layer_norm_modulate_fp8(x, pending, shift, scale, 1e-6, None)
    ref_q, ref_s = quantize_rows(y)
    out["rows"] = {**compare(q, ref_q), "scale_rel_err": float(((s - ref_s).abs() / ref_s).max())}
    out["pass"] = all(v["equal"] > 0.999 and v["max_steps"] <= 1 for v in (out["static"], out["rows"]))
    return out


def run(flow: FlowTransformer, projector, tokenizer, args, shapes, device: torch.device, dtype: torch.dtype,
        results: Results, budget: Budget) -> None:
    """The items of the module docstring, timed by fast_inference.py's own measuring code."""
    import fast_inference as fi

    flow.enable_fused_inference(min_rows=args.min_rows)
    flows: dict[str, FlowTransformer] = {"bf16": flow}
    for form in FORMS:
        if results.run(f"quantize flow {form}", lambda form=form: _quantize_item(flows, flow, form, args, device),
                       device, budget, args.reserve, part="setup") is None:
            return
    results.run("fp8 layernorm kernel", lambda: check_kernel(device, dtype, flow.config.width), device, budget,
                args.reserve, part="numerics")
    results.run("fused fp8 numerics FlowTok-XL", lambda: check_numerics(flows, device), device, budget, args.reserve,
                part="numerics")
    per_sample = fi.flow_flops(flow, device, dtype)  # the bf16 model's FLOPs: FP8 rates are bf16-equivalent
    measures = {name: fi.flow_measurer(f, per_sample, args, device, dtype, results) for name, f in flows.items()}

    def flow_rows(batch: int) -> dict[str, float]:
        rates = {}
        for name, measure in measures.items():
            variant = "fused+graph" if name == "bf16" else f"fused {name}+graph"
            item = results.run(f"flow {variant} b{batch}", lambda measure=measure, variant=variant:
                               measure(variant, batch), device, budget, args.reserve, part="flow", variant=variant,
                               batch=batch, fp8=name != "bf16")
            if item is not None:
                rates[name] = item["images_per_s"]
        return rates

    rates = {(k, "pytorch"): v for k, v in flow_rows(args.batch).items() if k != "bf16"}
    if not rates:
        return
    if triton_ops.available_fp8(torch.empty(0, device=device)) and args.gemm_epilogues != "pytorch":
        for form in FORMS:  # each form with its GEMM epilogues in flowtok's Triton GEMMs (gemm_epilogues="triton")
            flows[form].enable_fused_inference(min_rows=args.min_rows, gemm_epilogues="triton")
            variant = f"fused {form} triton-epilogues+graph"
            item = results.run(f"flow {variant} b{args.batch}", lambda form=form, variant=variant:
                               measures[form](variant, args.batch), device, budget, args.reserve, part="flow",
                               variant=variant, batch=args.batch, fp8=True)
            if item is not None:
                rates[(form, "triton")] = item["images_per_s"]
            flows[form].enable_fused_inference(min_rows=args.min_rows)  # the rows below: PyTorch's epilogues
    if args.gemm_epilogues != "faster":  # the epilogues fixed: the fastest form with them
        rates = {k: v for k, v in rates.items() if k[1] == args.gemm_epilogues} or rates
    best, epilogues = max(rates, key=lambda k: rates[k])
    flows[best].enable_fused_inference(min_rows=args.min_rows, gemm_epilogues=epilogues)
    log(f"the fastest FP8 flow at batch {args.batch}: {best}, GEMM epilogues {epilogues}")
    args.epilogue_choice = epilogues  # what fast_inference.quantize_decoder turns the fast path on with
    log(f"the FP8 flow's GEMM epilogues from here on: {epilogues}")
    with tempfile.TemporaryDirectory() as folder:
        encoder = fi.clip_encoder(shapes, device, dtype, Path(folder))
    pipe = FlowTokPipeline(tokenizer, encoder, projector, flows[best])
    pipe.enable_fast_inference(fused_flow=True, gemm_epilogues=epilogues)
    flows[best].enable_fused_inference(min_rows=args.min_rows, gemm_epilogues=epilogues)
    variant = f"fast+{best}-flow" + ("+triton-epilogues" if epilogues == "triton" else "")
    fi.pipeline_items(pipe, args, shapes, device, dtype, results, budget, variant=variant, parts=("pipelines",))
    fi.pixart_items(args, shapes, device, dtype, results, budget)
    if args.fp8_decoder and results.run("quantize decoder fp8", lambda: fi.quantize_decoder(pipe, args, device),
                                        device, budget, args.reserve_compile, part="setup") is not None:
        fi.pipeline_items(pipe, args, shapes, device, dtype, results, budget, variant=f"{variant}+fp8-decoder",
                          parts=("pipelines",))
    small = min(args.pipeline_batches)
    if small != args.batch:
        flows[best].enable_fused_inference(min_rows=args.min_rows)  # each form as labelled: PyTorch's epilogues
        flow_rows(small)


def _quantize_item(flows: dict[str, FlowTransformer], flow: FlowTransformer, form: str, args,
                   device: torch.device) -> dict[str, Any]:
    quant = quantized(flow, form, device, args.guidance)
    quant.enable_fused_inference(min_rows=args.min_rows)
    flows[form] = quant
    layers = [m for m in quant.blocks.modules() if isinstance(m, FP8Linear)]
    return {"fp8_layers": len(layers), "static": all(m.static for m in layers),
            "emulated": any(m.emulate for m in layers), "layers": list(FORMS[form])}
