"""Kernel profile of the paper's image decoder (ViT-L, 410 tokens) at one batch: bf16, then its blocks in FP8.

Where the decoder's time goes (GEMM, attention, LayerNorm / elementwise), with its blocks regionally compiled as
the fast path runs them, random weights, random flow latents and text states. ``--tiny`` checks the script on a
CPU (aten operators' CPU time stand in for kernels; FP8 emulated).

    python benchmarks/decoder_profile.py --out results/decoder_profile.json       # one GPU: about a minute
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Budget, Results, env_info, log, pick_device, sync, time_call  # noqa: E402
from fast_profile import kernel_table, profiled  # noqa: E402

from flowtok.nn.fp8 import fp8_supported  # noqa: E402
from flowtok.nn.regions import compile_regions, uncompile_regions  # noqa: E402
from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="the tiny tokenizer, no compile: checks the script")
    p.add_argument("--batch", type=int, default=None, help="images per decode (default 256; tiny 2)")
    p.add_argument("--calls", type=int, default=3, help="profiled calls (after the timing)")
    p.add_argument("--out", default=None, help="results JSON")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    batch = args.batch or (2 if args.tiny else 256)
    config = TOKENIZER_PRESETS["tiny" if args.tiny else "flowtitok-256"]
    results = Results(args.out, env_info(device), {"batch": batch, "tiny": args.tiny, "calls": args.calls})
    budget = Budget(None)
    with torch.device(device):
        tok = ImageTokenizer(config).to(torch.bfloat16).eval()
    if device.type == "cuda":
        compile_regions(tok.decoder.blocks)
    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(batch, *tok.latent_shape, generator=gen).to(device, torch.bfloat16)
    states = torch.randn(batch, config.text_len, config.text_dim, generator=gen).to(device, torch.bfloat16)

    @torch.no_grad()
    def decode() -> torch.Tensor:
        return tok.decode_from_flow(lat, states)

    def measure() -> dict[str, Any]:
        t = time_call(decode, device, 2, 5, 4.0)
        wall, prof = profiled(decode, device, args.calls)
        table = kernel_table(prof, device, top=20)
        sync(device)
        return {**t, "images_per_s": batch / t["median_s"], "profile_wall_s": wall, **table}

    results.run(f"decoder bf16 b{batch}", measure, device, budget, variant="bf16", batch=batch)
    # quantised before compiling: the compiled blocks would keep running the bf16 Linears they traced
    if device.type == "cuda":
        uncompile_regions(tok.decoder.blocks)
    tok.quantize_decoder_fp8(emulate=not fp8_supported(device), calibrate=decode)
    if device.type == "cuda":
        compile_regions(tok.decoder.blocks)
    results.run(f"decoder fp8 b{batch}", measure, device, budget, variant="fp8", batch=batch)
    results.save()
    for item in results.data["items"]:
        if item.get("status") == "ok":
            shares = ", ".join(f"{c} {v['share']:.1%}" for c, v in item["categories"].items())
            log(f"{item['name']}: {1e3 * item['median_s']:.1f} ms; {shares}")
            for row in item["top"][:12]:
                log(f"    {row['ms']:8.2f} ms {row['calls']:5d}x {row['category']:<22} {row['kernel'][:100]}")
    return results.data


if __name__ == "__main__":
    main()
