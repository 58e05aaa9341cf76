"""Text-to-image throughput: FlowTok (B / XL / H) against a PixArt-alpha-shaped latent DiT, random weights.

Both sides run the same sampler (:func:`flowtok.sampling.euler_sample`, 20 Euler steps, CFG with the
conditional and null halves in one batch), in bf16, with the same optimisations offered:

* ``eager``          plain PyTorch (SDPA attention in both);
* ``graph``          the whole 20-step loop replayed as one CUDA graph (:class:`flowtok.sampling.GraphedSampler`);
* ``compile``        regional ``torch.compile`` of the repeated transformer block;
* ``compile+graph``  both;
* ``...+fp8``        any of these with the transformer blocks' Linears in FP8 (e4m3, rowwise scales,
  :mod:`flowtok.nn.fp8`; Hopper / Ada only), applied alike to both sides, with the velocity error of
  one forward against bf16 recorded;
* ``...+fp8s``       the same with static per-tensor scales calibrated on other inputs (all t).

Measured per model, batch and variant: images/s of the flow alone, its achieved TFLOP/s against the
bf16 ``mm`` rate measured in the same run, and peak memory; for the pipelines, images/s of
text latent -> image: FlowTok = text projector + flow + the paper's tokenizer decoder (reads the CLIP
states), PixArt = transformer (120 x 4096 T5 tokens with their mask, 32 x 32 x 4 latent, patch 2) +
SD VAE decoder. The frozen text encoders (CLIP-L/14 text, T5-XXL encoder) are timed apart: a prompt is
encoded once, and a server caches the null prompt.

    python benchmarks/sampling.py --out results/sampling.json             # the GPU run (see run_gpu.sh)
    python benchmarks/sampling.py --tiny --device cpu                     # seconds on a CPU: checks the script

The models of both sides are built in :mod:`sampling_models`. diffusers is a benchmark dependency only;
without it the PixArt side is recorded as skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Budget, Results, env_info, free_memory, log, matmul_tflops, pick_device, time_call  # noqa: E402
from sampling_models import PixArtVelocity, Shapes, build_flowtok, build_pixart, t5_batch, tiny_shapes  # noqa: E402

from flowtok.flow import flop_count  # noqa: E402
from flowtok.nn.fp8 import calibrate_input_amax, fp8_supported, quantize_linears  # noqa: E402
from flowtok.sampling import GraphedSampler, euler_sample  # noqa: E402

FLOWTOK_MODELS = ("FlowTok-B", "FlowTok-XL", "FlowTok-H")
PIXART = "pixart"
SD_VAE_SCALE = 0.18215


# ------------------------------------------------------------------------------------- variants
def compile_options(args) -> dict[str, Any]:
    """``torch.compile`` options of both sides: inductor's default mode unless --compile-mode says
    otherwise (max-autotune-no-cudagraphs: Triton GEMM templates with fused epilogues)."""
    return {"mode": args.compile_mode} if args.compile_mode else {}


def compile_pixart(transformer, **options: Any) -> None:
    # The same regional compile as FlowTransformer.compile_blocks; diffusers' block may not trace as a
    # single graph, so graph breaks are allowed here.
    for block in transformer.transformer_blocks:
        block.compile(dynamic=False, **options)


def fp8_kind(variant: str) -> str:
    """'' (bf16), 'fp8' (dynamic rowwise scales) or 'fp8s' (static calibrated scales)."""
    return "fp8s" if "fp8s" in variant else "fp8" if "fp8" in variant else ""


def variant_order(variant: str) -> tuple[str, bool]:
    """Eager before compiled, bf16 before FP8: each model is compiled once, its FP8 copies after."""
    return fp8_kind(variant), "compile" in variant


def fp8_copy(model: torch.nn.Module, blocks: str, name: str, forward: Callable[[torch.nn.Module], torch.Tensor],
             results: Results, device: torch.device, calibrate: Callable[[torch.nn.Module], Any] | None = None,
             ) -> torch.nn.Module | None:
    """A copy of ``model`` whose ``blocks`` Linears run in FP8 (the same rule on both sides: every
    16-aligned Linear inside the repeated blocks except adaLN modulations; static scales measured by
    ``calibrate(copy)`` when given), plus the relative velocity error of one forward against the bf16
    model. None where the device has no FP8 matmuls."""
    kind = "fp8s" if calibrate is not None else "fp8"
    if not fp8_supported(device) and device.type == "cuda":
        results.add({"name": f"{name} {kind}", "status": "skipped", "reason": "no FP8 matmuls on this GPU"})
        return None
    quant = copy.deepcopy(model)
    keep = lambda n, _: "adaLN_modulation" in n  # noqa: E731
    amax = None
    if calibrate is not None:
        amax = calibrate_input_amax(getattr(quant, blocks), lambda: calibrate(quant), keep)
    replaced = quantize_linears(getattr(quant, blocks), keep=keep, emulate=device.type != "cuda", input_amax=amax)
    with torch.no_grad():
        ref, out = forward(model).float(), forward(quant).float()
    err = float((out - ref).norm() / ref.norm())
    cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
    results.add({"name": f"{name} {kind} velocity error", "status": "ok", "model": name, "part": "fp8_error",
                 "variant": kind, "rel_l2_error": err, "cosine": cos, "fp8_linears": len(replaced)})
    log(f"{name}: {kind} velocity error vs bf16 {err:.4f} (relative L2), cosine {cos:.5f}, {len(replaced)} Linears")
    return quant


def make_sampler(model: Callable, variant: str, steps: int, guidance: float) -> Callable[[torch.Tensor], torch.Tensor]:
    if "graph" in variant:
        # One warm-up run before the capture is enough: it triggers compilation and lazy initialisation.
        return GraphedSampler(model, num_steps=steps, guidance_scale=guidance, warmup=1)
    return partial(euler_sample, model, num_steps=steps, guidance_scale=guidance)


def count_forward_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------- benchmark
def run_flowtok(name: str, args, shapes: Shapes, device: torch.device, dtype: torch.dtype, results: Results,
                budget: Budget, mm_rate: float | None) -> None:
    flow, projector, tokenizer = build_flowtok(name, shapes, device, dtype)
    cfg = flow.config
    gen = torch.Generator().manual_seed(0)
    # FLOPs per sample and forward: the analytic count and PyTorch's counter on a 2-sample batch.
    x2 = torch.randn(2, cfg.num_tokens, cfg.in_channels, generator=gen).to(device, dtype)
    counted = count_forward_flops(lambda: flow(x2, torch.rand(2, device=device), torch.tensor([0, 1], device=device)))
    per_sample = counted / 2
    log(f"{name}: {sum(p.numel() for p in flow.parameters()) / 1e6:.1f}M params; forward GFLOP/sample "
        f"{per_sample / 1e9:.2f} (FlopCounterMode), {flop_count(cfg) / 1e9:.2f} (flop_count)")
    pipeline = name in args.pipeline_models
    models: dict[str, Any] = {"": flow}
    kinds = {fp8_kind(v) for v in args.variants} - {""}
    if kinds:
        xe = torch.randn(8, cfg.num_tokens, cfg.in_channels, generator=gen).to(device, dtype)
        te, ne = torch.rand(8, generator=gen).to(device), (torch.arange(8) % 2).to(device)
        xc = torch.randn(16, cfg.num_tokens, cfg.in_channels, generator=gen).to(device, dtype)
        tc, nc = torch.linspace(0, 1, 16).to(device), (torch.arange(16) % 2).to(device)
        for kind in sorted(kinds):
            models[kind] = fp8_copy(flow, "blocks", name, lambda m: m(xe, te, ne), results, device,
                                    calibrate=(lambda m: m(xc, tc, nc)) if kind == "fp8s" else None)
    for variant in sorted(args.variants, key=variant_order):
        model = models[fp8_kind(variant)]
        if model is None:
            continue
        if "compile" in variant and not getattr(model, "_bench_compiled", False):
            model.compile_blocks(**compile_options(args))
            model._bench_compiled = True
        reserve = args.reserve_compile if "compile" in variant else args.reserve
        for batch in args.batches:
            x0 = torch.randn(batch, cfg.num_tokens, cfg.in_channels, generator=gen).to(device, dtype)
            sampler = make_sampler(model, variant, args.steps, args.guidance)

            def flow_only(sampler=sampler, x0=x0, batch=batch) -> dict[str, Any]:
                t = time_call(lambda: sampler(x0), device, args.warmup, args.iters, args.item_seconds)
                flops = per_sample * 2 * batch * args.steps  # CFG doubles the batch
                tflops = flops / t["median_s"] / 1e12
                return {**t, "images_per_s": batch / t["median_s"], "tflops": tflops,
                        "frac_of_mm": tflops / mm_rate if mm_rate else None}

            results.run(f"{name} flow {variant} b{batch}", flow_only, device, budget, reserve,
                        model=name, part="flow", variant=variant, batch=batch)
            if pipeline and variant in args.pipeline_variants:
                states = torch.randn(batch, shapes.clip_len, shapes.clip_dim, generator=gen).to(device, dtype)

                def whole(sampler=sampler, states=states, batch=batch) -> dict[str, Any]:
                    def decode(lat: torch.Tensor) -> torch.Tensor:
                        return torch.cat([to_uint8(tokenizer.decode_from_flow(lat[i:i + args.decode_chunk],
                                                                              states[i:i + args.decode_chunk]))
                                          for i in range(0, lat.shape[0], args.decode_chunk)])

                    @torch.no_grad()
                    def once() -> torch.Tensor:
                        z = projector(states, sample=True).z
                        return decode(sampler(z))

                    # One untimed whole run: warming the decoder on one chunk was not enough (the first
                    # pipeline call of a session measured 1.9 s against 0.5 s after, 2026-11-25).
                    t = time_call(once, device, 1, args.iters, args.item_seconds)
                    return {**t, "images_per_s": batch / t["median_s"]}

                results.run(f"{name} pipeline {variant} b{batch}", whole, device, budget, reserve,
                            model=name, part="pipeline", variant=variant, batch=batch)
            del sampler
            free_memory(device)


def run_pixart(args, shapes: Shapes, device: torch.device, dtype: torch.dtype, results: Results, budget: Budget,
               mm_rate: float | None) -> None:
    try:
        transformer, vae = build_pixart(shapes, device, dtype)
    except ImportError as exc:
        log(f"[skip] PixArt side: {exc}")
        results.add({"name": "pixart", "status": "skipped", "reason": f"diffusers unavailable: {exc}"})
        return
    gen = torch.Generator().manual_seed(0)
    size = shapes.pixart_kwargs()["sample_size"]
    states, mask, null_states, null_mask = t5_batch(1, shapes, device, dtype, gen)
    probe = PixArtVelocity(transformer, states, mask, null_states, null_mask)
    x2 = torch.randn(2, 4, size, size, generator=gen).to(device, dtype)
    per_sample = count_forward_flops(lambda: probe(x2, torch.rand(2, device=device), None)) / 2
    log(f"PixArt: {sum(p.numel() for p in transformer.parameters()) / 1e6:.1f}M params; forward GFLOP/sample "
        f"{per_sample / 1e9:.2f}; VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M params")
    pipeline = PIXART in args.pipeline_models
    models: dict[str, Any] = {"": transformer}
    kinds = {fp8_kind(v) for v in args.variants} - {""}
    if kinds:
        xe = torch.randn(8, 4, size, size, generator=gen).to(device, dtype)
        te = torch.rand(8, generator=gen).to(device)
        text = t5_batch(4, shapes, device, dtype, gen)
        xc = torch.randn(16, 4, size, size, generator=gen).to(device, dtype)
        tc = torch.linspace(0, 1, 16).to(device)
        text_c = t5_batch(8, shapes, device, dtype, gen)
        for kind in sorted(kinds):
            models[kind] = fp8_copy(transformer, "transformer_blocks", PIXART,
                                    lambda m: PixArtVelocity(m, *text)(xe, te, None), results, device,
                                    calibrate=(lambda m: PixArtVelocity(m, *text_c)(xc, tc, None))
                                    if kind == "fp8s" else None)
    compiled: set[str] = set()
    for variant in sorted(args.variants, key=variant_order):
        fp8 = fp8_kind(variant)
        model = models[fp8]
        if model is None:
            continue
        if "compile" in variant and fp8 not in compiled:
            compile_pixart(model, **compile_options(args))
            compiled.add(fp8)
        reserve = args.reserve_compile if "compile" in variant else args.reserve
        for batch in args.batches:
            velocity = PixArtVelocity(model, *t5_batch(batch, shapes, device, dtype, gen))
            x0 = torch.randn(batch, 4, size, size, generator=gen).to(device, dtype)
            sampler = make_sampler(velocity, variant, args.steps, args.guidance)

            def flow_only(sampler=sampler, x0=x0, batch=batch) -> dict[str, Any]:
                t = time_call(lambda: sampler(x0), device, args.warmup, args.iters, args.item_seconds)
                tflops = per_sample * 2 * batch * args.steps / t["median_s"] / 1e12
                return {**t, "images_per_s": batch / t["median_s"], "tflops": tflops,
                        "frac_of_mm": tflops / mm_rate if mm_rate else None}

            results.run(f"pixart flow {variant} b{batch}", flow_only, device, budget, reserve,
                        model=PIXART, part="flow", variant=variant, batch=batch)
            if pipeline and variant in args.pipeline_variants:
                def whole(sampler=sampler, x0=x0, batch=batch) -> dict[str, Any]:
                    def decode(lat: torch.Tensor) -> torch.Tensor:
                        return torch.cat([to_uint8(vae.decode(lat[i:i + args.decode_chunk]).sample / 2 + 0.5)
                                          for i in range(0, lat.shape[0], args.decode_chunk)])

                    @torch.no_grad()
                    def once() -> torch.Tensor:
                        return decode(sampler(x0) / SD_VAE_SCALE)

                    t = time_call(once, device, 1, args.iters, args.item_seconds)
                    return {**t, "images_per_s": batch / t["median_s"]}

                results.run(f"pixart pipeline {variant} b{batch}", whole, device, budget, reserve,
                            model=PIXART, part="pipeline", variant=variant, batch=batch)
            del sampler, velocity
            free_memory(device)


def run_text_encoders(args, shapes: Shapes, device: torch.device, dtype: torch.dtype, results: Results,
                      budget: Budget) -> None:
    """The frozen encoders, timed apart: CLIP-L/14 text (FlowTok) and the T5-XXL encoder (PixArt)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if shapes.tiny:
        clip_cfg = CLIPTextConfig(hidden_size=shapes.clip_dim, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=shapes.clip_len, vocab_size=100)
        t5_cfg = T5Config(d_model=shapes.t5_dim, d_ff=32, d_kv=8, num_heads=2, num_layers=1, vocab_size=100,
                          feed_forward_proj="gated-gelu")
    else:
        clip_cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                  projection_dim=768)
        t5_cfg = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                          feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    for label, cls, cfg, length in (("clip-l-text", CLIPTextModel, clip_cfg, shapes.clip_len),
                                    ("t5-xxl-encoder", T5EncoderModel, t5_cfg, shapes.t5_len)):
        if not budget.allows(args.reserve):
            results.add({"name": f"{label} text encoder", "status": "skipped", "reason": "time budget"})
            continue
        cfg._attn_implementation = "sdpa"
        with torch.device(device):
            model = cls(cfg)
        model = model.to(dtype).eval()
        params = sum(p.numel() for p in model.parameters())
        for batch in args.batches:
            ids = torch.randint(0, cfg.vocab_size, (batch, length), device=device)
            mask = torch.ones_like(ids)

            def encode(model=model, ids=ids, mask=mask, params=params) -> dict[str, Any]:
                with torch.no_grad():
                    t = time_call(lambda: model(input_ids=ids, attention_mask=mask), device, args.warmup,
                                  args.iters)
                return {**t, "prompts_per_s": ids.shape[0] / t["median_s"], "params_m": params / 1e6}

            results.run(f"{label} text encoder b{batch}", encode, device, budget, args.reserve,
                        model=label, part="text_encoder", batch=batch)
        del model, encode  # T5-XXL alone holds 9.5 GB
        free_memory(device)


def summarise(results: Results) -> dict[str, Any]:
    """FlowTok-XL pipeline images/s over PixArt's, per batch: best variant of each, and variant by variant."""
    ok = [i for i in results.data["items"] if i.get("status") == "ok" and i.get("part") == "pipeline"]
    summary: dict[str, Any] = {}
    for batch in sorted({i["batch"] for i in ok}):
        def rate(model: str, variant: str | None = None, batch: int = batch) -> float | None:
            vals = [i["images_per_s"] for i in ok if i["model"] == model and i["batch"] == batch
                    and (variant is None or i["variant"] == variant)]
            return max(vals) if vals else None
        for name in FLOWTOK_MODELS:
            ours, theirs = rate(name), rate(PIXART)
            if ours and theirs:
                entry = {"best_vs_best": ours / theirs}
                for v in sorted({i["variant"] for i in ok}):
                    a, b = rate(name, v), rate(PIXART, v)
                    if a and b:
                        entry[v] = a / b
                summary[f"{name}/pixart b{batch}"] = entry
    return summary


def plot(data: dict[str, Any], path: str | Path) -> None:
    """Two panels: pipeline images/s (FlowTok vs PixArt, per variant), flow images/s of every model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [i for i in data["items"] if i.get("status") == "ok" and "images_per_s" in i]
    batches = sorted({i["batch"] for i in ok})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, part in zip(axes, ("pipeline", "flow"), strict=True):
        rows = sorted({(i["model"], i["variant"]) for i in ok if i["part"] == part},
                      key=lambda mv: ([*FLOWTOK_MODELS, PIXART].index(mv[0]), mv[1]))
        width = 0.8 / max(len(rows), 1)
        for k, (model, variant) in enumerate(rows):
            vals = [next((i["images_per_s"] for i in ok if i["part"] == part and i["model"] == model
                          and i["variant"] == variant and i["batch"] == b), 0.0) for b in batches]
            ax.bar([j + k * width for j in range(len(batches))], vals, width, label=f"{model} {variant}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel("images / s")
        ax.set_title({"pipeline": "text latent -> image (whole pipeline)", "flow": "flow alone (20 steps, CFG)"}[part])
        ax.legend(fontsize=7)
    env = data["env"]
    fig.suptitle(f"{env.get('gpu', env['device'])}, torch {env['torch']}, bf16, {env['date_utc'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny shapes: checks the script on a CPU in seconds")
    p.add_argument("--models", default="FlowTok-XL,pixart,FlowTok-B,FlowTok-H",
                   help="in the order run (a time budget skips the last ones first)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 64,256; tiny: 2,3)")
    p.add_argument("--variants", default="eager,compile+graph", help="among eager, graph, compile, compile+graph; "
                   "fp8, graph+fp8, compile+fp8, compile+graph+fp8 add FP8 Linears (Hopper / Ada); "
                   "fp8s instead of fp8: static calibrated scales")
    p.add_argument("--pipeline-models", default="FlowTok-XL,pixart")
    p.add_argument("--pipeline-variants", default="eager,compile+graph")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default 20; tiny: 2)")
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2, help="timed calls at most ...")
    p.add_argument("--item-seconds", type=float, default=4.0, help="... and no more once this much is timed")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune",
                                                             "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of the compiled variants, both sides (default: inductor's default)")
    p.add_argument("--decode-chunk", type=int, default=64, help="images per decoder call, both pipelines")
    p.add_argument("--no-text-encoders", action="store_true")
    p.add_argument("--out", default=None, help="results JSON")
    p.add_argument("--plot", default=None, help="PNG of the results")
    p.add_argument("--plot-from", default=None, help="only redraw --plot from this results JSON")
    p.add_argument("--deadline", type=float, default=None, help="seconds from now; default $BENCH_DEADLINE")
    p.add_argument("--reserve", type=float, default=15.0, help="seconds an eager item needs to be started")
    p.add_argument("--reserve-compile", type=float, default=45.0, help="seconds a compiled item needs")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in (args.batches or ("2,3" if args.tiny else "64,256")).split(",")]
    args.steps = args.steps or (2 if args.tiny else 20)
    for key in ("models", "variants", "pipeline_models", "pipeline_variants"):
        setattr(args, key, [s for s in getattr(args, key).split(",") if s])
    known = {"eager", "graph", "compile", "compile+graph"}
    known |= {f"{v}+{q}" for v in known for q in ("fp8", "fp8s")} | {"fp8", "fp8s"}
    known -= {"eager+fp8", "eager+fp8s"}
    if set(args.variants) - known or set(args.pipeline_variants) - known:
        p.error(f"variants must be among {sorted(known)}")
    if set(args.models) - {*FLOWTOK_MODELS, PIXART}:
        p.error(f"models must be among {[*FLOWTOK_MODELS, PIXART]}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.plot_from:
        data = json.loads(Path(args.plot_from).read_text())
        plot(data, args.plot or Path(args.plot_from).with_suffix(".png"))
        return data
    device = pick_device(args.device)
    dtype = torch.bfloat16
    shapes = tiny_shapes() if args.tiny else Shapes(tiny=False)
    budget = Budget(args.deadline)
    torch.backends.cuda.matmul.allow_tf32 = True
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "deadline")}
    results = Results(args.out, env_info(device), settings)
    mm_rate = matmul_tflops(device, n=256 if args.tiny else 8192)
    results.data["env"]["bf16_mm_tflops"] = mm_rate
    log(f"bf16 mm rate: {mm_rate:.1f} TFLOP/s on {results.data['env'].get('gpu', device)}")
    # The text encoders run right after the last pipeline model, before the flow-only extras, so that a
    # tight time budget drops the extras first.
    last_pipeline = max((i for i, m in enumerate(args.models) if m in args.pipeline_models), default=-1)
    for index, model in enumerate(args.models):
        if model == PIXART:
            run_pixart(args, shapes, device, dtype, results, budget, mm_rate)
        else:
            run_flowtok(model, args, shapes, device, dtype, results, budget, mm_rate)
        if index == last_pipeline and not args.no_text_encoders:
            run_text_encoders(args, shapes, device, dtype, results, budget)
    if last_pipeline < 0 and not args.no_text_encoders:
        run_text_encoders(args, shapes, device, dtype, results, budget)
    results.data["summary"] = summarise(results)
    results.save()
    log("\nimages/s (pipeline = text latent -> uint8 image; flow = the 20-step loop alone)")
    log(f"{'model':12s} {'part':9s} {'variant':14s} {'batch':>5s} {'img/s':>9s} {'TFLOP/s':>8s} {'of mm':>6s} "
        f"{'peak GiB':>8s}")
    for i in results.data["items"]:
        if i.get("status") == "ok" and "images_per_s" in i:
            frac = f"{i['frac_of_mm']:.0%}" if i.get("frac_of_mm") else ""
            tfl = f"{i['tflops']:.1f}" if i.get("tflops") else ""
            log(f"{i['model']:12s} {i['part']:9s} {i['variant']:14s} {i['batch']:5d} {i['images_per_s']:9.1f} "
                f"{tfl:>8s} {frac:>6s} {i['peak_gib'] if i['peak_gib'] is not None else '':>8}")
        elif i.get("status") != "ok":
            log(f"{i['name']}: {i['status']} {i.get('reason', i.get('error', ''))[:120]}")
    for key, entry in results.data["summary"].items():
        log(f"ratio {key}: " + ", ".join(f"{k} {v:.2f}x" for k, v in entry.items()))
    if args.plot:
        plot(results.data, args.plot)
    return results.data


if __name__ == "__main__":
    main()
