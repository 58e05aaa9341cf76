"""The fast text-to-image path: prompt tokens -> text encoder -> projector -> flow -> decoder, one CUDA graph.

``pipe.enable_fast_inference()`` (see :meth:`flowtok.pipelines.FlowTokPipeline.enable_fast_inference`) turns
it on for :meth:`~flowtok.pipelines.FlowTokPipeline.text_to_image`; :class:`FastTextToImage` is the engine:

* the flow samples through the fused DiT path (:meth:`flowtok.flow.FlowTransformer.enable_fused_inference`)
  at batches where it pays, and through its regionally compiled plain blocks below that; FP8 blocks
  (``pipe.quantize_fp8`` first) take the same routes;
* the image decoder's transformer blocks are compiled in place (regional ``torch.compile``);
* everything after tokenisation (which is host work) is captured as one CUDA graph per batch shape and
  settings: the text encoder, the projector, every sampling step, the decoder, and optionally the
  conversion to uint8. Inputs are copied into the graph's static buffers, so a call costs one replay.

The projector's posterior noise is drawn outside the graph with the caller's generator, exactly as the
normal path draws it, so a fast call returns the normal path's images up to the rounding of the fused and
compiled kernels (bf16 tolerance on a GPU; on a CPU nothing is compiled or captured and the fused path
matches to fp32 rounding). If the text encoder cannot be captured (a host synchronisation inside it), it
runs before the graph instead, and :attr:`FastTextToImage.text_encoder_in_graph` says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .errors import InvalidInputError
from .nn.regions import compile_regions, uncompile_regions
from .sampling import SAMPLERS, CudaGraphed

if TYPE_CHECKING:
    from .pipelines import FlowTokPipeline, SamplingDefaults

log = logging.getLogger(__name__)

# Solvers whose loop can be captured (the upstream grid is, too: it is built on the device).
GRAPHABLE_SAMPLERS = ("euler", "heun", "euler-upstream")
# Tokens per condition group (batch x num_tokens) from which the flow samples through the fused DiT path.
DEFAULT_FUSED_MIN_ROWS = 4096


def to_uint8_nhwc(images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3], rounded as the pipeline's PIL output is."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class FastTextToImage:
    """Prompts -> images through the fused flow, the compiled decoder and one CUDA graph per batch shape.

    ``batch_size``: prompts per graph replay; a last, shorter chunk is padded (and its padding dropped), so
    one graph serves every call. None: one graph per chunk size seen. ``compile`` / ``cuda_graph`` default to
    True on CUDA and False elsewhere; ``fused_flow`` enables the fused DiT path of the text-to-image flow
    from ``fused_min_rows`` tokens per condition group (batch x num_tokens; default
    :data:`DEFAULT_FUSED_MIN_ROWS`), its GEMM epilogues computed as ``gemm_epilogues`` says (``"auto"``,
    ``"pytorch"`` or ``"triton"``: :meth:`flowtok.flow.FlowTransformer.enable_fused_inference`).
    """

    def __init__(self, pipe: FlowTokPipeline, batch_size: int | None = None, compile: bool | None = None,
                 cuda_graph: bool | None = None, fused_flow: bool = True, fused_min_rows: int | None = None,
                 compile_options: dict[str, Any] | None = None, gemm_epilogues: str = "auto") -> None:
        if pipe.t2i_flow is None:
            raise InvalidInputError("this pipeline has no text-to-image flow model")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.pipe = pipe
        self.batch_size = batch_size
        cuda = pipe.device.type == "cuda"
        self.compile = cuda if compile is None else bool(compile)
        self.cuda_graph = cuda if cuda_graph is None else bool(cuda_graph)
        self.text_encoder_in_graph = True
        self._runners: dict[tuple, CudaGraphed] = {}
        flow = pipe.t2i_flow
        self._fused = fused_flow
        self.fused_min_rows = DEFAULT_FUSED_MIN_ROWS if fused_min_rows is None else fused_min_rows
        if fused_flow:
            flow.enable_fused_inference(min_rows=self.fused_min_rows, gemm_epilogues=gemm_epilogues)
        self.gemm_epilogues = gemm_epilogues
        if self.compile:
            options = compile_options or {}
            if any(getattr(b, "_compiled_call_impl", None) is None for b in flow.blocks):
                flow.compile_blocks(**options)  # not twice: a user (or a benchmark) may have compiled them
            compile_regions(pipe.image_tokenizer.decoder.blocks, **options)

    def fused_min_batch(self) -> int | None:
        """The smallest batch (prompts per call) that samples through the fused path; None if it is off."""
        if not self._fused:
            return None
        tokens = int(self.pipe.t2i_flow.config.num_tokens)  # type: ignore[union-attr]
        return max(1, -(-self.fused_min_rows // tokens))

    def describe(self) -> dict[str, Any]:
        """What this engine turned on, for a results record."""
        from .nn.fp8 import FP8Linear

        def fp8(root: nn.Module) -> bool:
            return any(isinstance(m, FP8Linear) for m in root.modules())

        return {"compile": self.compile, "cuda_graph": self.cuda_graph, "fused_flow": self._fused,
                "fp8_flow": fp8(cast(nn.Module, cast(nn.Module, self.pipe.t2i_flow).blocks)),
                "fp8_decoder": fp8(self.pipe.image_tokenizer.decoder.blocks),
                "fused_min_rows": self.fused_min_rows if self._fused else None,
                "gemm_epilogues": self.gemm_epilogues if self._fused else None,
                "fused_min_batch": self.fused_min_batch(), "batch_size": self.batch_size,
                "text_encoder_in_graph": self.text_encoder_in_graph if self.cuda_graph else None}

    def reset(self) -> None:
        """Drop the captured graphs and their buffers (memory); the next call captures again."""
        self._runners.clear()

    def close(self) -> None:
        """Undo what the constructor turned on (fused flow, compiled blocks) and drop the graphs."""
        flow = cast(nn.Module, self.pipe.t2i_flow)
        if self._fused:
            self.pipe.t2i_flow.disable_fused_inference()  # type: ignore[union-attr]
        if self.compile:
            uncompile_regions(cast(nn.ModuleList, flow.blocks))
            uncompile_regions(self.pipe.image_tokenizer.decoder.blocks)
        self._runners.clear()

    # ------------------------------------------------------------------------------------- the graph
    def _body(self, steps: int, guidance: float, sampler: str, sample: bool, uint8: bool,
              from_states: bool) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        pipe = self.pipe
        solver = SAMPLERS[sampler]

        def body(states: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
            # The normal path's arithmetic, step by step (pipelines.FlowTokPipeline._text_latents / _solve).
            states = states.to(pipe.device, pipe.dtype)
            out = pipe.text_projector(states, mask, sample=False)
            z = out.mean + torch.exp(0.5 * out.logvar) * eps if sample else out.mean
            lat = cast(torch.Tensor, solver(pipe.t2i_flow, z, num_steps=steps, guidance_scale=guidance))
            images = pipe.image_tokenizer.decode_from_flow(lat, states)
            return to_uint8_nhwc(images) if uint8 else images

        if from_states:
            return body

        def from_tokens(ids: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
            return body(pipe.text_encoder.encode_tokens(ids, mask).states, mask, eps)

        return from_tokens

    def runner(self, settings: SamplingDefaults, sample: bool = True, uint8: bool = False,
               from_states: bool = False) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The graphed call ``(input_ids, mask, eps) -> images`` (or, ``from_states``, ``(text_states, mask,
        eps)``: the text encoder left out) for these settings; ``eps`` is the projector's posterior noise
        [B, L, C] (zeros and ``sample=False`` for the posterior mean). One graph per input shape."""
        if settings.sampler not in GRAPHABLE_SAMPLERS:
            raise InvalidInputError(f"the fast path samples with {', '.join(GRAPHABLE_SAMPLERS)}, "
                                    f"not {settings.sampler!r}")
        key = (settings.num_inference_steps, float(settings.guidance_scale), settings.sampler, sample, uint8,
               from_states)
        if key not in self._runners:
            body = torch.no_grad()(self._body(*key))
            self._runners[key] = CudaGraphed(body, warmup=2) if self.cuda_graph else _Plain(body)
        return self._runners[key]

    # ----------------------------------------------------------------------------------------- calls
    @torch.no_grad()
    def generate(self, prompts: list[str], settings: SamplingDefaults, generator: torch.Generator | None = None,
                 sample_text_latent: bool = True, batch_size: int | None = None,
                 uint8: bool = False) -> torch.Tensor:
        """Images for ``prompts`` on the pipeline's device: [N, 3, H, W] in [0, 1], or uint8 [N, H, W, 3]."""
        pipe = self.pipe
        size = self.batch_size or batch_size or len(prompts)
        out = []
        for i in range(0, len(prompts), size):
            chunk = prompts[i:i + size]
            ids, mask = pipe.text_encoder.tokenize(chunk)
            shape = (len(chunk), ids.shape[1], pipe.text_projector.config.latent_channels)
            dtype = pipe.text_projector.to_moments.weight.dtype
            # Drawn for the real prompts only, with the normal path's call: the same numbers.
            eps = torch.randn(shape, generator=generator, device=pipe.device, dtype=dtype) if sample_text_latent \
                else torch.zeros(shape, device=pipe.device, dtype=dtype)
            pad = (self.batch_size or len(chunk)) - len(chunk)
            if pad:
                ids = torch.cat([ids, ids[-1:].expand(pad, -1)])
                mask = torch.cat([mask, mask[-1:].expand(pad, -1)])
                eps = torch.cat([eps, eps.new_zeros(pad, *eps.shape[1:])])
            ids, mask = ids.to(pipe.device, non_blocking=True), mask.to(pipe.device, non_blocking=True)
            images = self._replay(settings, sample_text_latent, uint8, ids, mask, eps)
            out.append(images[:len(chunk)])
        return torch.cat(out)

    def _replay(self, s: SamplingDefaults, sample: bool, uint8: bool, ids: torch.Tensor, mask: torch.Tensor,
                eps: torch.Tensor) -> torch.Tensor:
        if not self.text_encoder_in_graph:
            states = self.pipe.text_encoder.encode_tokens(ids, mask).states
            return self.runner(s, sample, uint8, from_states=True)(states, mask, eps)
        try:
            return self.runner(s, sample, uint8)(ids, mask, eps)
        except RuntimeError as exc:
            if not self.cuda_graph or "captur" not in str(exc).lower():
                raise
            # The text encoder synchronised with the host during capture: run it before the graph.
            log.warning("text encoder not capturable (%s); it runs outside the CUDA graph", str(exc)[:200])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.text_encoder_in_graph = False
            self._runners = {k: v for k, v in self._runners.items() if k[-1]}
            return self._replay(s, sample, uint8, ids, mask, eps)


class _Plain(CudaGraphed):
    """The same interface, no capture (``cuda_graph=False``)."""

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)
