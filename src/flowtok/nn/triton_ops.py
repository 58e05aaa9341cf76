"""Triton kernels of the fused DiT inference path (:mod:`flowtok.nn.fused_dit`).

Three kernels that PyTorch's own run below the GPU's bandwidth, or in more passes or more work than needed:

* :func:`add_layer_norm_modulate`: ``LayerNorm(x + pending) * (1 + scale) + shift`` with no LayerNorm affine,
  ``x [G, R, D]`` and one ``pending`` / ``shift`` / ``scale`` row per group ``g``: one read of ``x`` and one
  write, statistics and modulation in fp32, one rounding to the output dtype. (On an H200 the compiled
  inductor kernel for ``LayerNorm(x + pending)`` alone moved about 1 TB/s at FlowTok-XL's D = 1152.)
* :func:`fold_gate`: ``diag(gate[g]) @ w``, the adaLN gate folded into an output Linear's rows for every group
  at once (``w`` read once, written ``G`` times), and the gated bias added to the groups' pending vectors.
* :func:`short_attention`: softmax attention over short sequences (FlowTok's 77 tokens), read in place from the
  qkv GEMM's output and written in the proj GEMM's input layout, one program a (sequence, head). Its tiles are cut
  to the sequence and the head width (77 keys = 64 + 16, 72 channels = 64 + 16) where SDPA's kernels pad both to
  128, which is most of the tensor-core work at this size.

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
# The fused path's attention through :func:`short_attention` (else PyTorch's SDPA); FLOWTOK_TRITON_ATTENTION=0: off.
ATTENTION = os.environ.get("FLOWTOK_TRITON_ATTENTION", "1") != "0"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether ``x`` can go through these kernels: Triton imports, they are enabled, and ``x`` is on a CUDA
    device (or on the CPU under Triton's interpreter)."""
    if triton is None or not ENABLED:
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


if triton is not None:

    @triton.jit
    def _add_layer_norm_modulate_kernel(x_ptr, pending_ptr, pending_stride, shift_ptr, scale_ptr, mod_stride, y_ptr,
                                        n_rows, rows_per_group, d, eps, MAIN: tl.constexpr, TAIL: tl.constexpr,
                                        ROWS: tl.constexpr, MODULATE: tl.constexpr):
        # A row's d columns are read as a power-of-two MAIN part and a TAIL part (d = 1152: 1024 + 128), so that no
        # lane of a program idles on masked-off columns, as it would in one block of next_power_of_2(d).
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
        tl.store(y_ptr + base + c0, y0.to(y_ptr.dtype.element_ty), mask=row_ok)
        if TAIL > 0:
            y1 = x1 * rstd
            if MODULATE:
                y1 = y1 * (1.0 + tl.load(scale_ptr + group * mod_stride + c1, mask=m1, other=0.0).to(tl.float32)) \
                    + tl.load(shift_ptr + group * mod_stride + c1, mask=m1, other=0.0).to(tl.float32)
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
    def _short_attention_kernel(qkv_ptr, o_ptr, n, scale_log2, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                                BLOCK_M: tl.constexpr, KMAIN: tl.constexpr, KTAIL: tl.constexpr,
                                DMAIN: tl.constexpr, DTAIL: tl.constexpr, PRECISION: tl.constexpr,
                                HEADS_PER_PROGRAM: tl.constexpr, STAGES: tl.constexpr):
        # One program: BLOCK_M queries of one sequence against all its n <= KMAIN + KTAIL keys in one softmax
        # (no online rescaling). Keys are a KMAIN block and a KTAIL block, channels a DMAIN and a DTAIL part, all
        # powers of two (77 keys: 64 + 16; 72 channels: 64 + 16, the last 8 masked), so the dots are not padded
        # to 128. q, k, v are read in place from the qkv GEMM's output [B * n, 3 D] and the output is written as
        # [B * n, D]. HEADS and HEAD_DIM are compile-time so that the loads' alignment is known (16 bytes).
        # The program's HEADS_PER_PROGRAM heads are taken in turn.
        D: tl.constexpr = HEADS * HEAD_DIM
        STRIDE: tl.constexpr = 3 * D
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        c0 = tl.arange(0, DMAIN)
        c0_ok = (c0 < HEAD_DIM)[None, :]
        # (with DTAIL = 0 the tail's offsets are never used: one dummy column keeps arange's bounds valid)
        c1 = DMAIN + tl.arange(0, max(DTAIL, 1))
        c1_ok = (c1 < HEAD_DIM)[None, :]
        keys_a = tl.arange(0, KMAIN)
        ka_ok = (keys_a < n)[:, None]
        program = tl.program_id(1)
        seq = program // (HEADS // HEADS_PER_PROGRAM)
        first_head = (program % (HEADS // HEADS_PER_PROGRAM)) * HEADS_PER_PROGRAM
        # a program takes HEADS_PER_PROGRAM heads in turn: the loop lets the compiler load the next head's tiles
        # while this one's are in the tensor cores (STAGES > 1)
        for head_offset in tl.range(0, HEADS_PER_PROGRAM, num_stages=STAGES):
            head = first_head + head_offset
            q_base = qkv_ptr + (seq * n).to(tl.int64) * STRIDE + head * HEAD_DIM
            q_rows = q_base + rows.to(tl.int64)[:, None] * STRIDE
            k_rows_a = q_base + D + keys_a.to(tl.int64)[:, None] * STRIDE
            q0 = tl.load(q_rows + c0[None, :], mask=row_ok[:, None] & c0_ok, other=0.0)
            s_a = tl.dot(q0, tl.trans(tl.load(k_rows_a + c0[None, :], mask=ka_ok & c0_ok, other=0.0)),
                         input_precision=PRECISION)
            if DTAIL > 0:
                q1 = tl.load(q_rows + c1[None, :], mask=row_ok[:, None] & c1_ok, other=0.0)
                s_a += tl.dot(q1, tl.trans(tl.load(k_rows_a + c1[None, :], mask=ka_ok & c1_ok, other=0.0)),
                              input_precision=PRECISION)
            s_a = tl.where((keys_a < n)[None, :], s_a, float("-inf"))
            top = tl.max(s_a, axis=1)
            if KTAIL > 0:
                keys_b = KMAIN + tl.arange(0, KTAIL)
                k_rows_b = q_base + D + keys_b.to(tl.int64)[:, None] * STRIDE
                kb_ok = (keys_b < n)[:, None]
                s_b = tl.dot(q0, tl.trans(tl.load(k_rows_b + c0[None, :], mask=kb_ok & c0_ok, other=0.0)),
                             input_precision=PRECISION)
                if DTAIL > 0:
                    s_b += tl.dot(q1, tl.trans(tl.load(k_rows_b + c1[None, :], mask=kb_ok & c1_ok, other=0.0)),
                                  input_precision=PRECISION)
                s_b = tl.where((keys_b < n)[None, :], s_b, float("-inf"))
                top = tl.maximum(top, tl.max(s_b, axis=1))
            # softmax(scale * s) with exp2: scale_log2 = scale * log2(e)
            p_a = tl.exp2((s_a - top[:, None]) * scale_log2)
            total = tl.sum(p_a, axis=1)
            p_a = p_a.to(q0.dtype)
            v_rows_a = k_rows_a + D
            o0 = tl.dot(p_a, tl.load(v_rows_a + c0[None, :], mask=ka_ok & c0_ok, other=0.0),
                        input_precision=PRECISION)
            if DTAIL > 0:
                o1 = tl.dot(p_a, tl.load(v_rows_a + c1[None, :], mask=ka_ok & c1_ok, other=0.0),
                            input_precision=PRECISION)
            if KTAIL > 0:
                p_b = tl.exp2((s_b - top[:, None]) * scale_log2)
                total += tl.sum(p_b, axis=1)
                p_b = p_b.to(q0.dtype)
                v_rows_b = k_rows_b + D
                o0 += tl.dot(p_b, tl.load(v_rows_b + c0[None, :], mask=kb_ok & c0_ok, other=0.0),
                             input_precision=PRECISION)
                if DTAIL > 0:
                    o1 += tl.dot(p_b, tl.load(v_rows_b + c1[None, :], mask=kb_ok & c1_ok, other=0.0),
                                 input_precision=PRECISION)
            inv = (1.0 / total)[:, None]
            o_rows = o_ptr + (seq * n + rows).to(tl.int64)[:, None] * D + head * HEAD_DIM
            tl.store(o_rows + c0[None, :], (o0 * inv).to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & c0_ok)
            if DTAIL > 0:
                tl.store(o_rows + c1[None, :], (o1 * inv).to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & c1_ok)


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
    y = torch.empty_like(x)
    n_rows = groups * rows
    if n_rows == 0:
        return y
    main, tail, per_program, warps = _launch_shape(d)
    grid = (triton.cdiv(n_rows, per_program),)
    _add_layer_norm_modulate_kernel[grid](x, pending_t, pending_stride, shift_t, scale_t, mod_stride, y, n_rows, rows,
                                          d, eps, MAIN=main, TAIL=tail, ROWS=per_program, MODULATE=modulate,
                                          num_warps=warps)
    return y


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



# Longest sequence and widest head that :func:`short_attention` takes: its score tiles hold every key at once.
SHORT_ATTENTION_MAX_TOKENS = 256
# (BLOCK_M, warps, heads a program, pipeline stages) tried on a GPU the first time a shape is seen (those whose
# heads a program divide the heads); the first is used until then (and under the interpreter, and during a
# CUDA-graph capture, where nothing can be timed).
ATTENTION_CONFIGS = ((64, 4, 1, 1), (128, 8, 1, 1), (64, 4, 2, 2), (64, 4, 4, 2), (64, 4, 4, 3), (128, 8, 4, 2),
                     (128, 4, 2, 2), (32, 2, 4, 2), (16, 1, 1, 1))
AttentionConfig = tuple[int, int, int, int]
_ATTENTION_CHOICE: dict[tuple, AttentionConfig] = {}


def _split(size: int) -> tuple[int, int]:
    """``size`` as a power-of-two main part (at least 16) and a power-of-two tail (0, or at least 16)."""
    main = max(16, 1 << (size.bit_length() - 1))
    rest = size - main
    return main, 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))


def short_attention_supported(n: int, head_dim: int) -> bool:
    """Whether :func:`short_attention` takes ``n`` tokens of ``head_dim`` channels a head."""
    return 1 <= n <= SHORT_ATTENTION_MAX_TOKENS and 16 <= head_dim <= 256


def _launch_attention(qkv: torch.Tensor, out: torch.Tensor, batch: int, n: int, heads: int, head_dim: int,
                      config: AttentionConfig) -> None:
    block_m, warps, per_program, stages = config
    if heads % per_program:
        raise ValueError(f"{per_program} heads a program do not divide {heads} heads")
    kmain, ktail = _split(n)
    dmain, dtail = _split(head_dim)
    grid = (triton.cdiv(n, block_m), batch * heads // per_program)
    _short_attention_kernel[grid](qkv, out, n, head_dim ** -0.5 * 1.4426950408889634, HEADS=heads,
                                  HEAD_DIM=head_dim, BLOCK_M=block_m, KMAIN=kmain, KTAIL=ktail, DMAIN=dmain,
                                  DTAIL=dtail, PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
                                  HEADS_PER_PROGRAM=per_program, STAGES=stages, num_warps=warps)


def _pick_attention_config(qkv: torch.Tensor, out: torch.Tensor, batch: int, n: int, heads: int,
                           head_dim: int) -> AttentionConfig:
    """The fastest of :data:`ATTENTION_CONFIGS` for this shape on this GPU, timed once (CUDA events, 5 calls
    each after one warm-up) and cached; the first config where nothing can be timed."""
    key = (str(qkv.device), qkv.dtype, batch, n, heads, head_dim)
    if key in _ATTENTION_CHOICE:
        return _ATTENTION_CHOICE[key]
    if not qkv.is_cuda or torch.cuda.is_current_stream_capturing():
        return ATTENTION_CONFIGS[0]
    best: tuple[float, AttentionConfig] | None = None
    for config in ATTENTION_CONFIGS:
        if config[0] > max(16, triton.next_power_of_2(n)) or heads % config[2]:
            continue
        try:
            _launch_attention(qkv, out, batch, n, heads, head_dim, config)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                _launch_attention(qkv, out, batch, n, heads, head_dim, config)
            end.record()
            end.synchronize()
        except Exception:  # noqa: BLE001 - a config that does not fit this GPU (registers, shared memory)
            continue
        ms = start.elapsed_time(end)
        if best is None or ms < best[0]:
            best = (ms, config)
    choice = best[1] if best is not None else ATTENTION_CONFIGS[0]
    _ATTENTION_CHOICE[key] = choice
    return choice


def short_attention(qkv: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """Softmax attention without mask over short sequences, straight from a fused qkv projection: ``qkv
    [batch * n, 3 d]`` (each row ``q | k | v``, heads contiguous within each) -> ``[batch * n, d]`` with the
    heads side by side, what ``scaled_dot_product_attention`` of the ``[batch, heads, n, d / heads]`` views
    followed by the transpose back gives, up to rounding. The softmax weights are rounded to ``qkv``'s dtype
    before they meet v, as flash attention's are. Needs :func:`available` and :func:`short_attention_supported`."""
    rows, three_d = qkv.shape
    d, n = three_d // 3, rows // max(batch, 1)
    head_dim = d // heads
    if three_d != 3 * d or d != heads * head_dim or rows != batch * n or not short_attention_supported(n, head_dim):
        raise ValueError(f"short_attention takes [batch * n, 3 * heads * head_dim] with n <= "
                         f"{SHORT_ATTENTION_MAX_TOKENS} and 16 <= head_dim <= 256; got {tuple(qkv.shape)} for batch "
                         f"{batch}, {heads} heads")
    qkv = qkv.contiguous()
    out = torch.empty(rows, d, dtype=qkv.dtype, device=qkv.device)
    config = _pick_attention_config(qkv, out, batch, n, heads, head_dim)
    _launch_attention(qkv, out, batch, n, heads, head_dim, config)
    return out
