"""FP8 (e4m3) inference for the Linear layers of a transformer, for Hopper / Ada GPUs.

:class:`FP8Linear` holds its weight in ``float8_e4m3fn`` with one scale per output channel and
quantises its input on the fly with one scale per row (token), then multiplies with
``torch._scaled_mm``, which runs the matmul on FP8 tensor cores (twice the bf16 rate on an H100) and
rescales in its epilogue. Rowwise scales keep a token with a large activation from crushing the
precision of the others. Under ``torch.compile`` the amax, divide and cast of the input fuse into one
kernel with whatever precedes them.

Dynamic per-row input scales cost a reduction over every row before every GEMM; measured on an H100
(``benchmarks/fp8_gemm.py``) that costs about what FP8 saves. With ``input_amax`` (calibrated by
:func:`calibrate_input_amax` on a few real inputs) the layer instead uses one static scale per tensor for
its input and its weight, so quantising the input is a plain elementwise cast that fuses into whatever
kernel produced it, and the GEMM takes cuBLAS's tensorwise FP8 path with fast accumulation.

It is an inference option: there is no backward. Every dimension the FP8 kernels see must be a
multiple of 16, so :func:`quantize_linears` skips Linears whose widths are not, and rows are padded
when their count is not. On a CPU (or an older GPU) ``emulate=True`` computes the same quantised
numbers with a float matmul: slow, but it lets the numerics be checked anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
_ALIGN = 16


def fp8_supported(device: torch.device | str | None = None) -> bool:
    """True on a CUDA device of compute capability 8.9 (Ada) or 9.0+ (Hopper) with FP8 matmuls."""
    if not torch.cuda.is_available() or not hasattr(torch, "float8_e4m3fn"):
        return False
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in float8_e4m3fn, saturating at the largest finite value instead of overflowing."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale [M, 1]) with x ~= q * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return to_e4m3(x, scale), scale


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (e4m3, float32 scalar scale): one scale for the whole tensor."""
    scale = (x.abs().amax().float().clamp(min=1e-12) / E4M3_MAX).reshape(())
    return to_e4m3(x, scale), scale


class FP8Linear(nn.Module):
    """A frozen ``nn.Linear`` computed in FP8 (see the module docstring). The matmul writes bf16; the
    result is returned in the input's dtype.

    ``input_amax=None``: dynamic per-row input scales and per-channel weight scales. A float: static
    per-tensor scales (input: that amax, typically from :func:`calibrate_input_amax`; weight: its own
    amax); inputs beyond the calibrated range saturate at the largest e4m3 value.
    """

    input_scale: torch.Tensor | None
    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, emulate: bool = False, input_amax: float | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % _ALIGN or self.out_features % _ALIGN:
            raise InvalidInputError(f"FP8Linear needs widths that are multiples of {_ALIGN}, "
                                    f"got {self.in_features} -> {self.out_features}")
        if input_amax is not None and not (input_amax > 0 and torch.isfinite(torch.tensor(input_amax))):
            raise InvalidInputError(f"FP8Linear input_amax must be a positive finite number, got {input_amax}")
        self.emulate = emulate
        self.static = input_amax is not None
        weight = linear.weight.detach()
        if input_amax is not None:
            q, scale = quantize_tensor(weight)
            self.register_buffer("input_scale", torch.tensor(input_amax / E4M3_MAX, dtype=torch.float32,
                                                             device=weight.device))
        else:
            q, scale = quantize_rows(weight)
            scale = scale.reshape(1, -1).contiguous()  # [1, out]
            self.register_buffer("input_scale", None)
        self.register_buffer("weight_fp8", q)  # [out, in]; .t() is the column-major operand _scaled_mm wants
        self.register_buffer("weight_scale", scale)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def _apply(self, fn, recurse: bool = True):
        # .to(dtype) would cast the e4m3 weight and its float32 scales like any float buffer: keep their
        # dtypes, follow only the device.
        keep: dict[str, torch.Tensor] = {}
        for k in ("weight_fp8", "weight_scale", "input_scale"):
            buf = self._buffers.get(k)
            if buf is not None:
                keep[k] = buf
        super()._apply(fn, recurse)
        for name, old in keep.items():
            moved = self._buffers[name]
            assert moved is not None  # kept only the buffers that were set
            self._buffers[name] = old.to(moved.device)
        return self

    def extra_repr(self) -> str:
        mode = "static per-tensor scales" if self.static else "rowwise scales"
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3, {mode}"

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``x [M, in]`` -> (e4m3 ``[M, in]``, float32 scale): the static per-tensor scale, or one per row."""
        if self.input_scale is not None:
            return to_e4m3(x, self.input_scale), self.input_scale
        return quantize_rows(x)

    def matmul(self, q: torch.Tensor, scale: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``(q * scale) @ W^T (+ b)`` in bf16 for an input already quantised (:meth:`quantize_input`, or a fused
        kernel that writes e4m3 with the same scales): ``q [M, in]`` e4m3, ``scale`` a scalar or ``[M, 1]``.
        The bias, unless ``bias=False``, is added before the bf16 rounding (in the GEMM's epilogue on a GPU)."""
        rows = q.shape[0]
        pad = -rows % _ALIGN
        if pad:
            q = torch.nn.functional.pad(q.view(torch.uint8), (0, 0, 0, pad)).view(q.dtype)
            if scale.dim():
                scale = torch.nn.functional.pad(scale, (0, 0, 0, pad), value=1.0)
        b = self.bias if bias else None
        if self.emulate:
            w = self.weight_fp8.float() * (self.weight_scale if self.static else self.weight_scale.t())
            y = (q.float() * scale) @ w.t()
            y = (y if b is None else y + b).to(torch.bfloat16)
        else:
            y = torch._scaled_mm(q, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                                 bias=None if b is None else b.to(torch.bfloat16), out_dtype=torch.bfloat16,
                                 use_fast_accum=self.static)
        return y[:rows] if pad else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q, scale = self.quantize_input(x.reshape(-1, self.in_features))
        return self.matmul(q, scale).to(x.dtype).reshape(*lead, self.out_features)


@torch.no_grad()
def calibrate_input_amax(root: nn.Module, run: Callable[[], Any],
                         keep: Callable[[str, nn.Linear], bool] | None = None) -> dict[str, float]:
    """Largest |input| each eligible ``nn.Linear`` under ``root`` sees while ``run()`` executes (for
    instance a few sampling calls on real prompts, every timestep included). Names are relative to root."""
    seen: dict[str, float] = {}
    hooks = []

    def hook_for(name: str):
        def hook(_module, args) -> None:
            value = float(args[0].detach().abs().amax())
            seen[name] = max(seen.get(name, 0.0), value)
        return hook

    for name, module in root.named_modules():
        if isinstance(module, nn.Linear) and _eligible(name, module, keep):
            hooks.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _eligible(name: str, layer: nn.Linear, keep: Callable[[str, nn.Linear], bool] | None) -> bool:
    return not (layer.in_features % _ALIGN or layer.out_features % _ALIGN or (keep and keep(name, layer)))


def quantize_linears(root: nn.Module, keep: Callable[[str, nn.Linear], bool] | None = None,
                     emulate: bool | None = None, input_amax: dict[str, float] | None = None) -> list[str]:
    """Replace, in place, every ``nn.Linear`` under ``root`` with an :class:`FP8Linear`.

    Skipped: Linears whose widths are not multiples of 16, and those for which ``keep(name, layer)``
    returns True (they stay as they are). ``input_amax`` (from :func:`calibrate_input_amax`, names
    relative to ``root``) switches the layers it names to static per-tensor scales; a layer it lacks
    (never reached during calibration) stays in full precision. ``emulate=None`` emulates unless the
    weights sit on a GPU that :func:`fp8_supported`; ``emulate=False`` there raises instead. Returns the
    replaced names.
    """
    done = []
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            if not _eligible(full, child, keep) or (input_amax is not None and not input_amax.get(full)):
                continue
            native = fp8_supported(child.weight.device)
            if emulate is False and not native:
                raise InvalidInputError(f"FP8 matmuls need a CUDA GPU of compute capability 8.9 or newer; "
                                        f"{full} sits on {child.weight.device}")
            amax = input_amax[full] if input_amax is not None else None
            setattr(module, child_name, FP8Linear(child, emulate=not native if emulate is None else emulate,
                                                  input_amax=amax))
            done.append(full)
    return done


def quantize_blocks_fp8(blocks: nn.Module, emulate: bool = False, calibrate: Callable[[], Any] | None = None,
                        keep: Callable[[str, nn.Linear], bool] | None = None) -> list[str]:
    """What a model's ``quantize_fp8`` does to its transformer blocks: refuse compiled blocks and a device without
    FP8 matmuls (unless ``emulate``), record each eligible Linear's largest input while ``calibrate()`` runs (if
    given: static per-tensor scales; else dynamic per-row ones), then :func:`quantize_linears` in place. Returns
    the names; raises if there were none (every width unaligned: the model would silently stay as it was)."""
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in blocks.modules()):
        # a compiled module keeps running the Linears it traced: the swap below would silently do nothing
        raise InvalidInputError("quantise to FP8 before compiling: these blocks are already compiled")
    if any(isinstance(m, FP8Linear) for m in blocks.modules()):
        raise InvalidInputError("these blocks are already in FP8: quantise a model once")
    device = next(blocks.parameters()).device
    if not emulate and not fp8_supported(device):
        raise InvalidInputError(f"FP8 matmuls need a CUDA GPU of compute capability 8.9 or newer; "
                                f"this model sits on {device}")
    amax = calibrate_input_amax(blocks, calibrate, keep) if calibrate is not None else None
    done = quantize_linears(blocks, keep=keep, emulate=emulate, input_amax=amax)
    if not done:
        raise InvalidInputError(f"nothing to run in FP8: no Linear of these blocks has widths that are multiples of "
                                f"{_ALIGN}{' and was reached during calibration' if amax is not None else ''}")
    return done
