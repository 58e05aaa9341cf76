"""FP8 against bf16 on the GEMMs of the FlowTok-XL flow, one by one: is FP8 worth it, and in which form?

For each Linear shape of a FlowTok-XL block at the sampling batch (2 x batch x 77 rows: CFG halves in one
batch) it times, with CUDA events (median of --iters after a warm-up):

* ``bf16``                 ``x @ w.T``;
* ``fp8 rowwise``          ``torch._scaled_mm`` with per-row input and per-channel weight scales (what
                           :class:`flowtok.nn.fp8.FP8Linear` runs);
* ``fp8 tensorwise``       one scale per tensor, with and without ``use_fast_accum``;
* ``quant dynamic rows``   the input quantisation FP8Linear adds before every GEMM (row amax, divide,
                           cast), compiled;
* ``quant static``         the same cast with a fixed, calibrated scale (no reduction), compiled.

    python benchmarks/fp8_gemm.py --out fp8_gemm.json          # GPU (FP8 needs compute capability 8.9+)
    python benchmarks/fp8_gemm.py --tiny --device cpu          # seconds on a CPU: checks the script
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Results, env_info, log, pick_device  # noqa: E402

from flowtok.flow import FLOW_PRESETS  # noqa: E402
from flowtok.nn.fp8 import quantize_rows, quantize_tensor, to_e4m3  # noqa: E402


def xl_shapes(batch: int, tiny: bool) -> list[tuple[str, int, int, int]]:
    """(name, M, K, N) of the block Linears: qkv, attention out, MLP in, MLP out."""
    cfg = FLOW_PRESETS["tiny" if tiny else "FlowTok-XL"]
    m = 2 * batch * (cfg.num_tokens if tiny else 77)
    d, h = cfg.width, int(cfg.width * cfg.mlp_ratio)
    return [("qkv", m, d, 3 * d), ("attn_out", m, d, d), ("mlp_in", m, d, h), ("mlp_out", m, h, d)]


def timer(device: torch.device, warmup: int, iters: int):
    def run(fn) -> float:
        for _ in range(warmup):
            fn()
        if device.type != "cuda":
            import time

            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return sorted(times)[len(times) // 2]
        torch.cuda.synchronize(device)
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]
    return run


def measure(name: str, m: int, k: int, n: int, device: torch.device, args) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device, torch.bfloat16)
    run = timer(device, args.warmup, args.iters)
    compile_ = (lambda f: f) if device.type != "cuda" else (lambda f: torch.compile(f, dynamic=False))
    qrows, qstatic = compile_(quantize_rows), compile_(to_e4m3)
    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(w)
    xq_t, xs_t = quantize_tensor(x)
    wq_t, ws_t = quantize_tensor(w)
    ref = (x.float() @ w.float().t())
    out: dict[str, Any] = {"shape": name, "m": m, "k": k, "n": n}
    flops = 2 * m * k * n

    def rec(key: str, fn, check=None) -> None:
        t = run(fn)
        out[f"{key}_ms"] = t * 1e3
        out[f"{key}_tflops"] = flops / t / 1e12
        if check is not None:
            y = check().float()
            out[f"{key}_rel_err"] = float((y - ref).norm() / ref.norm())

    rec("bf16", lambda: x @ w.t(), lambda: x @ w.t())
    rows = lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.reshape(1, -1),  # noqa: E731
                                    out_dtype=torch.bfloat16)
    rec("fp8_rowwise", rows, rows)
    for fast in (False, True):
        def tensorwise(fast=fast):
            return torch._scaled_mm(xq_t, wq_t.t(), scale_a=xs_t, scale_b=ws_t, out_dtype=torch.bfloat16,
                                    use_fast_accum=fast)
        rec(f"fp8_tensorwise{'_fast' if fast else ''}", tensorwise, tensorwise)
    t = run(lambda: qrows(x))
    out["quant_dynamic_rows_ms"] = t * 1e3
    t = run(lambda: qstatic(x, xs_t))
    out["quant_static_ms"] = t * 1e3
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=None, help="sampling batch (default 256; tiny 2)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    batch = args.batch or (2 if args.tiny else 256)
    results = Results(args.out, env_info(device), {k: v for k, v in vars(args).items() if k != "out"})
    for name, m, k, n in xl_shapes(batch, args.tiny):
        item = measure(name, m, k, n, device, args)
        results.add({"name": f"{name} {m}x{k}x{n}", "status": "ok", **item})
    results.save()
    log(f"\n{'GEMM':9s} {'M x K x N':>20s} {'bf16 ms':>8s} {'rowwise':>8s} {'tensor':>8s} {'t+fast':>8s} "
        f"{'q rows':>7s} {'q stat':>7s} {'err row':>8s} {'err t+f':>8s}")
    for i in results.data["items"]:
        log(f"{i['shape']:9s} {i['m']:>8d}x{i['k']}x{i['n']:<6d} {i['bf16_ms']:8.3f} {i['fp8_rowwise_ms']:8.3f} "
            f"{i['fp8_tensorwise_ms']:8.3f} {i['fp8_tensorwise_fast_ms']:8.3f} {i['quant_dynamic_rows_ms']:7.3f} "
            f"{i['quant_static_ms']:7.3f} {i['fp8_rowwise_rel_err']:8.4f} {i['fp8_tensorwise_fast_rel_err']:8.4f}")
    return results.data


if __name__ == "__main__":
    main()
