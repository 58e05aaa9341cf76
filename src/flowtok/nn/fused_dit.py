"""A fused inference path through the flow's adaLN-Zero DiT blocks, for batches that share their condition.

FlowTok's condition is ``c = t_embedder(t) + null_embedder(null_indicator)``: within one Euler step every
sample has the same t, and the classifier-free-guidance batch ``[x ; x]`` has only two null indicators. So a
sampling step has at most two distinct condition vectors ``g``, hence two sets of shift / scale / gate vectors
per block, while a plain block applies them to every token in separate memory-bound passes. Here each
sub-block is one memory-bound pass and GEMMs:

    h = LN(x + P_g) * (1 + scale_g) + shift_g          one pass (a Triton kernel on a GPU)
    qkv / fc1 = h @ W^T + b                            one GEMM over every group's rows (fc1: + tanh-GELU)
    a = attention(qkv)                                 SDPA (cuDNN's kernel on an H100 / H200)
    x += a @ W''_g^T,  W''_g = diag(gate_g) W           proj and fc2: the gate folded into the weight's rows,
                                                       one batched GEMM over the groups, x its accumulator

The output GEMMs take the residual stream as their accumulator (``baddbmm_`` with beta = 1), so the residual add
costs nothing; their gated biases ``gate_g * b``, constant per group, are not added to the stream at all: they
are summed into a per-group vector ``P_g`` that the next LayerNorm adds as it reads, and the final layer adds
once. fc1's bias and the tanh-GELU run in cuBLASLt's epilogue (``torch._addmm_activation(..., use_gelu=True)``)
where a probe on the device shows that it computes tanh-GELU, the block's activation; elsewhere (the CPU's
kernel computes exact GELU) it is ``addmm`` then an in-place GELU.

Folding the gates reads proj's and fc2's weights once per step and writes a copy per group, which only pays
when each group has many rows: :func:`fused_blocks_forward` is for large batches, and the caller
(:meth:`flowtok.flow.FlowTransformer.forward_grouped`) falls back to the plain blocks below ``min_rows``.

FP8 blocks (:class:`flowtok.nn.fp8.FP8Linear`, from ``FlowTransformer.quantize_fp8``) run here too, each Linear
plain or FP8: the LayerNorm pass writes qkv's and fc1's input in e4m3 (static scale, or one per row) so that
quantising costs no pass; an FP8 fc1 adds its bias in ``_scaled_mm``'s epilogue and its GELU runs in one pass with
fc2's quantisation; an FP8 output Linear (proj, fc2) adds its bias in the epilogue, as the plain FP8 block does,
and the gate and residual add follow in one ``addcmul_`` (``_scaled_mm`` has no accumulator), its input quantised in
one pass (for proj, the same pass that turns SDPA's head-major output into token rows).

The LayerNorm pass and the fold run as the kernels of :mod:`flowtok.nn.triton_ops` where Triton can run them;
otherwise the LayerNorm pass is one ``torch.compile``-d function on a GPU and plain PyTorch on a CPU. (An
earlier version also folded the modulation into qkv's and fc1's weights, ``W'_g = W diag(1 + scale_g)``: that
moved three times the weight bytes per step and split those GEMMs per group; the modulation now rides in the
LayerNorm pass, which writes its output anyway.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_ops
from .dit import DiTBlock, FinalLayer
from .fp8 import FP8Linear, fp8_supported, quantize_rows, to_e4m3

log = logging.getLogger(__name__)

# Who computes the fused path's GEMMs whose epilogues carry more than a bias. "pytorch": fc1 and its tanh-GELU in
# cuBLASLt's GELU epilogue (torch._addmm_activation) where it computes tanh-GELU, else a GEMM then the GELU; an FP8
# fc1 is _scaled_mm, then the GELU and fc2's quantisation in one pass; an FP8 proj / fc2 is _scaled_mm, then the
# gated residual add in one pass. "triton", where Triton runs: flowtok's GEMMs (triton_ops.linear_gelu,
# linear_residual) do those epilogues themselves: fc1's bias and GELU (an FP8 fc1 writing an FP8 fc2's static-scale
# input in e4m3), and an FP8 output Linear's gated residual add into the stream. "auto" (the default): flowtok's
# GEMMs for FP8 Linears, cuBLAS for plain ones. Plain proj / fc2 stay cuBLAS GEMMs accumulating into the stream
# either way. On one H200 (2026-12-05, docs/benchmarks.md) cuBLASLt's GELU epilogue beat flowtok's bf16 GEMM
# (635 against 734 us for fc1 at batch 256), and flowtok's FP8 GEMMs beat _scaled_mm and its pass (fc2 into the
# stream 409 against 471 us; the FP8 flows 4.5-10% faster).
GEMM_EPILOGUES = ("auto", "pytorch", "triton")

_GELU_EPILOGUE: dict[tuple[str, torch.dtype], bool] = {}
_COMPILED: dict[tuple[str, str], Callable[..., Any] | None] = {}


@torch.no_grad()
def gelu_epilogue_is_tanh(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._addmm_activation(bias, a, b, use_gelu=True)`` computes tanh-GELU(a @ b + bias) on this
    device and dtype (cached). The probe makes ``a @ b + bias`` exact (``a`` the identity) over a grid where
    tanh-GELU and exact GELU round to different values, and counts which of the two the output equals.
    (The CPU kernel, torch 2.13, applies exact GELU.)"""
    key = (str(device), dtype)
    if key not in _GELU_EPILOGUE:
        n = 256
        eye = torch.eye(n, device=device, dtype=dtype)
        # Multiples of 1/32 within [-4.25, 4.25]: x + bias is exact in bf16, so an epilogue that adds the
        # bias in fp32 and a kernel that rounds a @ b + bias first apply GELU to the same number.
        x = ((torch.arange(n * n, device=device) % 257 - 128) / 32).view(n, n).to(dtype)
        bias = ((torch.arange(n, device=device) % 17 - 8) / 32).to(dtype)
        try:
            out = torch._addmm_activation(bias, eye, x, use_gelu=True).float()
        except RuntimeError:
            _GELU_EPILOGUE[key] = False
            return False
        pre = x.float() + bias.float()
        tanh, exact = (F.gelu(pre, approximate=a).to(dtype).float() for a in ("tanh", "none"))
        differ = tanh != exact
        on_tanh = int((out == tanh)[differ].sum())
        on_exact = int((out == exact)[differ].sum())
        close = bool(torch.allclose(out, tanh, rtol=0.02, atol=0.02))
        _GELU_EPILOGUE[key] = close and on_tanh > 4 * on_exact
        log.debug("gelu epilogue on %s %s: %d tanh / %d exact matches", device, dtype, on_tanh, on_exact)
    return _GELU_EPILOGUE[key]


def _modulated_layer_norm_eager(x: torch.Tensor, pending: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                eps: float) -> torch.Tensor:
    groups, _, d = x.shape
    shift, scale = shift.reshape(groups, 1, d), scale.reshape(groups, 1, d)
    return F.layer_norm(x + pending, x.shape[-1:], eps=eps) * (1 + scale) + shift


def _run_compiled(fn: Callable[..., Any], *args: Any, fp8: bool = False) -> Any:
    """``fn(*args)`` through one ``torch.compile``-d copy of ``fn`` per device type on CUDA (a GPU with FP8 matmuls
    if ``fp8``: an e4m3 cast is compiled only where the hardware has it); eagerly elsewhere, or once compiling
    has failed."""
    x = args[0]
    key = (fn.__name__, x.device.type)
    if key not in _COMPILED:
        _COMPILED[key] = None
        if x.is_cuda and (not fp8 or fp8_supported(x.device)):
            try:
                _COMPILED[key] = torch.compile(fn, dynamic=False, fullgraph=True)
            except Exception as exc:  # noqa: BLE001 - no inductor here: the eager passes are still right
                log.warning("%s not compiled (%s); using eager passes", fn.__name__, exc)
    compiled = _COMPILED[key]
    if compiled is not None:
        try:
            return compiled(*args)
        except Exception as exc:  # noqa: BLE001 - a compile failure must not break sampling
            log.warning("compiled %s failed (%s: %s); using eager passes", fn.__name__, type(exc).__name__, exc)
            _COMPILED[key] = None
    return fn(*args)


def modulated_layer_norm(x: torch.Tensor, pending: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                         eps: float) -> torch.Tensor:
    """``LayerNorm(x + pending) * (1 + scale) + shift`` without LayerNorm affine; x ``[G, R, D]``, pending
    ``[G, 1, D]``, shift and scale ``[G, D]`` (rows of the adaLN output: any row stride). One pass: the Triton
    kernel where Triton runs (:func:`flowtok.nn.triton_ops.available`); else, on CUDA, one compiled kernel;
    elsewhere, or if compiling fails, eager passes."""
    if triton_ops.available(x):
        return triton_ops.add_layer_norm_modulate(x, pending, shift, scale, eps)
    return cast(torch.Tensor, _run_compiled(_modulated_layer_norm_eager, x, pending, shift, scale, eps))


# An FP8 Linear's input: e4m3 rows and their scale (a scalar, or one per row), as FP8Linear.matmul takes them.
Quantized = tuple[torch.Tensor, torch.Tensor]


def _quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return to_e4m3(x, scale)


def _gelu_quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return to_e4m3(F.gelu(x, approximate="tanh"), scale)


def _gelu_quantize_rows(x: torch.Tensor) -> Quantized:
    return quantize_rows(F.gelu(x, approximate="tanh"))


def _heads_to_rows(o: torch.Tensor) -> torch.Tensor:
    """SDPA's output ``[B, H, N, dh]`` as token rows ``[B * N, H * dh]``."""
    b, h, n, dh = o.shape
    return o.transpose(1, 2).reshape(b * n, h * dh)


def _heads_quantize_static(o: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return to_e4m3(_heads_to_rows(o), scale)


def _heads_quantize_rows(o: torch.Tensor) -> Quantized:
    return quantize_rows(_heads_to_rows(o))


_QUANTIZERS: dict[tuple[str, bool], Callable[..., Any]] = {  # (input form, static scale) -> one pass
    ("rows", True): _quantize_static, ("rows", False): quantize_rows,
    ("gelu", True): _gelu_quantize_static, ("gelu", False): _gelu_quantize_rows,
    ("heads", True): _heads_quantize_static, ("heads", False): _heads_quantize_rows,
}


def _quantize_for(layer: FP8Linear, x: torch.Tensor, form: str = "rows") -> Quantized:
    """``x`` quantised as ``layer`` quantises its input, in one pass (one compiled kernel on an FP8 GPU): rows
    ``[M, in]`` as they are (``form="rows"``), after a tanh-GELU (``"gelu"``), or SDPA's output ``[B, H, N, dh]``
    whose head-major layout the same pass turns into token rows (``"heads"``)."""
    fn = _QUANTIZERS[(form, layer.input_scale is not None)]
    if layer.input_scale is not None:
        return _run_compiled(fn, x, layer.input_scale, fp8=True), layer.input_scale
    return cast(Quantized, _run_compiled(fn, x, fp8=True))


def _modulated_input(layer: nn.Module, x: torch.Tensor, pending: torch.Tensor, shift: torch.Tensor,
                     scale: torch.Tensor, eps: float) -> torch.Tensor | Quantized:
    """The input of ``layer`` (qkv or fc1) from the stream: the modulated LayerNorm as rows ``[G * R, D]``, in
    e4m3 with its scale if ``layer`` is an :class:`FP8Linear` (written so by the LayerNorm kernel where Triton
    runs FP8; else quantised in a pass of its own)."""
    d = x.shape[-1]
    if isinstance(layer, FP8Linear):
        if triton_ops.available_fp8(x):
            q, q_scale = triton_ops.add_layer_norm_modulate_fp8(x, pending, shift, scale, eps, layer.input_scale)
            return q.view(-1, d), q_scale
        return _quantize_for(layer, modulated_layer_norm(x, pending, shift, scale, eps).view(-1, d))
    return modulated_layer_norm(x, pending, shift, scale, eps).view(-1, d)


def _linear(module: nn.Module) -> nn.Linear:
    return cast(nn.Linear, module)


def _fold_out(linear: nn.Linear, gate: torch.Tensor, pending: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W''_g [G, out, in], pending + gate_g * b [G, 1, out]): the gate folded into the output rows, and the
    gated bias moved into the pending vector."""
    w, bias = linear.weight, linear.bias
    if triton_ops.available(w):
        return triton_ops.fold_gate(w, bias, gate, pending)
    folded = w.unsqueeze(0) * gate.unsqueeze(2)
    return folded, (pending + (gate * bias).unsqueeze(1) if bias is not None else pending)


def _gemm_gelu(a: torch.Tensor, linear: nn.Linear, epilogue: bool, triton_gemm: bool = False) -> torch.Tensor:
    """``tanh-GELU(a @ W^T + b)``: flowtok's Triton GEMM with the bias and GELU in its epilogue if ``triton_gemm``,
    else in cuBLASLt's epilogue if ``epilogue``, else a GEMM then an in-place GELU."""
    w, bias = linear.weight, linear.bias
    if triton_gemm:
        return triton_ops.linear_gelu(a, w, bias)
    if epilogue:
        return torch._addmm_activation(bias if bias is not None else w.new_zeros(w.shape[0]), a, w.t(),
                                       use_gelu=True)
    return torch.ops.aten.gelu_(linear(a), approximate="tanh")


def _fp8_gemm_gelu(fc1: FP8Linear, fc2: nn.Module, h: Quantized, dtype: torch.dtype) -> torch.Tensor | Quantized:
    """An FP8 fc1 with its bias and GELU in the epilogue of flowtok's Triton GEMM, written as fc2's input: in e4m3
    with fc2's static scale (no pass of its own), else in bf16 (then quantised per row for an FP8 fc2)."""
    q, scale = h
    fc2_scale = fc2.input_scale if isinstance(fc2, FP8Linear) else None
    out = triton_ops.linear_gelu(q, fc1.weight_fp8, fc1.bias, x_scale=scale, w_scale=fc1.weight_scale,
                                 out_scale=fc2_scale)
    if fc2_scale is not None:
        return out, fc2_scale
    return _quantize_for(fc2, out) if isinstance(fc2, FP8Linear) else out.to(dtype)


def _accumulate(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> None:
    """``x[g] += a[g] @ w[g]^T`` for every group ``g`` as one batched GEMM with ``x`` its accumulator, one launch
    whose tiles cover both groups. (On an H200 the flow at batch 256 ran 1.4-1.7 points of ``mm`` faster this way
    than with one GEMM per group, cuBLAS picking other tiles for it; same numbers, no change at batch 64.)"""
    x.baddbmm_(a, w.transpose(1, 2))


def _output(layer: nn.Module, x: torch.Tensor, a: torch.Tensor | Quantized, gate: torch.Tensor,
            pending: torch.Tensor, triton_fp8: bool = False) -> torch.Tensor:
    """``x += gate_g * (a @ W^T + b)`` for an output Linear (proj, fc2) with ``a`` its input rows (quantised for
    an :class:`FP8Linear`); returns the pending bias vector. A plain Linear takes the gate folded into its weight
    and ``x`` as the GEMM's accumulator, and moves its gated bias into the pending vector; an FP8 one adds its
    bias in the GEMM's epilogue, as the plain FP8 block does, and scales the product by the gate in the residual
    add (one pass: ``_scaled_mm`` has no accumulator), or, if ``triton_fp8``, in the epilogue of flowtok's
    Triton GEMM, which reads and writes the stream itself."""
    groups, rows, d = x.shape
    if isinstance(layer, FP8Linear):
        q, q_scale = cast(Quantized, a)
        if triton_fp8:
            triton_ops.linear_residual(x, q, layer.weight_fp8, layer.bias, gate, x_scale=q_scale,
                                       w_scale=layer.weight_scale)
            return pending
        y = layer.matmul(q, q_scale).view(groups, rows, d)
        x.addcmul_(y.to(x.dtype), gate.unsqueeze(1))
        return pending
    w, after = _fold_out(_linear(layer), gate, pending)
    _accumulate(x, cast(torch.Tensor, a).view(groups, rows, -1), w)
    return after


def _block(block: DiTBlock, x: torch.Tensor, pending: torch.Tensor, mod: torch.Tensor, batch: int,
           epilogue: bool, triton_plain: bool = False, triton_fp8: bool = False) -> torch.Tensor:
    """One block on the stream ``x [G, R, D]`` (updated in place) with its adaLN output ``mod [G, 6 D]``; returns the
    new pending bias [G, 1, D]. Each of the four Linears may be plain or FP8. flowtok's Triton GEMMs compute a
    plain fc1 with its bias and GELU if ``triton_plain``, and FP8 Linears' epilogues (fc1's GELU, proj's and fc2's
    gated residual add) if ``triton_fp8`` (the caller checks that Triton runs FP8 here); else a plain fc1 runs in
    cuBLASLt's GELU epilogue if ``epilogue``."""
    groups, rows, d = x.shape
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
    attn, mlp = block.attn, block.mlp

    h = _modulated_input(attn.qkv, x, pending, shift_msa, scale_msa, block.norm1.eps)
    qkv = attn.qkv.matmul(*h).to(x.dtype) if isinstance(attn.qkv, FP8Linear) else attn.qkv(h)
    heads = attn.num_heads
    q, k, v = qkv.view(groups * batch, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v)  # [G * b, H, N, dh]
    after_attn = _output(attn.proj, x, _quantize_for(attn.proj, o, "heads") if isinstance(attn.proj, FP8Linear)
                         else _heads_to_rows(o), gate_msa, pending, triton_fp8)

    h = _modulated_input(mlp.fc1, x, after_attn, shift_mlp, scale_mlp, block.norm2.eps)
    hidden: torch.Tensor | Quantized
    if isinstance(mlp.fc1, FP8Linear) and triton_fp8:
        hidden = _fp8_gemm_gelu(mlp.fc1, mlp.fc2, cast(Quantized, h), x.dtype)
    elif isinstance(mlp.fc1, FP8Linear):  # bias in the FP8 GEMM's epilogue; GELU (and fc2's quantisation) after it
        pre = mlp.fc1.matmul(*h).to(x.dtype)
        hidden = _quantize_for(mlp.fc2, pre, "gelu") if isinstance(mlp.fc2, FP8Linear) \
            else torch.ops.aten.gelu_(pre, approximate="tanh")
    else:
        hidden = _gemm_gelu(cast(torch.Tensor, h), _linear(mlp.fc1), epilogue, triton_plain)
        if isinstance(mlp.fc2, FP8Linear):
            hidden = _quantize_for(mlp.fc2, hidden)
    return _output(mlp.fc2, x, hidden, gate_mlp, after_attn, triton_fp8)


def _modulation(module: nn.Module, silu_cond: torch.Tensor) -> torch.Tensor:
    """An ``adaLN_modulation`` (SiLU then Linear) applied to the condition after its SiLU, which all share."""
    linear = _linear(cast(nn.Sequential, module)[1])
    return F.linear(silu_cond, linear.weight, linear.bias)


def fused_block_supported(block: DiTBlock) -> bool:
    """Plain or FP8 Linears (:class:`flowtok.nn.fp8.FP8Linear`, static or per-row scales) in attention and MLP,
    a plain adaLN Linear, and the tanh-GELU MLP: what the fold assumes."""
    linears = (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2)
    return all(type(m) in (nn.Linear, FP8Linear) for m in linears) \
        and type(block.adaLN_modulation[1]) is nn.Linear and block.mlp.approximate == "tanh" \
        and isinstance(block.adaLN_modulation[0], nn.SiLU) and len(block.adaLN_modulation) == 2 \
        and isinstance(block.attn.q_norm, nn.Identity) and isinstance(block.attn.k_norm, nn.Identity)


@torch.no_grad()
def fused_blocks_forward(blocks: nn.ModuleList, final_layer: FinalLayer, h: torch.Tensor,
                         cond: torch.Tensor, gemm_epilogues: str = "auto") -> torch.Tensor:
    """The DiT blocks and final layer over ``h [G * b, N, D]`` whose ``G`` contiguous groups of ``b`` samples
    each share one condition row of ``cond [G, D]``. Inference only; ``h`` is not modified. Equals
    ``final_layer(blocks(h, c), c)`` with ``c`` each group's row repeated, up to rounding. ``gemm_epilogues``: who
    computes the GEMMs with more than a bias in their epilogue, one of :data:`GEMM_EPILOGUES`."""
    if gemm_epilogues not in GEMM_EPILOGUES:
        raise ValueError(f"gemm_epilogues must be one of {', '.join(GEMM_EPILOGUES)}, got {gemm_epilogues!r}")
    groups = cond.shape[0]
    if h.shape[0] % groups:
        raise ValueError(f"batch {h.shape[0]} does not split into {groups} equal groups")
    batch, n, d = h.shape[0] // groups, h.shape[1], h.shape[2]
    x = h.reshape(groups, batch * n, d).clone()
    pending = x.new_zeros(groups, 1, d)
    epilogue = gelu_epilogue_is_tanh(x.device, x.dtype)
    triton_plain = gemm_epilogues == "triton" and triton_ops.available(x)
    triton_fp8 = gemm_epilogues in ("auto", "triton") and triton_ops.available_fp8(x)
    silu_cond = F.silu(cond)
    for block in blocks:
        blk = cast(DiTBlock, block)
        if not fused_block_supported(blk):
            raise ValueError("the fused path needs plain or FP8 Linears and the tanh-GELU MLP")
        pending = _block(blk, x, pending, _modulation(blk.adaLN_modulation, silu_cond), batch, epilogue,
                         triton_plain, triton_fp8)
    shift, scale = _modulation(final_layer.adaLN_modulation, silu_cond).chunk(2, dim=1)
    y = modulated_layer_norm(x, pending, shift, scale, final_layer.norm_final.eps).view(groups * batch * n, d)
    out = final_layer.linear(y)
    return out.view(groups * batch, n, -1)
