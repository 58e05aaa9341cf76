"""Triton kernels of the fused DiT inference path (:mod:`flowtok.nn.fused_dit`).

Two memory-bound passes that PyTorch's own kernels run well below the GPU's bandwidth:

* :func:`add_layer_norm_modulate`: ``LayerNorm(x + pending) * (1 + scale) + shift`` with no LayerNorm affine,
  ``x [G, R, D]`` and one ``pending`` / ``shift`` / ``scale`` row per group ``g``: one read of ``x`` and one
  write, statistics and modulation in fp32, one rounding to the output dtype. (On an H200 the compiled
  inductor kernel for ``LayerNorm(x + pending)`` alone moved about 1 TB/s at FlowTok-XL's D = 1152.)
* :func:`scale_rows`: ``out[g] = diag(gate[g]) @ w``, the adaLN gate folded into an output Linear's rows for
  every group at once: ``w`` read once, written ``G`` times.

They run where Triton runs: on a CUDA device, or on a CPU under Triton's interpreter (``TRITON_INTERPRET=1``
set before this module is imported; the tests do this). :func:`available` says whether a tensor can take
them; callers keep a PyTorch path for everything else. ``FLOWTOK_TRITON=0`` in the environment, or
``ENABLED = False``, turns them off.
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # type: ignore[import-untyped]
    import triton.language as tl  # type: ignore[import-untyped]
except ImportError:  # the CPU wheel of torch brings no Triton: the callers' PyTorch path runs
    triton = None

ENABLED = os.environ.get("FLOWTOK_TRITON", "1") != "0"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether ``x`` can go through these kernels: Triton imports, they are enabled, and ``x`` is on a CUDA
    device (or on the CPU under Triton's interpreter)."""
    if triton is None or not ENABLED:
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


if triton is not None:

    @triton.jit
    def _add_layer_norm_modulate_kernel(x_ptr, pending_ptr, shift_ptr, scale_ptr, y_ptr, n_rows,
                                        rows_per_group, d, eps, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                                        MODULATE: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows < n_rows)[:, None] & (cols < d)[None, :]
        offsets = rows.to(tl.int64)[:, None] * d + cols[None, :]
        per_group = (rows // rows_per_group)[:, None] * d + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x += tl.load(pending_ptr + per_group, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / d
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / d + eps)
        y = centred * rstd[:, None]
        if MODULATE:
            scale = tl.load(scale_ptr + per_group, mask=mask, other=0.0).to(tl.float32)
            shift = tl.load(shift_ptr + per_group, mask=mask, other=0.0).to(tl.float32)
            y = y * (1.0 + scale) + shift
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_rows_kernel(w_ptr, gate_ptr, out_ptr, n_out, n_in, GROUPS: tl.constexpr, BLOCK_O: tl.constexpr,
                           BLOCK_I: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        row_ok = rows < n_out
        mask = row_ok[:, None] & (cols < n_in)[None, :]
        offsets = rows.to(tl.int64)[:, None] * n_in + cols[None, :]
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        for g in tl.static_range(GROUPS):
            gate = tl.load(gate_ptr + g * n_out + rows, mask=row_ok, other=0.0).to(tl.float32)
            out = (w * gate[:, None]).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + g * n_out * n_in + offsets, out, mask=mask)


def _rows_per_program(block_d: int) -> tuple[int, int]:
    """(rows per program, warps) for the LayerNorm kernel: about 4,096 elements a program, 8 warps at most."""
    rows = max(1, 4096 // block_d)
    return rows, min(8, max(1, rows * block_d // 512))


def add_layer_norm_modulate(x: torch.Tensor, pending: torch.Tensor, shift: torch.Tensor | None,
                            scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``LayerNorm(x + pending) * (1 + scale) + shift`` (no affine) over ``x [G, R, D]`` with ``pending``,
    ``shift`` and ``scale`` one row per group (``[G, D]`` or ``[G, 1, D]``; ``shift`` / ``scale`` None: no
    modulation). Returns a new ``[G, R, D]`` tensor of ``x``'s dtype. Needs :func:`available`."""
    groups, rows, d = x.shape
    x = x.contiguous()
    pending = pending.reshape(groups, d).contiguous()
    modulate = shift is not None and scale is not None
    shift_t = shift.reshape(groups, d).contiguous() if modulate else pending  # type: ignore[union-attr]
    scale_t = scale.reshape(groups, d).contiguous() if modulate else pending  # type: ignore[union-attr]
    y = torch.empty_like(x)
    n_rows = groups * rows
    if n_rows == 0:
        return y
    block_d = triton.next_power_of_2(d)
    per_program, warps = _rows_per_program(block_d)
    grid = (triton.cdiv(n_rows, per_program),)
    _add_layer_norm_modulate_kernel[grid](x, pending, shift_t, scale_t, y, n_rows, rows, d, eps,
                                          BLOCK_D=block_d, ROWS=per_program, MODULATE=modulate,
                                          num_warps=warps)
    return y


def scale_rows(w: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``out[g] = gate[g][:, None] * w`` for ``w [O, I]`` and ``gate [G, O]``: ``[G, O, I]`` in ``w``'s dtype, the
    product rounded once (as PyTorch's broadcast multiply rounds it). Needs :func:`available`."""
    groups, n_out = gate.shape
    if w.shape[0] != n_out:
        raise ValueError(f"gate has {n_out} rows for a weight of {w.shape[0]}")
    w = w.contiguous()
    gate = gate.contiguous()
    out = torch.empty(groups, *w.shape, dtype=w.dtype, device=w.device)
    block_o, block_i = 32, 128
    grid = (triton.cdiv(n_out, block_o), triton.cdiv(w.shape[1], block_i))
    _scale_rows_kernel[grid](w, gate, out, n_out, w.shape[1], GROUPS=groups, BLOCK_O=block_o, BLOCK_I=block_i,
                             num_warps=4)
    return out
