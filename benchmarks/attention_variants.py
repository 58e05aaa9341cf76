"""The flow's attention alone, in the ways PyTorch can run it: which is fastest over FlowTok-XL's 77 tokens?

The fused DiT path (:mod:`flowtok.nn.fused_dit`) calls SDPA on strided q / k / v views of the qkv GEMM's output
``[B * 77, 3 * 1152]`` (16 heads x 72). On one H200 that is about 10% of the flow's time and about 2.5x the
memory floor (read q, k, v once, write the output once). Timed here with CUDA events (the median call, by
``fp8_gemm.timer``), each variant against the same inputs, its output checked against the math reference:

* ``sdpa cudnn, strided views``: what the fused path runs;
* ``sdpa cudnn / flash / efficient, contiguous``: the same on [B, H, L, D] copies (the copy not timed);
* ``sdpa cudnn, head dim padded to 80 / 128``: zero-padded channels (same result: zeros add nothing to q.k
  and their output columns are dropped), in case a kernel shape fits better;
* ``math``: attention spelt out (two batched GEMMs around a softmax), eager and compiled by inductor;
* ``flex_attention``: PyTorch's compiled Triton template, if it takes this head width, with its default tiles and
  four others.

    python benchmarks/attention_variants.py --out results/attention.json     # one GPU, about a minute
    python benchmarks/attention_variants.py --device cpu --batch 2          # checks the script
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from common import Budget, Results, env_info, log, pick_device  # noqa: E402
from fp8_gemm import timer  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=512, help="sequences (FlowTok-XL at batch 256 with CFG: 512)")
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=72)
    p.add_argument("--calls", type=int, default=50, help="timed calls (median; after 2 warm-ups)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, n, h, d = args.batch, args.tokens, args.heads, args.head_dim
    results = Results(args.out, env_info(device), vars(args))
    budget = Budget(None)
    qkv = torch.randn(b * n, 3 * h * d, device=device, dtype=dtype)
    q, k, v = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)  # each [b, h, n, d], strided
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    floor_bytes = qkv.numel() * qkv.element_size() + ref.numel() * qkv.element_size()
    results.data["env"]["floor_bytes"] = floor_bytes

    def item(name: str, fn: Callable[[], torch.Tensor], backend: SDPBackend | None = None) -> None:
        def measure() -> dict[str, Any]:
            def call() -> torch.Tensor:
                if backend is None:
                    return fn()
                with sdpa_kernel(backend):
                    return fn()

            with torch.no_grad():
                out = call()
                err = float((out.float()[..., :d] - ref).norm() / ref.norm())
                us = 1e6 * timer(device, 2, args.calls)(call)
            return {"us": us, "rel_err": err, "gb_s_at_floor": floor_bytes / us / 1e3}

        results.run(name, measure, device, budget)

    item("sdpa cudnn, strided views", lambda: F.scaled_dot_product_attention(q, k, v), SDPBackend.CUDNN_ATTENTION)
    item("sdpa default, strided views", lambda: F.scaled_dot_product_attention(q, k, v))
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        item(f"sdpa {name}, contiguous", lambda: F.scaled_dot_product_attention(qc, kc, vc), backend)
    for width in (80, 128):
        if width <= d:
            continue
        qp, kp, vp = (F.pad(t, (0, width - d)) for t in (qc, kc, vc))
        item(f"sdpa cudnn, head dim padded to {width}",
             lambda qp=qp, kp=kp, vp=vp: F.scaled_dot_product_attention(qp, kp, vp, scale=d ** -0.5),
             SDPBackend.CUDNN_ATTENTION)
    scale = d ** -0.5

    def math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # scores in fp32, probabilities rounded once: what inductor makes of attention spelt out (two batched
        # GEMMs and one fused softmax kernel; the 77 x 77 scores make a round trip through memory)
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)).float() * scale, dim=-1)
        return torch.matmul(p.to(v.dtype), v)

    item("math, eager, strided views", lambda: math(q, k, v))
    if device.type == "cuda":
        from torch.nn.attention.flex_attention import flex_attention

        compiled_math = torch.compile(math, dynamic=False, fullgraph=True)
        item("math (compiled), strided views", lambda: compiled_math(q, k, v))
        flex = torch.compile(flex_attention, dynamic=False)
        item("flex_attention (compiled), contiguous", lambda: flex(qc, kc, vc))
        item("flex_attention (compiled), strided views", lambda: flex(q, k, v))
        # Triton tile shapes for 77 tokens: one 128-row tile, two of 64, or narrower key blocks
        for block_m, block_n, warps, stages in ((128, 128, 8, 1), (64, 128, 4, 1), (64, 64, 4, 2), (128, 64, 8, 2)):
            options = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
            item(f"flex_attention (compiled) {block_m}x{block_n} w{warps} s{stages}, strided views",
                 lambda options=options: flex(q, k, v, kernel_options=options))
    results.save()
    for it in results.data["items"]:
        if it.get("status") == "ok":
            log(f"{it['name']:<42} {it['us']:8.1f} us  {it['gb_s_at_floor']:7.0f} GB/s at the floor  "
                f"err {it['rel_err']:.2e}")
        else:
            log(f"{it['name']:<42} {it.get('status')}: {it.get('error', '')[:200]}")
    return results.data


if __name__ == "__main__":
    main()
