"""Triton kernels of the fused DiT inference path (:mod:`flowtok.nn.fused_dit`).

Kernels that PyTorch's own run below the GPU's bandwidth, or in more passes than needed:

* :func:`add_layer_norm_modulate`: ``LayerNorm(x + pending) * (1 + scale) + shift`` with no LayerNorm affine,
  ``x [G, R, D]`` and one ``pending`` / ``shift`` / ``scale`` row per group ``g``: one read of ``x`` and one
  write, statistics and modulation in fp32, one rounding to the output dtype. (On an H200 the compiled
  inductor kernel for ``LayerNorm(x + pending)`` alone moved about 1 TB/s at FlowTok-XL's D = 1152.)
  :func:`add_layer_norm_modulate_fp8` writes the same in e4m3 for an FP8 GEMM (a static scale, or one per row
  from the row's amax), so that quantising the GEMM's input costs no pass of its own.
* :func:`fold_gate`: ``diag(gate[g]) @ w``, the adaLN gate folded into an output Linear's rows for every group
  at once (``w`` read once, written ``G`` times), and the gated bias added to the groups' pending vectors.

And two GEMMs whose epilogues do what would otherwise be a pass of its own (bf16 / fp16 / fp32 operands, or an FP8
Linear's e4m3 ones with their scales): :func:`linear_gelu`, an MLP's first Linear with its bias and tanh-GELU
(writing the next FP8 Linear's e4m3 input if asked), and :func:`linear_residual`, an adaLN-Zero block's output
Linear adding its gated output into the residual stream in place.

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


def available_fp8(x: torch.Tensor) -> bool:
    """Whether ``x`` can go through the kernels that write e4m3: :func:`available`, on a GPU that has FP8 (compute
    capability 8.9 or newer) or under the interpreter."""
    if not available(x):
        return False
    return not x.is_cuda or torch.cuda.get_device_capability(x.device) >= (8, 9)


if triton is not None:

    @triton.jit
    def _e4m3_grid(v):
        # v (fp32, already within +-448) rounded to the nearest e4m3 value, ties to even, still in fp32: the cast
        # that follows is then exact, so a GPU and the interpreter (whose own e4m3 cast truncates) store the same
        # byte. Step of v's binade: 2^(e - 3) for 3 mantissa bits, e from the exponent bits, subnormals below
        # 2^-6; v / step < 2^5, so adding and subtracting 1.5 * 2^23 rounds it to an integer, ties to even.
        e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        step = (((tl.maximum(e, -6) - 3) + 127) << 23).to(tl.float32, bitcast=True)
        magic = 12582912.0
        return ((v / step + magic) - magic) * step

    @triton.jit
    def _operand(x, UPCAST: tl.constexpr):
        if UPCAST:
            return x.to(tl.float32)
        return x

    @triton.jit
    def _add_layer_norm_modulate_kernel(x_ptr, pending_ptr, pending_stride, shift_ptr, scale_ptr, mod_stride, y_ptr,
                                        q_scale_ptr, n_rows, rows_per_group, d, eps, MAIN: tl.constexpr,
                                        TAIL: tl.constexpr, ROWS: tl.constexpr, MODULATE: tl.constexpr,
                                        QUANT: tl.constexpr):
        # A row's d columns are read as a power-of-two MAIN part and a TAIL part (d = 1152: 1024 + 128), so that no
        # lane of a program idles on masked-off columns, as it would in one block of next_power_of_2(d).
        # QUANT: 0 stores y; 1 stores y / q_scale[0] in e4m3 (a static scale); 2 stores y / s_row in e4m3 with
        # s_row = amax(|y_row|) / 448, written to q_scale[row]. Both saturate at +-448.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = (rows < n_rows)[:, None]
        base = rows.to(tl.int64)[:, None] * d
        group = (rows // rows_per_group)[:, None]
        c0 = tl.arange(0, MAIN)[None, :]
        x0 = tl.load(x_ptr + base + c0, mask=row_ok, other=0.0).to(tl.float32)
        x0 += tl.load(pending_ptr + group * pending_stride + c0, mask=row_ok, other=0.0).to(tl.float32)
        total = tl.sum(x0, axis=1)
        if TAIL > 0:
            c1 = MAIN + tl.arange(0, TAIL)[None, :]
            m1 = row_ok & (c1 < d)
            x1 = tl.load(x_ptr + base + c1, mask=m1, other=0.0).to(tl.float32)
            x1 += tl.load(pending_ptr + group * pending_stride + c1, mask=m1, other=0.0).to(tl.float32)
            total += tl.sum(x1, axis=1)
        mean = (total / d)[:, None]
        x0 = x0 - mean
        squares = tl.sum(x0 * x0, axis=1)
        if TAIL > 0:
            x1 = tl.where(m1, x1 - mean, 0.0)
            squares += tl.sum(x1 * x1, axis=1)
        rstd = (1.0 / tl.sqrt(squares / d + eps))[:, None]
        y0 = x0 * rstd
        if MODULATE:
            y0 = y0 * (1.0 + tl.load(scale_ptr + group * mod_stride + c0, mask=row_ok, other=0.0).to(tl.float32)) \
                + tl.load(shift_ptr + group * mod_stride + c0, mask=row_ok, other=0.0).to(tl.float32)
        if TAIL > 0:
            y1 = x1 * rstd
            if MODULATE:
                y1 = y1 * (1.0 + tl.load(scale_ptr + group * mod_stride + c1, mask=m1, other=0.0).to(tl.float32)) \
                    + tl.load(shift_ptr + group * mod_stride + c1, mask=m1, other=0.0).to(tl.float32)
        if QUANT == 1:
            q_scale = tl.load(q_scale_ptr).to(tl.float32)
            y0 = tl.minimum(tl.maximum(y0 / q_scale, -448.0), 448.0)
            if TAIL > 0:
                y1 = tl.minimum(tl.maximum(y1 / q_scale, -448.0), 448.0)
        if QUANT == 2:
            amax = tl.max(tl.where(row_ok, tl.abs(y0), 0.0), axis=1)
            if TAIL > 0:
                amax = tl.maximum(amax, tl.max(tl.where(m1, tl.abs(y1), 0.0), axis=1))
            row_scale = tl.maximum(amax, 1e-12) / 448.0
            tl.store(q_scale_ptr + rows, row_scale, mask=rows < n_rows)
            y0 = tl.minimum(tl.maximum(y0 / row_scale[:, None], -448.0), 448.0)
            if TAIL > 0:
                y1 = tl.minimum(tl.maximum(y1 / row_scale[:, None], -448.0), 448.0)
        if QUANT > 0:
            y0 = _e4m3_grid(y0)
            if TAIL > 0:
                y1 = _e4m3_grid(y1)
        tl.store(y_ptr + base + c0, y0.to(y_ptr.dtype.element_ty), mask=row_ok)
        if TAIL > 0:
            tl.store(y_ptr + base + c1, y1.to(y_ptr.dtype.element_ty), mask=m1)

    @triton.jit
    def _fold_gate_kernel(w_ptr, gate_ptr, gate_stride, bias_ptr, pending_ptr, out_ptr, pending_out_ptr, n_out, n_in,
                          GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_O: tl.constexpr,
                          BLOCK_I: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        row_ok = rows < n_out
        mask = row_ok[:, None] & (cols < n_in)[None, :]
        offsets = rows.to(tl.int64)[:, None] * n_in + cols[None, :]
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # the first column of programs also moves the gated bias into the pending vector
        first = row_ok & ((rows * 0 + tl.program_id(1)) == 0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rows, mask=first, other=0.0).to(tl.float32)
        for g in tl.static_range(GROUPS):
            gate = tl.load(gate_ptr + g * gate_stride + rows, mask=row_ok, other=0.0).to(tl.float32)
            out = (w * gate[:, None]).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + g * n_out * n_in + offsets, out, mask=mask)
            pending = tl.load(pending_ptr + g * n_out + rows, mask=first, other=0.0).to(tl.float32)
            if HAS_BIAS:
                pending += gate * bias
            tl.store(pending_out_ptr + g * n_out + rows, pending.to(pending_out_ptr.dtype.element_ty), mask=first)

    @triton.jit
    def _gelu_tanh(acc):
        # tanh-GELU in fp32: 0.5 x (1 + tanh(u)) = x * sigmoid(2 u), u = sqrt(2 / pi) (x + 0.044715 x^3), through
        # exp2 of -2 u log2(e). Saturates cleanly: exp2 -> inf gives -0, exp2 -> 0 gives x.
        u2 = acc * (-2.0 * 0.7978845608028654 * 1.4426950408889634) * (1.0 + 0.044715 * acc * acc)
        return acc / (1.0 + tl.exp2(u2))

    @triton.jit
    def _tile_of(pid, m, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # The program's output tile (pid_m, pid_n), tiles ordered in column strips GROUP_M tiles tall: a's rows stay
        # in L2 while w's column blocks go by.
        tiles_m = tl.cdiv(m, BLOCK_M)
        per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows

    @triton.jit
    def _linear_epilogue_part(acc, row0, rows, cols, m, N: tl.constexpr, bias_ptr, x_scale_ptr, w_scale_ptr,
                              out_scale_ptr, out_ptr, gate_ptr, gate_stride, rows_per_group, BLOCK_M: tl.constexpr,
                              HAS_BIAS: tl.constexpr, X_SCALE: tl.constexpr, W_SCALE: tl.constexpr,
                              QUANT: tl.constexpr, RESIDUAL: tl.constexpr, GATE_ROWS: tl.constexpr):
        # acc [BLOCK_M, len(cols)] fp32 -> out[rows, cols]. First the FP8 operands' scales (X_SCALE / W_SCALE: 0
        # none, 1 one scale, 2 one a row of x / a column of the output) and the bias. Then either tanh-GELU, rounded
        # once to the output's dtype (QUANT: to e4m3 as y / out_scale, saturating at +-448, on the e4m3 grid
        # first), or (RESIDUAL) out += gate[g] * y in place, g = row // rows_per_group, in fp32 with one rounding.
        # GATE_ROWS: the tile's rows span at most two groups (rows_per_group >= BLOCK_M), so two gate rows are
        # loaded instead of a gate per element.
        row_ok = rows < m
        col_ok = cols < N
        if X_SCALE == 1:
            acc = acc * tl.load(x_scale_ptr).to(tl.float32)
        if X_SCALE == 2:
            acc = acc * tl.load(x_scale_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)[:, None]
        if W_SCALE == 1:
            acc = acc * tl.load(w_scale_ptr).to(tl.float32)
        if W_SCALE == 2:
            acc = acc * tl.load(w_scale_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
        if RESIDUAL:
            group = rows // rows_per_group
            if GATE_ROWS:
                first = row0 // rows_per_group
                last = tl.minimum(row0 + BLOCK_M - 1, m - 1) // rows_per_group
                gate_first = tl.load(gate_ptr + first * gate_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
                gate_last = tl.load(gate_ptr + last * gate_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
                gate = tl.where((group == first)[:, None], gate_first[None, :], gate_last[None, :])
            else:
                gate = tl.load(gate_ptr + group[:, None] * gate_stride + cols[None, :], mask=mask,
                               other=0.0).to(tl.float32)
            out = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32) + gate * acc
        else:
            out = _gelu_tanh(acc)
            if QUANT:
                out = _e4m3_grid(tl.minimum(tl.maximum(out / tl.load(out_scale_ptr).to(tl.float32), -448.0),
                                            448.0))
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _linear_epilogue(acc, row0, col0, m, N: tl.constexpr, bias_ptr, x_scale_ptr, w_scale_ptr, out_scale_ptr,
                         out_ptr, gate_ptr, gate_stride, rows_per_group, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, X_SCALE: tl.constexpr,
                         W_SCALE: tl.constexpr, QUANT: tl.constexpr, RESIDUAL: tl.constexpr,
                         GATE_ROWS: tl.constexpr, SPLIT: tl.constexpr):
        # The tile [row0:row0 + BLOCK_M, col0:col0 + BLOCK_N] through _linear_epilogue_part, in two column halves if
        # SPLIT: what the epilogue loads and computes beside the accumulator then takes half the registers.
        rows = row0 + tl.arange(0, BLOCK_M)
        if SPLIT:
            half: tl.constexpr = BLOCK_N // 2
            left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, half)), (0, 2, 1)))
            _linear_epilogue_part(left, row0, rows, col0 + tl.arange(0, half), m, N, bias_ptr, x_scale_ptr,
                                  w_scale_ptr, out_scale_ptr, out_ptr, gate_ptr, gate_stride, rows_per_group,
                                  BLOCK_M, HAS_BIAS, X_SCALE, W_SCALE, QUANT, RESIDUAL, GATE_ROWS)
            _linear_epilogue_part(right, row0, rows, col0 + half + tl.arange(0, half), m, N, bias_ptr, x_scale_ptr,
                                  w_scale_ptr, out_scale_ptr, out_ptr, gate_ptr, gate_stride, rows_per_group,
                                  BLOCK_M, HAS_BIAS, X_SCALE, W_SCALE, QUANT, RESIDUAL, GATE_ROWS)
        else:
            _linear_epilogue_part(acc, row0, rows, col0 + tl.arange(0, BLOCK_N), m, N, bias_ptr, x_scale_ptr,
                                  w_scale_ptr, out_scale_ptr, out_ptr, gate_ptr, gate_stride, rows_per_group,
                                  BLOCK_M, HAS_BIAS, X_SCALE, W_SCALE, QUANT, RESIDUAL, GATE_ROWS)

    @triton.jit
    def _linear_kernel(a_ptr, w_ptr, bias_ptr, x_scale_ptr, w_scale_ptr, out_scale_ptr, out_ptr, gate_ptr,
                       gate_stride, rows_per_group, m, N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
                       X_SCALE: tl.constexpr, W_SCALE: tl.constexpr, QUANT: tl.constexpr, RESIDUAL: tl.constexpr,
                       GATE_ROWS: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
        # a @ w^T with an epilogue (_linear_epilogue): a [m, K], w [N, K] (an nn.Linear's weight), out [m, N], all
        # row-major; a and w bf16 / fp16 / fp32, or e4m3 with their scales. One output tile a program (_tile_of).
        # Rows past m and columns past N wrap around to the first ones (no load masks) and are not stored. fp32
        # accumulation. UPCAST (the interpreter, whose bf16 and e4m3 dots return garbage in Triton
        # 3.6) multiplies the same values in fp32.
        pid_m, pid_n = _tile_of(tl.program_id(0), m, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + (rows % m).to(tl.int64)[:, None] * K + ks[None, :]
        w_ptrs = w_ptr + (cols % N).to(tl.int64)[None, :] * K + ks[:, None]  # w^T's [BLOCK_K, BLOCK_N] tile
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):  # K a constant: a fixed trip count
            if K % BLOCK_K == 0:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                a = tl.load(a_ptrs, mask=ks[None, :] < K - k, other=0.0)
                w = tl.load(w_ptrs, mask=ks[:, None] < K - k, other=0.0)
            acc = tl.dot(_operand(a, UPCAST), _operand(w, UPCAST), acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        _linear_epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, m, N, bias_ptr, x_scale_ptr, w_scale_ptr,
                         out_scale_ptr, out_ptr, gate_ptr, gate_stride, rows_per_group, BLOCK_M, BLOCK_N, HAS_BIAS,
                         X_SCALE, W_SCALE, QUANT, RESIDUAL, GATE_ROWS, SPLIT)

    @triton.jit
    def _tma_product(a_desc, w_desc, pid_m, pid_n, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
        # The tile (pid_m, pid_n) of a @ w^T in fp32, a's and w's tiles loaded through their tensor descriptors
        # (tiles past the edges read as zeros); w's tile K-major, as FP8 dots need it.
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k])
            w = w_desc.load([pid_n * BLOCK_N, k])
            acc = tl.dot(_operand(a, UPCAST), _operand(w, UPCAST).T, acc)
        return acc

    @triton.jit
    def _linear_tma_kernel(a_desc, w_desc, bias_ptr, x_scale_ptr, w_scale_ptr, out_scale_ptr, out_ptr, gate_ptr,
                           gate_stride, rows_per_group, m, N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                           HAS_BIAS: tl.constexpr, X_SCALE: tl.constexpr, W_SCALE: tl.constexpr,
                           QUANT: tl.constexpr, RESIDUAL: tl.constexpr, GATE_ROWS: tl.constexpr,
                           SPLIT: tl.constexpr, UPCAST: tl.constexpr):
        # _linear_kernel with a's and w's tiles loaded by the tensor-memory accelerator (Hopper and newer) through
        # host-made descriptors (_tma_product).
        pid_m, pid_n = _tile_of(tl.program_id(0), m, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _tma_product(a_desc, w_desc, pid_m, pid_n, K, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        _linear_epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, m, N, bias_ptr, x_scale_ptr, w_scale_ptr,
                         out_scale_ptr, out_ptr, gate_ptr, gate_stride, rows_per_group, BLOCK_M, BLOCK_N, HAS_BIAS,
                         X_SCALE, W_SCALE, QUANT, RESIDUAL, GATE_ROWS, SPLIT)

    @triton.jit
    def _linear_persistent_kernel(a_desc, w_desc, bias_ptr, x_scale_ptr, w_scale_ptr, out_scale_ptr, out_ptr,
                                  gate_ptr, gate_stride, rows_per_group, m, N: tl.constexpr, K: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                  GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, X_SCALE: tl.constexpr,
                                  W_SCALE: tl.constexpr, QUANT: tl.constexpr, RESIDUAL: tl.constexpr,
                                  GATE_ROWS: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
                                  PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
        # _linear_tma_kernel as PROGRAMS programs (one an SM) that each take every PROGRAMS-th tile in turn. With
        # FLATTEN the tile loop and the K loop are one software-pipelined loop, so a tile's epilogue overlaps the
        # next tile's loads; WARP_SPECIALIZE gives loads, MMAs and the epilogue warps of their own.
        tiles = tl.cdiv(m, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
            pid_m, pid_n = _tile_of(tile, m, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = _tma_product(a_desc, w_desc, pid_m, pid_n, K, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
            _linear_epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, m, N, bias_ptr, x_scale_ptr, w_scale_ptr,
                             out_scale_ptr, out_ptr, gate_ptr, gate_stride, rows_per_group, BLOCK_M, BLOCK_N,
                             HAS_BIAS, X_SCALE, W_SCALE, QUANT, RESIDUAL, GATE_ROWS, SPLIT)


def _launch_shape(d: int) -> tuple[int, int, int, int]:
    """(MAIN, TAIL, rows per program, warps) of the LayerNorm kernel for width ``d``: MAIN the largest power of two
    <= d, TAIL the next power of two >= the rest (0 if none); one row a program, a warp per 2,048 elements. (On an
    H200 at d = 1152, over 2 x 19,712 rows: 2.5 TB/s with one row and one warp; 1.2-1.9 TB/s with 2 or 4 rows or
    more warps; 2.1 TB/s at best for one masked 2,048-wide block.)"""
    main = 1 << (d.bit_length() - 1)
    tail = 0 if d == main else triton.next_power_of_2(d - main)
    return main, tail, 1, max(1, min(8, (main + tail) // 2048))


def _row_stride(t: torch.Tensor, groups: int, d: int) -> tuple[torch.Tensor, int]:
    """``t`` viewed as ``[groups, d]`` rows with a unit column stride, and its row stride (no copy if possible)."""
    t = t.reshape(groups, d)
    if t.stride(1) != 1:
        t = t.contiguous()
    return t, t.stride(0)


def add_layer_norm_modulate(x: torch.Tensor, pending: torch.Tensor, shift: torch.Tensor | None,
                            scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``LayerNorm(x + pending) * (1 + scale) + shift`` (no affine) over ``x [G, R, D]`` with ``pending``,
    ``shift`` and ``scale`` one row per group (``[G, D]`` or ``[G, 1, D]``, any row stride; ``shift`` / ``scale``
    None: no modulation). Returns a new ``[G, R, D]`` tensor of ``x``'s dtype. Needs :func:`available`."""
    y = torch.empty_like(x)
    _layer_norm(x, pending, shift, scale, eps, y, None, 0)
    return y


def add_layer_norm_modulate_fp8(x: torch.Tensor, pending: torch.Tensor, shift: torch.Tensor | None,
                                scale: torch.Tensor | None, eps: float,
                                input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_layer_norm_modulate` written as the FP8 input of the next GEMM, in the same pass:
    ``(e4m3 [G, R, D], scale)`` with ``y ~= e4m3 * scale``, saturating at +-448. ``input_scale`` a float32 scalar
    tensor: that static scale (returned as is); None: one scale per row, ``amax(|y_row|) / 448`` (``[G * R, 1]``,
    what :func:`flowtok.nn.fp8.quantize_rows` computes). Needs :func:`available`."""
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    if input_scale is None:
        q_scale = torch.empty(x.shape[0] * x.shape[1], 1, dtype=torch.float32, device=x.device)
        _layer_norm(x, pending, shift, scale, eps, y, q_scale, 2)
    else:
        q_scale = input_scale.reshape(()).float()
        _layer_norm(x, pending, shift, scale, eps, y, q_scale, 1)
    return y, q_scale


def _layer_norm(x: torch.Tensor, pending: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None,
                eps: float, y: torch.Tensor, q_scale: torch.Tensor | None, quant: int) -> None:
    groups, rows, d = x.shape
    x = x.contiguous()
    pending_t, pending_stride = _row_stride(pending, groups, d)
    modulate = shift is not None and scale is not None
    if modulate:
        shift_t, mod_stride = _row_stride(shift, groups, d)  # type: ignore[arg-type]
        scale_t, scale_stride = _row_stride(scale, groups, d)  # type: ignore[arg-type]
        if scale_stride != mod_stride:
            shift_t, scale_t, mod_stride = shift_t.contiguous(), scale_t.contiguous(), d
    else:
        shift_t = scale_t = pending_t
        mod_stride = pending_stride
    n_rows = groups * rows
    if n_rows == 0:
        return
    main, tail, per_program, warps = _launch_shape(d)
    grid = (triton.cdiv(n_rows, per_program),)
    _add_layer_norm_modulate_kernel[grid](x, pending_t, pending_stride, shift_t, scale_t, mod_stride, y,
                                          q_scale if q_scale is not None else pending_t, n_rows, rows, d, eps,
                                          MAIN=main, TAIL=tail, ROWS=per_program, MODULATE=modulate, QUANT=quant,
                                          num_warps=warps)


def fold_gate(w: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
              pending: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An output Linear's gate folded in, for every group at once: ``(diag(gate[g]) @ w  [G, O, I],
    pending + gate * bias  [G, 1, O])`` for ``w [O, I]``, ``bias [O]`` (or None), ``gate [G, O]`` (any row
    stride) and ``pending [G, 1, O]``. Each product is rounded once to ``w``'s (``pending``'s) dtype, as PyTorch's
    broadcast multiply rounds ``w * gate``. Needs :func:`available`."""
    groups, n_out = gate.shape[0], gate.shape[-1]
    if w.shape[0] != n_out or pending.numel() != groups * n_out:
        raise ValueError(f"gate has {n_out} rows for a weight of {w.shape[0]} and a pending bias of "
                         f"{pending.numel()} values")
    w = w.contiguous()
    gate_t, gate_stride = _row_stride(gate, groups, n_out)
    pending_t = pending.reshape(groups, n_out).contiguous()
    out = torch.empty(groups, *w.shape, dtype=w.dtype, device=w.device)
    pending_out = torch.empty(groups, 1, n_out, dtype=pending.dtype, device=pending.device)
    block_o, block_i = 32, 128
    grid = (triton.cdiv(n_out, block_o), triton.cdiv(w.shape[1], block_i))
    _fold_gate_kernel[grid](w, gate_t, gate_stride, bias if bias is not None else w, pending_t, out, pending_out,
                            n_out, w.shape[1], GROUPS=groups, HAS_BIAS=bias is not None, BLOCK_O=block_o,
                            BLOCK_I=block_i, num_warps=4)
    return out, pending_out


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) of the GEMMs by default, for 16-bit and for e4m3 operands,
# and their schedules (below): the fastest of benchmarks/gemm_epilogues.py's sweep on one H200 (2026-12-05,
# FlowTok-XL at batch 256: bf16 fc1 + GELU 734 us; e4m3 fc1 + GELU -> e4m3 645 us and fc2 into the stream 436 us).
LINEAR_LAUNCH = (128, 256, 64, 8, 8, 4)
LINEAR_LAUNCH_FP8 = (256, 128, 128, 8, 8, 3)
# Whether the GEMMs' epilogues run in two column halves by default (fewer registers beside the accumulator).
LINEAR_SPLIT = True
# How the GEMMs' tiles are scheduled: "tiles", a program a tile; "persistent", a program an SM looping over tiles in
# one software-pipelined loop (a tile's epilogue overlapping the next one's loads); "persistent-ws", the same with
# warp specialisation (loads, MMAs and epilogue in warps of their own). Both persistent ones load through TMA.
LINEAR_SCHEDULES = ("tiles", "persistent", "persistent-ws")
LINEAR_SCHEDULE = "persistent"  # 16-bit operands
LINEAR_SCHEDULE_FP8 = "persistent"  # e4m3 operands


def _scale_kind(scale: torch.Tensor | None, count: int, what: str) -> int:
    """0 no scale, 1 one scale, 2 one a row / column (``count`` of them), for the GEMM's epilogue."""
    if scale is None:
        return 0
    if scale.numel() == 1:
        return 1
    if scale.numel() == count:
        return 2
    raise ValueError(f"{what} must hold 1 or {count} values, got {list(scale.shape)}")


def _check_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    x_scale: torch.Tensor | None, w_scale: torch.Tensor | None) -> tuple[int, int, int, bool]:
    """(M, K, N, e4m3) of a GEMM's operands, or a ValueError naming what does not fit."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"the GEMM takes x [M, K] and weight [N, K], got {list(x.shape)} and {list(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")
    fp8 = x.dtype == torch.float8_e4m3fn
    if fp8 != (weight.dtype == torch.float8_e4m3fn) or (x_scale is not None, w_scale is not None) != (fp8, fp8):
        raise ValueError("e4m3 operands go together, with both their scales (x_scale, w_scale)")
    return m, k, n, fp8


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            launch: tuple[int, int, int, int, int, int] | None, tma: bool | None, x_scale: torch.Tensor | None,
            w_scale: torch.Tensor | None, out_scale: torch.Tensor | None = None, gate: torch.Tensor | None = None,
            rows_per_group: int = 1, schedule: str | None = None) -> None:
    """Launch the GEMM ``x @ weight^T`` into ``out`` with the GELU epilogue, or the gated residual one if
    ``gate [G, N]`` is given (operands checked by the caller); the epilogue in two column halves if
    :data:`LINEAR_SPLIT`. ``launch`` and ``schedule``: None for the defaults of ``x``'s dtype
    (:data:`LINEAR_LAUNCH` / :data:`LINEAR_SCHEDULE`, ``_FP8`` for e4m3)."""
    m, k = x.shape
    n = weight.shape[0]
    if m == 0:
        return
    fp8 = x.dtype == torch.float8_e4m3fn
    x, weight = x.contiguous(), weight.contiguous()
    block_m, block_n, block_k, group_m, warps, stages = launch or (LINEAR_LAUNCH_FP8 if fp8 else LINEAR_LAUNCH)
    # TMA: Hopper or newer (or Triton's interpreter), 16-byte aligned rows
    tma_ok = (k * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0 and \
        (not x.is_cuda or torch.cuda.get_device_capability(x.device) >= (9, 0))
    if schedule is None:  # the default; a persistent one loads through TMA, else a program a tile
        schedule = LINEAR_SCHEDULE_FP8 if fp8 else LINEAR_SCHEDULE
        if schedule != "tiles" and (tma is False or not tma_ok):
            schedule = "tiles"
    elif schedule not in LINEAR_SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(LINEAR_SCHEDULES)}, got {schedule!r}")
    elif schedule != "tiles" and (tma is False or not tma_ok):
        raise ValueError(f"the {schedule} schedule loads through TMA: it needs a Hopper GPU (or newer) and 16-byte "
                         f"aligned rows")
    if tma is None:
        tma = schedule != "tiles" or (x.is_cuda and tma_ok)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    grid = (tiles,)

    def pointer(t: torch.Tensor | None) -> torch.Tensor:  # a scale as float32; an unused argument: any tensor
        return t.float().contiguous() if t is not None else out

    gate_t, gate_stride = _row_stride(gate, gate.shape[0], n) if gate is not None else (out, 0)
    args = (bias if bias is not None else out, pointer(x_scale), pointer(w_scale), pointer(out_scale), out, gate_t,
            gate_stride, rows_per_group, m)
    options = dict(N=n, K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                   HAS_BIAS=bias is not None, X_SCALE=_scale_kind(x_scale, m, "x_scale"),
                   W_SCALE=_scale_kind(w_scale, n, "w_scale"), QUANT=out_scale is not None,
                   RESIDUAL=gate is not None, GATE_ROWS=rows_per_group >= block_m,
                   SPLIT=LINEAR_SPLIT and block_n >= 32, UPCAST=INTERPRET,
                   num_warps=warps, num_stages=stages)
    if tma:  # (the persistent schedules set it above)
        from triton.tools.tensor_descriptor import TensorDescriptor  # type: ignore[import-untyped]

        a_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
        w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k])
        if schedule == "tiles":
            _linear_tma_kernel[grid](a_desc, w_desc, *args, **options)
        else:
            programs = min(tiles, torch.cuda.get_device_properties(x.device).multi_processor_count
                           if x.is_cuda else 4)
            _linear_persistent_kernel[(programs,)](a_desc, w_desc, *args, PROGRAMS=programs,
                                                   FLATTEN=schedule == "persistent",
                                                   WARP_SPECIALIZE=schedule == "persistent-ws", **options)
    else:
        _linear_kernel[grid](x, weight, *args, **options)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                launch: tuple[int, int, int, int, int, int] | None = None, tma: bool | None = None,
                x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
                out_scale: torch.Tensor | None = None, schedule: str | None = None) -> torch.Tensor:
    """``tanh-GELU(x @ weight^T + bias)`` in one GEMM whose epilogue adds the bias and applies the GELU in fp32
    (an MLP's first Linear and its activation): ``x [M, K]``, ``weight [N, K]``, ``bias [N]`` or None.

    16-bit or fp32 operands: returns ``[M, N]`` in ``x``'s dtype. e4m3 operands (an FP8 Linear's input and weight,
    :class:`flowtok.nn.fp8.FP8Linear`) with their float32 scales ``x_scale`` (one, or ``[M, 1]``) and ``w_scale``
    (one, or one an output column): returns bf16, or, given ``out_scale`` (one float32 scale), the e4m3 input of
    the next FP8 Linear, ``GELU / out_scale`` saturating at +-448. ``launch``: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    warps, stages), default :data:`LINEAR_LAUNCH` (:data:`LINEAR_LAUNCH_FP8` for e4m3). ``schedule``: how tiles map
    to programs, one of :data:`LINEAR_SCHEDULES` (default :data:`LINEAR_SCHEDULE`, :data:`LINEAR_SCHEDULE_FP8` for
    e4m3; a persistent default falls back to ``"tiles"`` where TMA cannot run). ``tma``: load the tiles through
    tensor descriptors (TMA; the persistent schedules always do); None: where the GPU has TMA (compute capability
    9.0 or newer) and the rows are 16-byte aligned. Needs :func:`available` (:func:`available_fp8` for e4m3)."""
    m, _, n, fp8 = _check_operands(x, weight, bias, x_scale, w_scale)
    if out_scale is not None and (not fp8 or out_scale.numel() != 1):
        raise ValueError("out_scale (one scale) writes e4m3 from e4m3 operands")
    out_dtype = torch.float8_e4m3fn if out_scale is not None else (torch.bfloat16 if fp8 else x.dtype)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    _linear(x, weight, bias, out, launch, tma, x_scale, w_scale, out_scale, schedule=schedule)
    return out


def linear_residual(stream: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    gate: torch.Tensor, launch: tuple[int, int, int, int, int, int] | None = None,
                    tma: bool | None = None, x_scale: torch.Tensor | None = None,
                    w_scale: torch.Tensor | None = None, schedule: str | None = None) -> None:
    """``stream[g] += gate[g] * (x[g] @ weight^T + bias)`` in place, in one GEMM whose epilogue reads and writes the
    stream (an adaLN-Zero block's gated output Linear and its residual add): ``stream [G, R, N]`` contiguous,
    ``x [G * R, K]``, ``weight [N, K]``, ``bias [N]`` or None, ``gate [G, N]`` (any row stride). e4m3 operands with
    their scales as :func:`linear_gelu` takes them. The sum is formed in fp32 and rounded once to the stream's
    dtype. ``launch`` / ``tma`` / ``schedule`` as for :func:`linear_gelu` (default :data:`LINEAR_LAUNCH` /
    :data:`LINEAR_LAUNCH_FP8`). Needs :func:`available` (:func:`available_fp8` for e4m3)."""
    m, _, n, _ = _check_operands(x, weight, bias, x_scale, w_scale)
    if stream.dim() != 3 or stream.shape[0] * stream.shape[1] != m or stream.shape[2] != n \
            or not stream.is_contiguous():
        raise ValueError(f"the stream must be a contiguous [G, R, {n}] with G * R = {m} rows, got "
                         f"{list(stream.shape)}")
    if gate.numel() != stream.shape[0] * n:
        raise ValueError(f"gate must be [{stream.shape[0]}, {n}], got {list(gate.shape)}")
    _linear(x, weight, bias, stream, launch, tma, x_scale, w_scale, gate=gate, rows_per_group=stream.shape[1],
            schedule=schedule)
