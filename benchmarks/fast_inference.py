"""Fast inference (issue 23) in one run: the fused DiT flow, the graphed pipelines, one-prompt latency.

Measured, in this order (a time budget skips the last ones first; the JSON is rewritten after each item):

1. the bf16 ``mm`` rate (8192^3, random data): the ceiling the flow is reported against;
2. the fused path's numerics on FlowTok-XL in bf16: relative error of one CFG forward against an fp32
   copy, fused and plain side by side, and whether cuBLASLt's GELU epilogue is tanh-GELU on this GPU;
3. the FlowTok-XL flow alone, 20 Euler steps with CFG at batch 256: plain blocks compiled + CUDA graph
   (the earlier best) against the fused path + CUDA graph: images/s, TFLOP/s, fraction of ``mm``; where Triton
   runs, the fused path again with fc1 and its GELU in flowtok's Triton GEMM (``gemm_epilogues="triton"``), and
   the pipelines below take the faster of the two (``--gemm-epilogues`` fixes one);
4. the one-step FlowTok-XL pipeline at batch 256: text states -> projector -> 1 step -> decoder -> uint8,
   one CUDA graph (``FastTextToImage.runner(from_states=True)``), the definition of the earlier pipeline rows;
5. one prompt -> one 256-px uint8 image on the host, 1 step, text encoder included (a random-weight CLIP-L
   text tower behind flowtok's CLIP tokenizer), one CUDA graph: median of 100 calls;
6. the 20-step FlowTok-XL pipeline (fast path) at batch 64 and 256, and its image decoder alone, against the
   PixArt-alpha-shaped diffusers pipeline at its best (transformer compiled + sampling loop as a CUDA graph, VAE
   decoder compiled, decoded in chunks of 64), both from text states, built by benchmarks/sampling.py;
6b. items 4-6 again with the decoder's blocks in FP8 (``pipe.quantize_decoder_fp8``, static scales calibrated
   on other prompts); ``--no-fp8-decoder`` skips them;
7. extras if time is left: the one-step pipeline at batch 256 from prompts (tokenisation + text encoder
   included), the fused flow at batch 64.

    python benchmarks/fast_inference.py --out results/fast.json      # the GPU run (benchmarks/run_fast_gpu.sh)
    python benchmarks/fast_inference.py --tiny --device cpu          # seconds on a CPU: checks the script

``--profile`` runs instead a kernel profile of the XL flow at batch 256, plain compiled against fused, and
variants of the fused path timed beside it (:mod:`fast_profile`); ``--fp8-flow`` the flow in FP8 through the fused
path beside bf16, and the 20-step pipelines with it against PixArt (:mod:`fast_fp8`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    Budget,
    Results,
    env_info,
    free_memory,
    log,
    matmul_tflops,
    mm_fractions,
    pick_device,
    sustained_matmul_tflops,
    sync,
    time_call,
)
from sampling import (  # noqa: E402
    SD_VAE_SCALE,
    PixArtVelocity,
    Shapes,
    build_flowtok,
    build_pixart,
    compile_pixart,
    count_forward_flops,
    t5_batch,
    tiny_shapes,
    to_uint8,
)

from flowtok.nn import triton_ops  # noqa: E402
from flowtok.nn.fused_dit import gelu_epilogue_is_tanh  # noqa: E402
from flowtok.pipelines import FlowTokPipeline, SamplingDefaults  # noqa: E402
from flowtok.sampling import GraphedSampler  # noqa: E402

PROMPT = "a red double-decker bus driving past a row of cherry trees in spring"


def clip_encoder(shapes: Shapes, device: torch.device, dtype: torch.dtype, folder: Path):
    """A random-weight CLIP text tower of CLIP-L/14's shape (tiny: a small one with CLIP's vocabulary) behind
    flowtok's CLIP BPE tokenizer, saved and loaded as a user's local CLIP folder would be."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from flowtok.text import CLIPTextEncoder

    if shapes.tiny:
        cfg = CLIPTextConfig(hidden_size=shapes.clip_dim, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=shapes.clip_len, vocab_size=49408)
    else:
        cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             max_position_embeddings=77, vocab_size=49408, projection_dim=768)
    cfg._attn_implementation = "sdpa"
    CLIPTextModel(cfg).save_pretrained(folder)
    return CLIPTextEncoder(folder, max_length=shapes.clip_len, device=device, dtype=dtype)


def settings(steps: int, guidance: float) -> SamplingDefaults:
    return SamplingDefaults(num_inference_steps=steps, guidance_scale=guidance)


def cfg_inputs(flow, device: torch.device, b: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The numerics checks' input: ``(x [2b, K, C], t, null indicators)`` of one CFG forward, b conditional then b
    null samples at t = 0.3, in fp32."""
    cfg = flow.config
    x = torch.randn(2 * b, cfg.num_tokens, cfg.in_channels, generator=torch.Generator().manual_seed(1)).to(device)
    ind = torch.cat([torch.zeros(b), torch.ones(b)]).long().to(device)
    return x, torch.tensor(0.3, device=device), ind


def check_numerics(flow, args, device: torch.device) -> dict[str, Any]:
    """One CFG forward (batch 8 -> 16 rows) in bf16, fused and plain, each against an fp32 copy."""
    x, t, ind = cfg_inputs(flow, device)
    b = x.shape[0] // 2
    ref32 = copy.deepcopy(flow).float()
    with torch.no_grad():
        ref = ref32(x, t.expand(2 * b), ind)
        plain = flow(x.to(flow.pos_embed.dtype), t.expand(2 * b), ind).float()
        min_rows, gemm_epilogues = flow.fused_min_rows, flow.fused_gemm_epilogues
        flow.enable_fused_inference(min_rows=0)
        fused = flow.forward_grouped(x.to(flow.pos_embed.dtype), t, (0, 1)).float()
        flow.enable_fused_inference(min_rows=0, gemm_epilogues="triton")  # the same where Triton does not run
        fused_triton_epilogues = flow.forward_grouped(x.to(flow.pos_embed.dtype), t, (0, 1)).float()
        flow.fused_min_rows, flow.fused_gemm_epilogues = min_rows, gemm_epilogues
        ref32.enable_fused_inference(min_rows=0)
        fused32 = ref32.forward_grouped(x, t, (0, 1))
    del ref32

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    out = {"fused_bf16_vs_fp32": rel(fused, ref), "plain_bf16_vs_fp32": rel(plain, ref),
           "fused_vs_plain_bf16": rel(fused, plain), "fused_fp32_vs_plain_fp32": rel(fused32, ref),
           "fused_triton_epilogues_bf16_vs_fp32": rel(fused_triton_epilogues, ref),
           "gelu_epilogue_tanh": gelu_epilogue_is_tanh(device, flow.pos_embed.dtype)}
    # bf16 tolerance: the fused path may not be further from fp32 than twice the plain bf16 path is.
    bound = 2 * out["plain_bf16_vs_fp32"] + 1e-3
    out["pass"] = out["fused_bf16_vs_fp32"] <= bound and out["fused_triton_epilogues_bf16_vs_fp32"] <= bound and \
        out["fused_fp32_vs_plain_fp32"] < 1e-4
    return out


def flow_flops(flow, device, dtype) -> float:
    """FLOPs of one sample's forward (counted on ``flow``'s plain bf16 blocks)."""
    cfg = flow.config
    x2 = torch.randn(2, cfg.num_tokens, cfg.in_channels, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return count_forward_flops(lambda: flow(x2, torch.rand(2, device=device), torch.tensor([0, 1], device=device))) / 2


def flow_measurer(flow, per_sample: float, args, device, dtype, results: Results):
    """``measure(variant, batch)``: ``flow`` sampling 20 Euler steps with CFG from one CUDA graph: images/s,
    TFLOP/s counted as ``per_sample`` FLOPs a forward (for an FP8 flow, the bf16 model's: bf16-equivalent) and
    the fractions of the ``mm`` rates."""
    cfg = flow.config
    gen = torch.Generator().manual_seed(0)

    def measure(variant: str, batch: int) -> dict[str, Any]:
        x0 = torch.randn(batch, cfg.num_tokens, cfg.in_channels, generator=gen).to(device, dtype)
        sampler = GraphedSampler(flow, num_steps=args.steps, guidance_scale=args.guidance, warmup=1)
        t = time_call(lambda: sampler(x0), device, args.warmup, args.iters, args.item_seconds)
        tflops = per_sample * 2 * batch * args.steps / t["median_s"] / 1e12
        return {**t, "images_per_s": batch / t["median_s"], "tflops": tflops,
                **mm_fractions(tflops, results.data["env"])}

    return measure


def flow_items(flow, args, shapes: Shapes, device, dtype, results: Results, budget: Budget):
    """Items 3; returns the measuring function for the extra at the end. Sets ``args.epilogue_choice``, the
    ``gemm_epilogues`` of the fused flow from here on: ``--gemm-epilogues``, or the faster of the two fused rows."""
    measure = flow_measurer(flow, flow_flops(flow, device, dtype), args, device, dtype, results)
    plain = "plain" if args.tiny else "compile+graph"
    if not args.tiny:
        flow.compile_blocks()
    flow.disable_fused_inference()
    results.run(f"flow {plain} b{args.batch}", lambda: measure(plain, args.batch), device, budget,
                args.reserve_compile, part="flow", variant=plain, batch=args.batch)
    flow.enable_fused_inference(min_rows=args.min_rows)
    rates = {}
    item = results.run(f"flow fused+graph b{args.batch}", lambda: measure("fused+graph", args.batch), device,
                       budget, args.reserve, part="flow", variant="fused+graph", batch=args.batch)
    rates["pytorch"] = item["images_per_s"] if item else 0.0
    if triton_ops.available(torch.empty(0, device=device)):
        flow.enable_fused_inference(min_rows=args.min_rows, gemm_epilogues="triton")
        variant = "fused triton-epilogues+graph"
        item = results.run(f"flow {variant} b{args.batch}", lambda: measure(variant, args.batch), device, budget,
                           args.reserve_compile, part="flow", variant=variant, batch=args.batch)
        rates["triton"] = item["images_per_s"] if item else 0.0
    faster = max(rates, key=lambda k: rates[k])
    args.epilogue_choice = faster if args.gemm_epilogues == "faster" else args.gemm_epilogues
    flow.enable_fused_inference(min_rows=args.min_rows, gemm_epilogues=args.epilogue_choice)
    log(f"the fused flow's GEMM epilogues from here on: {args.epilogue_choice}")
    return measure


PIPELINE_PARTS = ("one-step", "latency", "pipelines", "decoder")


def pipeline_items(pipe: FlowTokPipeline, args, shapes: Shapes, device, dtype, results: Results, budget: Budget,
                   variant: str = "fast", parts: tuple[str, ...] = PIPELINE_PARTS):
    """Items 4-6 (FlowTok's side), then the decoder alone; returns the from-prompts measurement for the extras.
    ``variant`` names the rows (``fast+fp8-decoder``: the same with the decoder's blocks in FP8); ``parts`` picks
    among the one-step pipeline, the latency, the ``--steps`` pipelines and the decoder."""
    fast = pipe.fast
    assert fast is not None
    gen = torch.Generator().manual_seed(2)
    k, c = shapes.clip_len, pipe.text_projector.config.latent_channels

    def from_states(steps: int, batch: int) -> dict[str, Any]:
        states = torch.randn(batch, k, shapes.clip_dim, generator=gen).to(device)
        mask = torch.ones(batch, k, dtype=torch.bool, device=device)
        run = fast.runner(settings(steps, args.guidance), uint8=True, from_states=True)

        def once() -> torch.Tensor:
            eps = torch.randn(batch, k, c, device=device, dtype=dtype)
            return run(states, mask, eps)

        t = time_call(once, device, args.warmup, args.iters, args.item_seconds)
        fast.reset()
        return {**t, "images_per_s": batch / t["median_s"]}

    def latency() -> dict[str, Any]:
        s = settings(1, args.guidance)
        out = fast.generate([PROMPT], s, uint8=True)
        assert out.shape[0] == 1 and out.dtype == torch.uint8
        for _ in range(args.warmup + 1):
            fast.generate([PROMPT], s, uint8=True).cpu()
        times = []
        for _ in range(args.latency_iters):
            sync(device)
            t0 = time.perf_counter()
            fast.generate([PROMPT], s, uint8=True).cpu()  # the image on the host: what a caller receives
            times.append(time.perf_counter() - t0)
        fast.reset()
        return {"median_ms": 1e3 * statistics.median(times), "p90_ms": 1e3 * sorted(times)[int(0.9 * len(times))],
                "min_ms": 1e3 * min(times), "iters": len(times), "text_encoder_in_graph": fast.text_encoder_in_graph}

    def from_prompts(batch: int) -> dict[str, Any]:
        prompts = [f"{PROMPT} {i}" for i in range(batch)]
        s = settings(1, args.guidance)
        t = time_call(lambda: fast.generate(prompts, s, uint8=True), device, args.warmup, args.iters,
                      args.item_seconds)
        fast.reset()
        return {**t, "images_per_s": batch / t["median_s"], "text_encoder_in_graph": fast.text_encoder_in_graph}

    def decoder(batch: int) -> dict[str, Any]:
        """The image decoder alone (its blocks compiled by the fast path, no graph): flow latents -> images."""
        tok = pipe.image_tokenizer
        lat = torch.randn(batch, *tok.latent_shape, generator=gen).to(device, dtype)
        states = torch.randn(batch, k, shapes.clip_dim, generator=gen).to(device, dtype)
        with torch.no_grad():
            t = time_call(lambda: tok.decode_from_flow(lat, states), device, args.warmup, args.iters,
                          args.item_seconds)
        return {**t, "images_per_s": batch / t["median_s"]}

    b, tag = args.batch, "" if variant == "fast" else f" {variant}"
    if "one-step" in parts:
        results.run(f"flowtok pipeline 1-step b{b}{tag}", lambda: from_states(1, b), device, budget,
                    args.reserve_compile, model="FlowTok-XL", part="pipeline", variant=variant, steps=1, batch=b)
    if "latency" in parts:
        results.run(f"latency 1 prompt 1 step{tag}", latency, device, budget, args.reserve_compile,
                    model="FlowTok-XL", part="latency", variant=variant, steps=1, batch=1)
    if "pipelines" in parts:
        for batch in args.pipeline_batches:
            results.run(f"flowtok pipeline {args.steps}-step b{batch}{tag}",
                        lambda batch=batch: from_states(args.steps, batch), device, budget, args.reserve_compile,
                        model="FlowTok-XL", part="pipeline", variant=variant, steps=args.steps, batch=batch)
    if "decoder" in parts:
        results.run(f"decoder b{b}{tag}", lambda: decoder(b), device, budget, args.reserve_compile,
                    model="FlowTok-XL", part="decoder", variant=variant, batch=b)
    return from_prompts


def quantize_decoder(pipe: FlowTokPipeline, args, device) -> dict[str, Any]:
    """The decoder's blocks to FP8 with static scales calibrated on 16 other prompts' 20-step images (the fast path
    is turned off for the calibration and on again after; emulated where the device has no FP8 matmuls)."""
    from flowtok.nn.fp8 import FP8Linear, fp8_supported

    pipe.disable_fast_inference()
    t0 = time.perf_counter()
    pipe.quantize_decoder_fp8(calibration_prompts=[f"calibration prompt {i}: {PROMPT}" for i in range(16)],
                              emulate=not fp8_supported(device))
    calibrate_s = time.perf_counter() - t0
    pipe.enable_fast_inference(fused_flow=True, gemm_epilogues=args.epilogue_choice)
    assert pipe.t2i_flow is not None
    pipe.t2i_flow.enable_fused_inference(min_rows=args.min_rows, gemm_epilogues=args.epilogue_choice)
    layers = [m for m in pipe.image_tokenizer.decoder.blocks.modules() if isinstance(m, FP8Linear)]
    return {"calibrate_s": calibrate_s, "fp8_layers": len(layers), "static": all(m.static for m in layers),
            "emulated": any(m.emulate for m in layers)}


def pixart_items(args, shapes: Shapes, device, dtype, results: Results, budget: Budget) -> None:
    try:
        transformer, vae = build_pixart(shapes, device, dtype)
    except ImportError as exc:
        log(f"[skip] PixArt side: {exc}")
        results.add({"name": "pixart", "status": "skipped", "reason": f"diffusers unavailable: {exc}"})
        return
    if not args.tiny:
        compile_pixart(transformer)
        vae.decoder.compile(dynamic=False)  # decoded in chunks of 64: one compiled shape for every batch
    gen = torch.Generator().manual_seed(3)
    size = shapes.pixart_kwargs()["sample_size"]
    variant = "plain" if args.tiny else "compile+graph"
    for batch in args.pipeline_batches:
        def whole(batch: int = batch) -> dict[str, Any]:
            velocity = PixArtVelocity(transformer, *t5_batch(batch, shapes, device, dtype, gen))
            sampler = GraphedSampler(velocity, num_steps=args.steps, guidance_scale=args.guidance, warmup=1)
            x0 = torch.randn(batch, 4, size, size, generator=gen).to(device, dtype)

            @torch.no_grad()
            def once() -> torch.Tensor:
                lat = sampler(x0) / SD_VAE_SCALE
                return torch.cat([to_uint8(vae.decode(lat[i:i + args.decode_chunk]).sample / 2 + 0.5)
                                  for i in range(0, batch, args.decode_chunk)])

            t = time_call(once, device, args.warmup, args.iters, args.item_seconds)
            return {**t, "images_per_s": batch / t["median_s"]}

        results.run(f"pixart pipeline {variant} b{batch}", whole, device, budget, args.reserve_compile,
                    model="pixart", part="pipeline", variant=variant, steps=args.steps, batch=batch)
        free_memory(device)


def summarise(results: Results) -> dict[str, Any]:
    ok = {i["name"]: i for i in results.data["items"] if i.get("status") == "ok"}
    out: dict[str, Any] = {}
    for item in ok.values():
        if item.get("part") == "pipeline" and item.get("model") == "FlowTok-XL" and item.get("steps", 1) > 1:
            other = next((o for o in ok.values() if o.get("model") == "pixart" and o["batch"] == item["batch"]), None)
            if other:
                tag = "" if item["variant"] == "fast" else f" {item['variant']}"
                out[f"pipeline FlowTok-XL{tag}/pixart b{item['batch']}"] = \
                    item["images_per_s"] / other["images_per_s"]
    flows = [i for i in ok.values() if i.get("part") == "flow"]
    for i in flows:
        out[f"flow {i['variant']} b{i['batch']} frac_of_mm"] = i.get("frac_of_mm")
        if i.get("frac_of_sustained_mm"):
            out[f"flow {i['variant']} b{i['batch']} frac_of_sustained_mm"] = i["frac_of_sustained_mm"]
    for i in ok.values():
        if i.get("part") == "profile":
            shares = ", ".join(f"{c} {v['share']:.1%}" for c, v in i["categories"].items())
            out[f"profile {i['variant']} b{i['batch']}"] = f"{shares}; GEMMs {i['gemm_tflops'] or 0:.0f} TFLOP/s"
    return out


def use_fastest_launches(path: str) -> dict[str, Any]:
    """Set :mod:`flowtok.nn.triton_ops`'s default GEMM launches and schedules to the fastest of a
    ``gemm_epilogues.py`` run (rows loaded through TMA): bf16 by fc1 + GELU alone (the only Triton GEMM of a bf16
    flow), e4m3 by fc1 + GELU and fc2 into the stream together (an FP8 flow runs both). Returns what was set."""
    import json

    items = [i for i in json.loads(Path(path).read_text())["items"]
             if i.get("status") == "ok" and i.get("loads") == "tma" and "launch" in i]

    def fastest(prefixes: tuple[str, ...]) -> tuple[tuple[int, ...], str] | None:
        totals: dict[tuple[tuple[int, ...], str], list[float]] = {}
        for prefix in prefixes:
            for i in items:
                if i["name"].startswith(prefix):
                    totals.setdefault((tuple(i["launch"]), i["schedule"]), []).append(i["us"])
        complete = {k: sum(v) for k, v in totals.items() if len(v) == len(prefixes)}
        return min(complete, key=lambda k: complete[k]) if complete else None

    chosen: dict[str, Any] = {}
    bf16 = fastest(("fc1 triton linear_gelu",))
    if bf16:
        triton_ops.LINEAR_LAUNCH, triton_ops.LINEAR_SCHEDULE = bf16
        chosen["bf16"] = {"launch": list(bf16[0]), "schedule": bf16[1]}
    fp8 = fastest(("fc1 fp8 triton linear_gelu", "fc2 fp8 triton linear_residual"))
    if fp8:
        triton_ops.LINEAR_LAUNCH_FP8, triton_ops.LINEAR_SCHEDULE_FP8 = fp8
        chosen["fp8"] = {"launch": list(fp8[0]), "schedule": fp8[1]}
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny shapes, no compile: checks the script on a CPU")
    p.add_argument("--batch", type=int, default=None, help="flow and one-step batch (default 256; tiny 3)")
    p.add_argument("--pipeline-batches", default=None, help="20-step pipeline batches (default 64,256; tiny 2,3)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps of the flow / pipeline rows (20; tiny 2)")
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--min-rows", type=int, default=4096, help="fused path from this many tokens per group")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3, help="timed calls at most ...")
    p.add_argument("--item-seconds", type=float, default=4.0, help="... and no more once this much is timed")
    p.add_argument("--latency-iters", type=int, default=100)
    p.add_argument("--decode-chunk", type=int, default=64, help="PixArt: images per VAE call")
    p.add_argument("--out", default=None, help="results JSON, rewritten after every item")
    p.add_argument("--deadline", type=float, default=None, help="seconds from now; default $BENCH_DEADLINE")
    p.add_argument("--reserve", type=float, default=15.0, help="seconds an item without compiling needs")
    p.add_argument("--reserve-compile", type=float, default=50.0, help="seconds an item that compiles needs")
    p.add_argument("--gemm-epilogues", choices=("pytorch", "triton", "faster"), default="faster",
                   help="the fused flow's GEMM epilogues in the pipeline rows: PyTorch's (cuBLASLt), flowtok's Triton "
                        "GEMM, or the faster of the two in this run's flow rows")
    p.add_argument("--gemm-launches", default=None, metavar="JSON",
                   help="a gemm_epilogues.py result: the Triton GEMMs' default launches and schedules become its "
                        "fastest (bf16: fc1's rows; e4m3: fc1's and fc2's together)")
    p.add_argument("--no-fp8-decoder", dest="fp8_decoder", action="store_false",
                   help="skip the rows with the decoder's blocks in FP8 (after PixArt's; emulated on a CPU)")
    p.add_argument("--fp8-flow", action="store_true",
                   help="instead: the flow in FP8 through the fused path, beside bf16, and the 20-step pipelines "
                        "with it against PixArt (fast_fp8.py)")
    p.add_argument("--profile", action="store_true", help="instead: the kernel profile and variants (fast_profile.py)")
    p.add_argument("--profile-steps", type=int, default=5, help="Euler steps per profiled call")
    p.add_argument("--profile-calls", type=int, default=2, help="profiled calls (after one warm-up call)")
    p.add_argument("--variants", default="no-epilogue,per-group,no-triton,fold-in",
                   help="fused-path variants to profile and time ('' none; fast_profile.VARIANTS lists them)")
    args = p.parse_args(argv)
    args.batch = args.batch or (3 if args.tiny else 256)
    args.pipeline_batches = [int(b) for b in (args.pipeline_batches or ("2,3" if args.tiny else "64,256")).split(",")]
    args.steps = args.steps or (2 if args.tiny else 20)
    # until the flow rows say which is faster
    args.epilogue_choice = "pytorch" if args.gemm_epilogues == "faster" else args.gemm_epilogues
    if args.tiny:
        args.min_rows = 0  # the tiny shapes would otherwise never take the fused path
        args.latency_iters = min(args.latency_iters, 3)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*truncated")  # the tiny CLIP's 8 positions cut the prompt
    device = pick_device(args.device)
    dtype = torch.bfloat16
    shapes = tiny_shapes() if args.tiny else Shapes(tiny=False)
    budget = Budget(args.deadline)
    results = Results(args.out, env_info(device), {k: v for k, v in vars(args).items() if k not in ("out",)})
    if args.gemm_launches:
        results.data["env"]["triton_gemm_defaults"] = use_fastest_launches(args.gemm_launches)
        log(f"Triton GEMM defaults from {args.gemm_launches}: {results.data['env']['triton_gemm_defaults']}")
    mm_rate = matmul_tflops(device, n=256 if args.tiny else 8192)
    results.data["env"]["bf16_mm_tflops"] = mm_rate
    log(f"bf16 mm rate: {mm_rate:.1f} TFLOP/s on {results.data['env'].get('gpu', device)}")
    if device.type == "cuda" and not args.tiny:
        # The flow runs for seconds at the clock the power limit allows; the burst above runs at the boost clock.
        sustained = sustained_matmul_tflops(device)
        results.data["env"]["bf16_mm_tflops_sustained"] = sustained
        log(f"bf16 mm rate sustained for 3 s: {sustained:.1f} TFLOP/s")

    flow, projector, tokenizer = build_flowtok("FlowTok-XL", shapes, device, dtype)
    if args.profile:
        import fast_profile

        fast_profile.run(flow, args, device, dtype, results, budget, mm_rate)
        return finish(results)
    if args.fp8_flow:
        import fast_fp8

        fast_fp8.run(flow, projector, tokenizer, args, shapes, device, dtype, results, budget)
        return finish(results)
    results.run("fused numerics FlowTok-XL", lambda: check_numerics(flow, args, device), device, budget,
                args.reserve, part="numerics")
    measure_flow = flow_items(flow, args, shapes, device, dtype, results, budget)

    with tempfile.TemporaryDirectory() as folder:
        encoder = clip_encoder(shapes, device, dtype, Path(folder))
    pipe = FlowTokPipeline(tokenizer, encoder, projector, flow)
    pipe.enable_fast_inference(fused_flow=True, gemm_epilogues=args.epilogue_choice)
    flow.enable_fused_inference(min_rows=args.min_rows, gemm_epilogues=args.epilogue_choice)
    variant = "fast" if args.epilogue_choice == "pytorch" else "fast+triton-epilogues"
    from_prompts = pipeline_items(pipe, args, shapes, device, dtype, results, budget, variant=variant)
    pixart_items(args, shapes, device, dtype, results, budget)
    if args.fp8_decoder:
        if results.run("quantize decoder fp8", lambda: quantize_decoder(pipe, args, device), device, budget,
                       args.reserve_compile, part="setup") is not None:
            pipeline_items(pipe, args, shapes, device, dtype, results, budget, variant=f"{variant}+fp8-decoder")
    results.run(f"flowtok pipeline 1-step b{args.batch} from prompts", lambda: from_prompts(args.batch),
                device, budget, args.reserve, model="FlowTok-XL", part="pipeline_prompts", variant="fast", steps=1,
                batch=args.batch)
    small = min(args.pipeline_batches)
    results.run(f"flow fused+graph b{small}", lambda: measure_flow("fused+graph", small), device, budget,
                args.reserve, part="flow", variant="fused+graph", batch=small)

    return finish(results)


def finish(results: Results) -> dict[str, Any]:
    results.data["summary"] = summarise(results)
    results.save()
    for key, value in results.data["summary"].items():
        log(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    return results.data


if __name__ == "__main__":
    main()
