"""The FlowTok velocity network: a plain DiT over K latent tokens of C channels.

``FlowTransformer(x [B, K, C], t [B], null_indicator [B]) -> v [B, K, C]`` predicts the velocity
of the flow from the text latent (t = 0) to the image latent (t = 1), or the reverse for
image-to-text (a separate model with the same class). There is no cross-attention and no text in the
sequence: the text *is* the starting point. The only condition besides t is a two-entry "null
indicator" embedding (CrossFlow's replacement for a dropped prompt): 0 = conditional, 1 = null.

Architecture facts, checked against the FlowTok release (libs/model/flowtok_t2i.py, commit d4d43c5):

* input: ``nn.Linear(C, D)`` per token (no patchify), plus a fixed 1D sin-cos table
  [1, K, D] (first half sin, second half cos, omega_i = 1 / 10000^(2i/D), positions 0..K-1);
* condition ``c = t_embedder(t) + null_embedder(null_indicator)``; the timestep embedder is DiT's
  (256 frequencies, cos before sin, max period 10000, MLP Linear-SiLU-Linear) fed t in [0, 1]
  *unscaled* (upstream passes the flow time straight in, no t*1000; ``time_scale`` = 1.0);
* ``depth`` adaLN-Zero DiT blocks (flowtok.nn.dit): LayerNorm eps 1e-6 without affine, fused qkv
  with bias, GELU-tanh MLP of ratio 4, modulation chunks shift/scale/gate for attention then MLP;
* final layer: modulated LayerNorm + Linear(D, C); its modulation and Linear are zero-initialised,
  so a fresh model predicts v = 0;
* init as DiT: xavier-uniform Linears with zero bias, N(0, 0.02) for the null embedding and the two
  timestep-MLP weights, zeros for every adaLN modulation Linear.

Upstream state-dict keys map one-to-one onto ours; all names are equal except the null embedding,
listed in :data:`UPSTREAM_RENAMES`. Upstream keeps ``pos_embed`` as a frozen Parameter; here it is a
persistent buffer of the same name and shape. Upstream's FlowTok module also holds the text projector
(``context_encoder``, ``context_projector``, ``t2t_temperature``); here that is
:class:`flowtok.text.projector.TextProjector`, a separate model. Upstream forces gradient
checkpointing on in every block; here it is the ``grad_checkpointing`` config switch (off by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, InvalidInputError
from ..modeling import PretrainedMixin
from ..nn import TimestepEmbedder, sincos_1d
from ..nn.dit import DiTBlock, FinalLayer
from ..nn.regions import compile_regions

# The null indicator has two states: 0 = conditional on the source latent, 1 = "null" (CFG).
NUM_NULL_STATES = 2

# Upstream (FlowTok release) state-dict key -> ours, for the only names that differ.
UPSTREAM_RENAMES: dict[str, str] = {"y_embedder.embedding_table.weight": "null_embedder.weight"}


@dataclass
class FlowConfig:
    """Sizes of the velocity transformer. Defaults are FlowTok-XL (the paper's main model)."""

    num_tokens: int = 77  # K: latent tokens (77 = CLIP's text length)
    in_channels: int = 16  # C: channels per token, also the output (velocity) channels
    width: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    freq_dim: int = 256  # sinusoidal frequencies of the timestep embedder
    time_scale: float = 1.0  # t is multiplied by this before the sinusoid; upstream: 1.0
    grad_checkpointing: bool = False  # recompute block activations in backward to save memory

    def __post_init__(self) -> None:
        for name in ("num_tokens", "in_channels", "width", "depth", "num_heads", "freq_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"flow.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ConfigError(f"flow.width {self.width} is not divisible by flow.num_heads {self.num_heads}")
        if self.width % 2:
            raise ConfigError(f"flow.width must be even for the sin-cos positions, got {self.width}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"flow.mlp_ratio must be positive, got {self.mlp_ratio}")


# The block Linears FlowTransformer.quantize_fp8 can put in FP8.
FP8_LAYERS = ("qkv", "proj", "fc1", "fc2")

FLOW_PRESETS: dict[str, FlowConfig] = {
    # The paper's three sizes (Table: 153M / 698M / 1.1B including the ~24M text projector).
    "FlowTok-B": FlowConfig(width=768, depth=12, num_heads=12),
    "FlowTok-XL": FlowConfig(width=1152, depth=28, num_heads=16),
    "FlowTok-H": FlowConfig(width=1280, depth=36, num_heads=20),
    # Shapes world: 32 tokens x 16 channels, ~9.6M parameters, a few minutes on one H100.
    "shapes": FlowConfig(num_tokens=32, in_channels=16, width=256, depth=8, num_heads=4),
    # CPU unit tests.
    "tiny": FlowConfig(num_tokens=8, in_channels=4, width=32, depth=2, num_heads=2),
}


def flop_count(config: FlowConfig, batch: int = 1) -> int:
    """Approximate matmul FLOPs (2 per multiply-add) of one forward pass on ``batch`` samples.

    Counts the per-token Linears (input, qkv, proj, MLP, output), the attention products QK^T and AV,
    and the per-sample condition path (timestep MLP, adaLN Linears). Norms, activations and softmax are
    left out; they are a fraction of a percent at the paper's sizes. A training step costs about 3x this
    (4x with gradient checkpointing).
    """
    k, c, d, n = config.num_tokens, config.in_channels, config.width, config.depth
    hidden = int(d * config.mlp_ratio)
    per_token_block = 3 * d * d + d * d + 2 * d * hidden  # qkv, proj, fc1 + fc2
    attention = 2 * k * k * d  # QK^T and AV, all heads together
    per_sample_block = 6 * d * d  # adaLN modulation
    macs = n * (k * per_token_block + attention + per_sample_block)
    macs += k * c * d + k * d * c  # input and output Linears
    macs += config.freq_dim * d + d * d + 2 * d * d  # timestep MLP, final adaLN
    return 2 * macs * batch


class FlowTransformer(nn.Module, PretrainedMixin):
    """Velocity field v(x, t, null_indicator) over [B, K, C] latents; see the module docstring."""

    config_class = FlowConfig
    model_type = "flowtok_flow_transformer"

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        d = config.width
        self.x_embedder = nn.Linear(config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d, freq_dim=config.freq_dim, scale=config.time_scale)
        self.null_embedder = nn.Embedding(NUM_NULL_STATES, d)
        self.register_buffer("pos_embed", sincos_1d(config.num_tokens, d)[None], persistent=True)
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_heads, config.mlp_ratio, qkv_bias=config.qkv_bias) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(d, config.in_channels)
        self.fused_min_rows: int | None = None  # set by enable_fused_inference
        self.fused_gemm_epilogues = "auto"  # likewise: who computes the fused path's GEMM epilogues
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's initialisation (see the module docstring); adaLN-Zero makes every block start as identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.null_embedder.weight, std=0.02)
        nn.init.normal_(cast(nn.Linear, self.t_embedder.mlp[0]).weight, std=0.02)
        nn.init.normal_(cast(nn.Linear, self.t_embedder.mlp[2]).weight, std=0.02)
        for block in self.blocks:
            cast(DiTBlock, block).zero_init_modulation()
        self.final_layer.zero_init()

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.config = dataclasses.replace(self.config, grad_checkpointing=enabled)

    def compile_blocks(self, **compile_kwargs: Any) -> FlowTransformer:
        """Regional ``torch.compile``: each DiT block is compiled in place; all share one compiled graph.

        Inductor fuses what eager mode runs as separate memory-bound kernels: LayerNorm with the adaLN
        modulate, the bias with GELU, and the gate with the residual add. Compiling the repeated block
        rather than the whole model costs one block's compile time whatever the depth, and keeps the
        Python loop, gradient checkpointing and the state-dict names as they are. ``compile_kwargs`` go
        to :meth:`torch.nn.Module.compile` (default ``fullgraph=True, dynamic=False``: one graph per
        batch size, the fastest kernels for the fixed shapes of sampling and training). Returns self.
        """
        compile_regions(self.blocks, **{"fullgraph": True, **compile_kwargs})
        return self

    def quantize_fp8(self, emulate: bool = False, calibrate: Callable[[], Any] | None = None,
                     layers: Sequence[str] | None = None) -> FlowTransformer:
        """FP8 inference on Hopper / Ada GPUs: the blocks' attention and MLP Linears become
        :class:`flowtok.nn.fp8.FP8Linear`. The adaLN modulation, the embedders and the final layer keep
        their dtype: they are a sliver of the FLOPs and set every scale and gate. ``layers`` names the block
        Linears to quantise among ``FP8_LAYERS`` (qkv, proj, fc1, fc2; None: all four). On the fused path qkv's
        and fc1's inputs come out of the LayerNorm kernel in e4m3 at no cost, while an FP8 proj or fc2 costs a
        pass for its input's quantisation and one for the gated residual add that a bf16 one does in its GEMM.

        Without ``calibrate``: e4m3 weights with per-channel scales, inputs quantised per token on the fly.
        With ``calibrate``, a callable that runs this model on representative inputs (a few sampling calls
        on real prompts, say): each layer's largest input is recorded and becomes a static per-tensor
        scale, which makes input quantisation a fusable cast and the GEMMs cuBLAS's fast tensorwise ones.
        In place, inference only (no backward, no ``save_pretrained`` afterwards); call it before
        :meth:`compile_blocks`. The fused path (:meth:`enable_fused_inference`) runs FP8 blocks too.
        ``emulate=True`` computes the same quantised numbers with float matmuls on any device, to check the
        numerics. Returns self.
        """
        from ..nn.fp8 import quantize_blocks_fp8

        chosen = FP8_LAYERS if layers is None else tuple(layers)
        if isinstance(layers, str) or not chosen or any(name not in FP8_LAYERS for name in chosen):
            raise InvalidInputError(f"layers must name some of {', '.join(FP8_LAYERS)}, got {layers!r}")

        def keep(name: str, _layer: nn.Module) -> bool:
            return "adaLN_modulation" in name or name.rsplit(".", 1)[-1] not in chosen

        min_rows = self.fused_min_rows
        self.fused_min_rows = None  # calibration hooks see the Linears' inputs only on the plain path
        try:
            quantize_blocks_fp8(self.blocks, emulate=emulate, calibrate=calibrate, keep=keep)
        finally:
            self.fused_min_rows = min_rows
        return self.requires_grad_(False)

    def enable_fused_inference(self, min_rows: int = 4096, gemm_epilogues: str = "auto") -> FlowTransformer:
        """Sample through :func:`flowtok.nn.fused_dit.fused_blocks_forward`: LayerNorm and the adaLN shift /
        scale in one pass (a Triton kernel on a GPU), the gates folded into the output Linears once per step and
        distinct condition, residual adds inside the GEMMs, bias + GELU in the GEMM epilogue. Used by the
        samplers (:meth:`forward_grouped`) when each group of samples that share the condition has at least
        ``min_rows`` tokens (batch x num_tokens); below that, folding the gates costs more than it saves and the
        plain (or compiled) blocks run. Training and :meth:`forward` are
        unchanged. FP8 blocks (:meth:`quantize_fp8`) run fused too: the LayerNorm pass writes qkv's and fc1's
        input in e4m3 and the gates scale the FP8 output GEMMs' products in the residual add. ``gemm_epilogues``:
        ``"pytorch"`` (cuBLASLt's GELU epilogue for fc1; FP8 GEMMs through ``_scaled_mm`` with a pass after them),
        ``"triton"`` (where Triton runs, flowtok's GEMMs compute fc1 with its bias and GELU, an FP8 fc1 writing
        fc2's e4m3 input, and FP8 proj / fc2 with the gated residual add in their epilogues) or ``"auto"`` (the
        default: flowtok's GEMMs for FP8 Linears, cuBLAS for plain ones; the faster of each on an H200,
        :data:`flowtok.nn.fused_dit.GEMM_EPILOGUES`). Returns self."""
        from ..nn.fused_dit import GEMM_EPILOGUES, fused_block_supported

        if not all(fused_block_supported(cast(DiTBlock, b)) for b in self.blocks):
            raise InvalidInputError("fused inference needs the standard blocks: plain or FP8 Linears, tanh-GELU MLP, "
                                    "no q/k norm")
        if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 0:
            raise InvalidInputError(f"min_rows must be a non-negative integer, got {min_rows!r}")
        if gemm_epilogues not in GEMM_EPILOGUES:
            raise InvalidInputError(f"gemm_epilogues must be one of {', '.join(GEMM_EPILOGUES)}, "
                                    f"got {gemm_epilogues!r}")
        self.fused_min_rows = min_rows
        self.fused_gemm_epilogues = gemm_epilogues
        return self

    def disable_fused_inference(self) -> FlowTransformer:
        self.fused_min_rows = None
        return self

    @property
    def grouped_condition(self) -> bool:
        """Whether the samplers should call :meth:`forward_grouped` (fused inference is enabled)."""
        return self.fused_min_rows is not None

    def forward_grouped(self, x: torch.Tensor, t: torch.Tensor, null_groups: Sequence[int]) -> torch.Tensor:
        """The velocity of ``x [G * b, K, C]`` whose ``G = len(null_groups)`` contiguous groups of ``b`` samples
        all have the flow time ``t`` (a one-element tensor) and group g the null indicator ``null_groups[g]``:
        what a sampling step with CFG asks (``null_groups = (0, 1)``). Equal to :meth:`forward` with ``t`` and
        the indicators expanded; the fused path when enabled and worth it, else exactly :meth:`forward`.
        Reads no tensor value on the host (CUDA-graph safe)."""
        groups = len(null_groups)
        if groups < 1 or x.shape[0] % groups:
            raise InvalidInputError(f"batch {x.shape[0]} does not split into {groups} equal groups")
        per_group = x.shape[0] // groups
        rows = per_group * x.shape[1]
        min_rows = self.fused_min_rows
        if min_rows is None or rows < min_rows or self.training or torch.is_grad_enabled():
            indicator = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
            for g, v in enumerate(null_groups):
                indicator[g * per_group:(g + 1) * per_group].fill_(int(v))  # a device fill: no host copy
            return self(x, t.reshape(1).expand(x.shape[0]), indicator)
        from ..nn.fused_dit import fused_blocks_forward

        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        null = torch.stack([self.null_embedder.weight[int(v)] for v in null_groups])
        c = self.t_embedder(t.reshape(1)) + null
        return fused_blocks_forward(self.blocks, self.final_layer, h, c, gemm_epilogues=self.fused_gemm_epilogues)

    def forward(self, x: torch.Tensor, t: torch.Tensor, null_indicator: torch.Tensor) -> torch.Tensor:
        """x: [B, K, C]; t: [B] flow time in [0, 1]; null_indicator: [B] bool/long, 1 = null (CFG).

        Returns the predicted velocity dx/dt, [B, K, C].
        """
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.null_embedder(null_indicator.long())
        checkpointing = self.config.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            h = checkpoint(block, h, c, use_reentrant=False) if checkpointing else block(h, c)
        return self.final_layer(h, c)

    def forward_flops(self, batch: int = 1) -> int:
        """Approximate matmul FLOPs of one forward on ``batch`` samples (see :func:`flop_count`)."""
        return flop_count(self.config, batch)
