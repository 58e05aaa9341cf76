"""``fast_inference.py --profile``: where the FlowTok-XL flow's time goes, by kernel category, and its variants.

``torch.profiler`` over ``--profile-calls`` calls (2) of the Euler loop with CFG (``--profile-steps`` steps each:
every step runs the same kernels, so a few steps give the shares of 20) at ``--batch`` (256), without a CUDA
graph (a replayed graph is one opaque launch to the profiler), of

* ``plain compile``: the regionally compiled plain blocks (inductor fuses LayerNorm + modulate, bias + GELU,
  gate + residual; GEMMs through cuBLAS);
* ``fused``: :mod:`flowtok.nn.fused_dit` (LayerNorm + modulate in one Triton pass, the gates folded into the
  output Linears, residual in the GEMM accumulator, GELU epilogue);
* each variant of ``--variants``, a change to the fused path tried beside it:
  ``no-epilogue`` (fc1 as ``addmm`` then an in-place tanh-GELU: is cuBLASLt's GELU epilogue slower than
  the pass it saves?), ``per-group`` (proj and fc2 as one GEMM per condition group, as the second 2026-12-04
  path ran them, instead of one batched GEMM over both), ``no-triton`` (no flowtok Triton kernel: the LayerNorm
  pass compiled by inductor, the gate fold as PyTorch's broadcast multiply), ``fold-in`` (the fused path of
  2026-12-02: the modulation folded into qkv's and fc1's weights too, those GEMMs split per group, the LayerNorm
  pass compiled by inductor), ``sdpa-flash`` and ``sdpa-efficient`` (attention forced onto PyTorch's
  FlashAttention or memory-efficient kernel instead of the backend SDPA picks, cuDNN's on an H100 / H200).

Kernel time is grouped into GEMM, attention, layernorm/elementwise, fold (every kernel launched while the
weights are folded, found through a ``record_function`` range around the fold) and other, each with its share
of the device-busy time, plus the top kernels and the GEMMs' own TFLOP/s (the blocks' Linear FLOPs over the
GEMM time). The fused path and each variant are also timed as the main run times the flow (20 steps, CUDA
graph, images/s, fraction of the ``mm`` rate), one beside the other, before the variants' profiles (so that
a short budget drops those first); each variant's output is compared with the fused path's
(``rel_diff_vs_fused``). On a CPU (``--tiny``) aten operators' self CPU time stands in for kernels.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from common import log, mm_fractions, sync, time_call
from sampling import count_forward_flops
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile, record_function

from flowtok.nn import fused_dit as fd
from flowtok.nn import triton_ops
from flowtok.sampling import GraphedSampler, euler_sample

CATEGORIES = ("GEMM", "attention", "layernorm/elementwise", "fold", "other")
FOLD_RANGE = "flowtok::fold"
VARIANTS = ("no-epilogue", "per-group", "no-triton", "fold-in", "sdpa-flash", "sdpa-efficient",
            "triton-epilogues")

_ATTENTION = re.compile(r"flash|fmha|attention|sdpa|_mha|mha_")
_GEMM = re.compile(r"gemm|xmma|cutlass|nvjet|cublas|splitk|matmul|triton_tem"
                   r"|aten::(_addmm_activation|addmm|mm|bmm|baddbmm|linear)_?$")
_ELEMENTWISE = re.compile(r"norm|elementwise|vectorized|unrolled|reduce|gelu|triton_|copy|cat|add|mul|fill|"
                          r"pointwise|softmax|silu|index|where|div|sub|exp|clone|contiguous|memcpy|memset")


def kernel_category(name: str) -> str:
    """A CUDA kernel's (or, on a CPU, an aten operator's) category, by name; the fold is found by range."""
    n = name.lower()
    if _ATTENTION.search(n):
        return "attention"
    if _GEMM.search(n):
        return "GEMM"
    if _ELEMENTWISE.search(n):
        return "layernorm/elementwise"
    return "other"


def _fold_in(linear, shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``fold-in`` variant's input fold: (W diag(1 + scale_g) [G, out, in], b + W shift_g [G, out])."""
    w, b = linear.weight, linear.bias
    folded = w.unsqueeze(0) * (1 + scale).unsqueeze(1)
    bias = torch.addmm(b, shift, w.t()) if b is not None else shift @ w.t()
    return folded, bias


def _fold_out_torch(linear, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``fold-in`` variant's output fold, as PyTorch's broadcast multiply."""
    folded = linear.weight.unsqueeze(0) * gate.unsqueeze(2)
    return folded, gate * linear.bias if linear.bias is not None else torch.zeros_like(gate)


_FOLDS = {"in": _fold_in, "out": _fold_out_torch}


@contextlib.contextmanager
def fold_ranges() -> Iterator[None]:
    """Run every weight fold inside a ``record_function`` range, to attribute their kernels."""
    saved_fd, saved_own = fd._fold_out, dict(_FOLDS)

    def ranged(fn: Callable) -> Callable:
        def wrapper(*args: Any) -> Any:
            with record_function(FOLD_RANGE):
                return fn(*args)
        return wrapper

    fd._fold_out = ranged(saved_fd)  # type: ignore[assignment]
    _FOLDS.update({k: ranged(f) for k, f in saved_own.items()})
    try:
        yield
    finally:
        fd._fold_out = saved_fd  # type: ignore[assignment]
        _FOLDS.update(saved_own)


_ADD_LN_COMPILED: dict[str, Callable] = {}


def _add_layer_norm_eager(x: torch.Tensor, pending: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x + pending, x.shape[-1:], eps=eps)


def _add_layer_norm(x: torch.Tensor, pending: torch.Tensor, eps: float) -> torch.Tensor:
    """The ``fold-in`` variant's ``LayerNorm(x + pending)``: one inductor-compiled kernel on CUDA."""
    if x.device.type != "cuda":
        return _add_layer_norm_eager(x, pending, eps)
    if "fn" not in _ADD_LN_COMPILED:
        _ADD_LN_COMPILED["fn"] = torch.compile(_add_layer_norm_eager, dynamic=False, fullgraph=True)
    return _ADD_LN_COMPILED["fn"](x, pending, eps)


def _accumulate_per_group(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> None:
    for g in range(x.shape[0]):
        x[g].addmm_(a[g], w[g].t())


def _block_fold_in(block, x: torch.Tensor, pending: torch.Tensor, mod: torch.Tensor, batch: int,
                   epilogue: bool, triton_plain: bool = False, triton_fp8: bool = False) -> torch.Tensor:
    """The fused block as of 2026-12-02: every adaLN vector folded into the weights, per-group GEMMs (cuBLASLt's
    GELU epilogue whatever ``triton_plain`` / ``triton_fp8`` say: plain blocks only)."""
    groups, rows, d = x.shape
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
    attn, mlp = block.attn, block.mlp
    w_qkv, b_qkv = _FOLDS["in"](attn.qkv, shift_msa, scale_msa)
    w_proj, b_proj = _FOLDS["out"](attn.proj, gate_msa)
    w_fc1, b_fc1 = _FOLDS["in"](mlp.fc1, shift_mlp, scale_mlp)
    w_fc2, b_fc2 = _FOLDS["out"](mlp.fc2, gate_mlp)
    h = _add_layer_norm(x, pending, block.norm1.eps)
    qkv = x.new_empty(groups, rows, w_qkv.shape[1])
    for g in range(groups):
        torch.addmm(b_qkv[g], h[g], w_qkv[g].t(), out=qkv[g])
    heads = attn.num_heads
    q, k, v = qkv.view(groups * batch, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(groups, rows, d)
    _accumulate_per_group(x, o, w_proj)
    pending = pending + b_proj.unsqueeze(1)
    h = _add_layer_norm(x, pending, block.norm2.eps)
    hidden = x.new_empty(groups, rows, w_fc1.shape[1])
    for g in range(groups):
        if epilogue:
            torch._addmm_activation(b_fc1[g], h[g], w_fc1[g].t(), use_gelu=True, out=hidden[g])
        else:
            torch.addmm(b_fc1[g], h[g], w_fc1[g].t(), out=hidden[g])
            torch.ops.aten.gelu_(hidden[g], approximate="tanh")
    _accumulate_per_group(x, hidden, w_fc2)
    return pending + b_fc2.unsqueeze(1)


@contextlib.contextmanager
def variant(name: str, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """The fused path changed as ``name`` says, for the duration of the block."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; one of {', '.join(VARIANTS)}")
    key = (str(torch.empty(0, device=device).device), dtype)  # "cuda:0", as fused_blocks_forward asks
    saved_epilogue, saved_block, saved_accumulate = fd._GELU_EPILOGUE.get(key), fd._block, fd._accumulate
    saved_gemm_gelu = fd._gemm_gelu
    saved_triton = triton_ops.ENABLED
    backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
    attention = sdpa_kernel([backends[name]]) if name in backends else contextlib.nullcontext()
    if name == "no-epilogue":
        fd._GELU_EPILOGUE[key] = False
    elif name == "no-triton":
        triton_ops.ENABLED = False
    elif name == "per-group":
        fd._accumulate = _accumulate_per_group  # type: ignore[assignment]
    elif name == "fold-in":
        fd._block = _block_fold_in  # type: ignore[assignment]
    elif name == "triton-epilogues":  # bf16 fc1 + GELU in flowtok's Triton GEMM (gemm_epilogues="triton")
        fd._gemm_gelu = lambda a, linear, epilogue, triton_gemm=False: saved_gemm_gelu(  # type: ignore[assignment]
            a, linear, epilogue, triton_ops.available(a))
    try:
        with attention:
            yield
    finally:
        fd._block, fd._accumulate = saved_block, saved_accumulate  # type: ignore[assignment]
        fd._gemm_gelu = saved_gemm_gelu  # type: ignore[assignment]
        triton_ops.ENABLED = saved_triton
        if saved_epilogue is None:
            fd._GELU_EPILOGUE.pop(key, None)
        else:
            fd._GELU_EPILOGUE[key] = saved_epilogue


def profiled(fn: Callable[[], Any], device: torch.device, calls: int) -> tuple[float, Any]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with fold_ranges(), profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        wall = time.perf_counter() - t0
    return wall, prof


def kernel_table(prof: Any, device: torch.device, top: int = 15) -> dict[str, Any]:
    """Kernel time by category (the fold found by its range) and the top kernels."""
    events = prof.events()
    under: dict[int, bool] = {}

    def in_fold(evt: Any) -> bool:
        chain, node, found = [], evt, False
        while node is not None:
            if id(node) in under:
                found = under[id(node)]
                break
            chain.append(node)
            if node.name == FOLD_RANGE:
                found = True
                break
            node = node.cpu_parent
        for n in chain:
            under[id(n)] = found
        return found

    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # name -> [calls, us]
    fold_us: dict[str, float] = defaultdict(float)
    if device.type == "cuda":
        for e in prof.key_averages():
            # the fold's record_function range shows up on the GPU too: its kernels are already counted
            if e.device_type == DeviceType.CUDA and e.key not in ("Command Buffer Full", FOLD_RANGE) \
                    and e.self_device_time_total > 0:
                by_name[e.key][0] += e.count
                by_name[e.key][1] += e.self_device_time_total
        for evt in events:
            if evt.device_type == DeviceType.CPU and getattr(evt, "kernels", None) and in_fold(evt):
                for k in evt.kernels:
                    fold_us[k.name] += k.duration
    else:  # aten operators' self CPU time stand in for kernels
        for evt in events:
            if evt.name.startswith("aten::") and evt.self_cpu_time_total > 0:
                by_name[evt.name][0] += 1
                by_name[evt.name][1] += evt.self_cpu_time_total
                if in_fold(evt):
                    fold_us[evt.name] += evt.self_cpu_time_total
    cats = dict.fromkeys(CATEGORIES, 0.0)
    rows = []
    for name, (count, us) in by_name.items():
        folded = min(fold_us.get(name, 0.0), us)
        cats["fold"] += folded
        cats[kernel_category(name)] += us - folded
        rows.append({"kernel": name[:160], "category": kernel_category(name), "calls": int(count), "ms": us / 1e3,
                     "fold_ms": folded / 1e3})
    busy_us = sum(cats.values()) or 1.0
    rows.sort(key=lambda r: -r["ms"])
    for r in rows:
        r["share"] = r["ms"] * 1e3 / busy_us
    return {"busy_s": busy_us / 1e6,
            "categories": {c: {"ms": us / 1e3, "share": us / busy_us} for c, us in cats.items()},
            "top": rows[:top]}


def linear_flops_per_sample(flow) -> float:
    """The blocks' Linear FLOPs of one forward of one sample (qkv, proj, fc1, fc2)."""
    cfg = flow.config
    d, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    return 2.0 * cfg.num_tokens * cfg.depth * (d * 3 * d + d * d + 2 * d * hidden)


def run(flow, args, device: torch.device, dtype: torch.dtype, results, budget, mm_rate: float | None) -> None:
    """The profile items (see the module docstring), added to ``results``."""
    cfg = flow.config
    gen = torch.Generator().manual_seed(0)
    batch, steps = args.batch, args.profile_steps
    x0 = torch.randn(batch, cfg.num_tokens, cfg.in_channels, generator=gen).to(device, dtype)
    x2 = x0[:2]
    per_sample = count_forward_flops(lambda: flow(x2, torch.rand(2, device=device),
                                                  torch.tensor([0, 1], device=device))) / 2
    linear = linear_flops_per_sample(flow)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r}; choose from {', '.join(VARIANTS)}")

    fused_out: list[torch.Tensor] = []

    def prof_item(label: str) -> dict[str, Any]:
        def once() -> torch.Tensor:
            return euler_sample(flow, x0, num_steps=steps, guidance_scale=args.guidance)

        first = once().float()  # compile, lazy init, the GELU probe
        check = {}
        if label == "fused":
            fused_out.append(first)
        elif fused_out:  # a variant must compute what the fused path computes, up to bf16 rounding
            check = {"rel_diff_vs_fused": float((first - fused_out[0]).norm() / fused_out[0].norm())}
        wall, prof = profiled(once, device, args.profile_calls)
        table = kernel_table(prof, device)
        forwards = 2 * batch * steps * args.profile_calls  # CFG: two rows per sample and step
        gemm_s = table["categories"]["GEMM"]["ms"] / 1e3
        gemm_tflops = linear * forwards / gemm_s / 1e12 if gemm_s > 0 else None
        out = {"wall_s": wall, **check, **table, "busy_frac": table["busy_s"] / wall,
               "flow_tflops_busy": per_sample * forwards / table["busy_s"] / 1e12, "gemm_tflops": gemm_tflops,
               "gemm_frac_of_mm": gemm_tflops / mm_rate if gemm_tflops and mm_rate else None}
        shares = ", ".join(f"{c} {v['share']:.1%}" for c, v in table["categories"].items())
        log(f"  {label}: {shares}; GEMMs at {gemm_tflops or 0:.0f} TFLOP/s")
        for r in table["top"][:8]:
            log(f"    {r['ms']:9.2f} ms {r['calls']:6d}x {r['category']:<22} {r['kernel'][:90]}")
        return out

    common = {"part": "profile", "batch": batch, "steps": steps, "calls": args.profile_calls}
    if not args.tiny:
        flow.compile_blocks()
    flow.disable_fused_inference()
    results.run(f"profile plain compile b{batch}", lambda: prof_item("plain compile"), device, budget,
                args.reserve_compile, variant="plain compile", **common)
    flow.enable_fused_inference(min_rows=args.min_rows)
    results.run(f"profile fused b{batch}", lambda: prof_item("fused"), device, budget, args.reserve_compile,
                variant="fused", **common)
    timed_out: list[torch.Tensor] = []

    def timed(name: str | None) -> dict[str, Any]:
        with variant(name, device, dtype) if name else contextlib.nullcontext():
            sampler = GraphedSampler(flow, num_steps=args.steps, guidance_scale=args.guidance, warmup=1)
            t = time_call(lambda: sampler(x0), device, args.warmup, args.iters, args.item_seconds)
            out = sampler(x0).float()
        check = {}
        if name is None:
            timed_out.append(out)
        elif timed_out:
            check = {"rel_diff_vs_fused": float((out - timed_out[0]).norm() / timed_out[0].norm())}
        tflops = per_sample * 2 * batch * args.steps / t["median_s"] / 1e12
        return {**t, **check, "images_per_s": batch / t["median_s"], "tflops": tflops,
                **mm_fractions(tflops, results.data["env"])}

    # The timed comparison before the variants' profiles: if the budget runs short, the profiles go first.
    graph = "plain" if args.tiny else "graph"
    for v in [None, *variants]:
        label = "fused" if v is None else f"fused {v}"
        results.run(f"flow {label}+{graph} b{batch}", lambda v=v: timed(v), device, budget, args.reserve,
                    part="flow", variant=f"{label}+{graph}", batch=batch, steps=args.steps)
    for v in variants:
        def item(v: str = v) -> dict[str, Any]:
            with variant(v, device, dtype):
                return prof_item(f"fused {v}")
        results.run(f"profile fused {v} b{batch}", item, device, budget, args.reserve, variant=f"fused {v}",
                    **common)

