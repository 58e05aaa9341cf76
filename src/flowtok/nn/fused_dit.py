"""A fused inference path through the flow's adaLN-Zero DiT blocks, for batches that share their condition.

FlowTok's condition is ``c = t_embedder(t) + null_embedder(null_indicator)``: within one Euler step every
sample has the same t, and the classifier-free-guidance batch ``[x ; x]`` has only two null indicators. So a
sampling step has at most two distinct condition vectors, hence two sets of shift / scale / gate vectors per
block, while a plain block applies them to every token in separate memory-bound passes. Here they go into the
weights instead, once per step and per distinct condition ``g``::

    LN(x) * (1 + scale) + shift  ->  Linear(W, b)      ==  LN(x) @ W'_g^T + b'_g,
        W'_g = W diag(1 + scale_g),  b'_g = b + W shift_g                       (qkv and fc1)
    x + gate * Linear(W, b)(a)                          ==  x + a @ W''_g^T + gate_g * b,
        W''_g = diag(gate_g) W                                                  (proj and fc2)

and every sub-block becomes: one LayerNorm pass (no affine), GEMMs over each group's rows, attention
through SDPA. The output GEMMs take the residual stream as their accumulator (``addmm_`` with beta = 1), so
the residual add costs nothing; their gated biases, constant per group, are not added to the stream at all:
they are summed into a per-group vector ``P`` that the next LayerNorm adds as it reads (``LN(x + P)``, one
pass, compiled into a single kernel on a GPU) and the final layer adds once. fc1's bias and the tanh-GELU
run in cuBLASLt's epilogue (``torch._addmm_activation(..., use_gelu=True)``) where a probe on the device
shows that it computes tanh-GELU, the block's activation; elsewhere (the CPU's kernel computes exact GELU)
it is ``addmm`` then an in-place GELU.

Folding reads and writes the block's four big weight matrices once per group and step, which only pays
when each group has many rows: :func:`fused_blocks_forward` is for large batches, and the caller
(:meth:`flowtok.flow.FlowTransformer.forward_grouped`) falls back to the plain blocks below ``min_rows``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .dit import DiTBlock, FinalLayer

log = logging.getLogger(__name__)

_GELU_EPILOGUE: dict[tuple[str, torch.dtype], bool] = {}
_ADD_LN: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None] = {}


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


def _add_layer_norm_eager(x: torch.Tensor, pending: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x + pending, x.shape[-1:], eps=eps)


def add_layer_norm(x: torch.Tensor, pending: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x + pending)`` without affine; x ``[G, R, D]``, pending ``[G, 1, D]``. On CUDA one compiled
    kernel (read x, write the result); elsewhere, or if compiling fails, two eager passes."""
    kind = x.device.type
    if kind not in _ADD_LN:
        _ADD_LN[kind] = None
        if kind == "cuda":
            try:
                _ADD_LN[kind] = torch.compile(_add_layer_norm_eager, dynamic=False, fullgraph=True)
            except Exception as exc:  # noqa: BLE001 - no inductor here: the eager passes are still right
                log.warning("add+LayerNorm not compiled (%s); using eager passes", exc)
    fn = _ADD_LN[kind]
    if fn is not None:
        try:
            return fn(x, pending, eps)
        except Exception as exc:  # noqa: BLE001 - a compile failure must not break sampling
            log.warning("compiled add+LayerNorm failed (%s: %s); using eager passes", type(exc).__name__, exc)
            _ADD_LN[kind] = None
    return _add_layer_norm_eager(x, pending, eps)


def _linear(module: nn.Module) -> nn.Linear:
    return cast(nn.Linear, module)


def _fold_in(linear: nn.Linear, shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W'_g [G, out, in], b'_g [G, out]) with LN(x)(1 + scale) + shift folded in on the input side."""
    w, b = linear.weight, linear.bias
    folded = w.unsqueeze(0) * (1 + scale).unsqueeze(1)
    bias = torch.addmm(b, shift, w.t()) if b is not None else shift @ w.t()
    return folded, bias


def _fold_out(linear: nn.Linear, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W''_g [G, out, in], gate_g * b [G, out]): the gate folded into the output rows."""
    folded = linear.weight.unsqueeze(0) * gate.unsqueeze(2)
    bias = gate * linear.bias if linear.bias is not None else torch.zeros_like(gate)
    return folded, bias


def _gemm_gelu(bias: torch.Tensor, a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, epilogue: bool) -> None:
    if epilogue:
        torch._addmm_activation(bias, a, w.t(), use_gelu=True, out=out)
    else:
        torch.addmm(bias, a, w.t(), out=out)
        torch.ops.aten.gelu_(out, approximate="tanh")


def _block(block: DiTBlock, x: torch.Tensor, pending: torch.Tensor, mod: torch.Tensor, batch: int,
           epilogue: bool) -> torch.Tensor:
    """One block on the stream ``x [G, R, D]`` (updated in place); returns the new pending bias [G, 1, D]."""
    groups, rows, d = x.shape
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
    attn = block.attn
    w_qkv, b_qkv = _fold_in(_linear(attn.qkv), shift_msa, scale_msa)
    w_proj, b_proj = _fold_out(_linear(attn.proj), gate_msa)
    w_fc1, b_fc1 = _fold_in(_linear(block.mlp.fc1), shift_mlp, scale_mlp)
    w_fc2, b_fc2 = _fold_out(_linear(block.mlp.fc2), gate_mlp)

    h = add_layer_norm(x, pending, block.norm1.eps)
    qkv = x.new_empty(groups, rows, w_qkv.shape[1])
    for g in range(groups):
        torch.addmm(b_qkv[g], h[g], w_qkv[g].t(), out=qkv[g])
    heads = attn.num_heads
    q, k, v = qkv.view(groups * batch, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(groups, rows, d)
    for g in range(groups):
        x[g].addmm_(o[g], w_proj[g].t())
    pending = pending + b_proj.unsqueeze(1)

    h = add_layer_norm(x, pending, block.norm2.eps)
    hidden = x.new_empty(groups, rows, w_fc1.shape[1])
    for g in range(groups):
        _gemm_gelu(b_fc1[g], h[g], w_fc1[g], hidden[g], epilogue)
    for g in range(groups):
        x[g].addmm_(hidden[g], w_fc2[g].t())
    return pending + b_fc2.unsqueeze(1)


def fused_block_supported(block: DiTBlock) -> bool:
    """Plain Linears (not FP8 or other replacements) and the tanh-GELU MLP: what the fold assumes."""
    linears = (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2)
    return all(type(m) is nn.Linear for m in linears) and block.mlp.approximate == "tanh" \
        and isinstance(block.attn.q_norm, nn.Identity) and isinstance(block.attn.k_norm, nn.Identity)


@torch.no_grad()
def fused_blocks_forward(blocks: nn.ModuleList, final_layer: FinalLayer, h: torch.Tensor,
                         cond: torch.Tensor) -> torch.Tensor:
    """The DiT blocks and final layer over ``h [G * b, N, D]`` whose ``G`` contiguous groups of ``b`` samples
    each share one condition row of ``cond [G, D]``. Inference only; ``h`` is not modified. Equals
    ``final_layer(blocks(h, c), c)`` with ``c`` each group's row repeated, up to rounding."""
    groups = cond.shape[0]
    if h.shape[0] % groups:
        raise ValueError(f"batch {h.shape[0]} does not split into {groups} equal groups")
    batch, n, d = h.shape[0] // groups, h.shape[1], h.shape[2]
    x = h.reshape(groups, batch * n, d).clone()
    pending = x.new_zeros(groups, 1, d)
    epilogue = gelu_epilogue_is_tanh(x.device, x.dtype)
    for block in blocks:
        blk = cast(DiTBlock, block)
        if not fused_block_supported(blk):
            raise ValueError("the fused path needs plain Linears and the tanh-GELU MLP (not an FP8 or other block)")
        pending = _block(blk, x, pending, blk.adaLN_modulation(cond), batch, epilogue)
    shift, scale = final_layer.adaLN_modulation(cond).chunk(2, dim=1)
    w_out, b_out = _fold_in(final_layer.linear, shift, scale)
    y = add_layer_norm(x, pending, final_layer.norm_final.eps)
    out = x.new_empty(groups, batch * n, w_out.shape[1])
    for g in range(groups):
        torch.addmm(b_out[g], y[g], w_out[g].t(), out=out[g])
    return out.view(groups * batch, n, -1)
