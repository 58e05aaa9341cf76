"""The ``distill`` stage: a 1-, 2- or 4-step student of a trained flow (either direction), see
:class:`DistillStageConfig`."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ...errors import ConfigError
from ...flow import FlowTransformer
from ...sampling import CudaGraphed, euler_sample
from ...text import TextEncoder, TextEncoderSpec, TextProjector, load_text_encoder
from ...tokenizer import ImageTokenizer
from ..data import BatchSource, DataConfig, build_source
from .base import Stage, freeze, image_latents, load_frozen_tokenizer, text_states

TokenBatch = tuple[torch.Tensor, torch.Tensor]  # token ids and mask
StepKey = tuple[int, int, int, int]  # step, local batch, rank, world


@dataclass
class DistillStageConfig:
    """Few-step student of a trained flow, by trajectory-segment distillation.

    The teacher integrates each batch with ``teacher_steps`` Euler steps (guidance ``teacher_guidance``
    applied there). For every sample a student step count k is drawn from ``student_steps`` and a
    segment [j/k, (j+1)/k] of that trajectory; the student, a FlowTransformer (initialised from the
    teacher), is trained so that ONE Euler step of its velocity lands where the teacher landed:
    x(t_a) + (t_b - t_a) v_student(x(t_a), t_a) = x(t_b). A k-step Euler run of the student on the
    uniform grid then reproduces the teacher's guided endpoint, so guidance is baked in (sample the
    student with guidance 1). Chosen over consistency/MeanFlow training because FlowTok's source has
    no noise: every x0 has one teacher trajectory, so matching it segment by segment is a plain
    regression with exact targets and no extra network inputs, and the student stays a drop-in
    FlowTransformer that the pipeline, the samplers and `--steps k` use unchanged.

    Text to image needs prompts only: on the shapes world the stage samples captions without rendering
    images, and with other data it never encodes the images. ``source_latent: sample`` (``auto``, the
    default) starts the teacher's trajectories from draws of the projector's posterior instead of its
    mean (the T2I flow was trained on such draws), so the student learns a neighbourhood of each prompt
    rather than one point; on the shapes benchmark that lifted a one-step student from 95.6% to 98.4%
    exact on held-out one-object prompts (teacher at 20 steps: 99.8%).
    The teacher integrates in bf16 on CUDA (``teacher_precision: auto``), fp32 elsewhere. On CUDA its blocks
    are compiled (``teacher_compile``) and its whole trajectory (``teacher_steps`` guided evaluations) is
    replayed from one CUDA graph (``teacher_cuda_graph``), and a worker thread draws and tokenises the next
    step's prompts while the GPU works: 1,506 -> 3,507 samples/s on one H100 at batch 512, teacher guidance 3
    (``benchmarks/distill_step.py``, docs/benchmarks.md).
    """

    teacher_path: str = ""
    direction: Literal["t2i", "i2t"] = "t2i"
    tokenizer_path: str = ""  # required for i2t only
    projector_path: str = ""
    text_encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    teacher_steps: int = 20
    teacher_guidance: float = 1.0
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    init_from_teacher: bool = True
    # t2i: the text latent the trajectories start from; auto = sample (measured: held-out one-object prompts
    # 98.4% exact at one step from posterior draws, 95.6% from the mean; docs/results.md)
    source_latent: Literal["auto", "mean", "sample"] = "auto"
    teacher_precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 elsewhere
    teacher_cuda_graph: bool = True  # CUDA only: replay the teacher's trajectory loop from one captured graph
    teacher_compile: bool = True  # CUDA only: torch.compile the teacher's blocks (fused kernels; ~15 s once)

    def __post_init__(self) -> None:
        if not self.teacher_path or not self.projector_path:
            raise ConfigError("model.teacher_path and model.projector_path are required")
        if self.direction == "i2t" and not self.tokenizer_path:
            raise ConfigError("model.tokenizer_path is required for direction i2t (its flow starts from images)")
        if self.source_latent != "auto" and self.direction != "t2i":
            raise ConfigError(f"model.source_latent={self.source_latent} applies to direction t2i only "
                              "(i2t starts from images)")
        bad = [k for k in self.student_steps if k < 1 or self.teacher_steps % k]
        if not self.student_steps or bad:
            raise ConfigError(f"model.student_steps must divide teacher_steps {self.teacher_steps}; got {bad or '[]'}")


class DistillStage(Stage):
    name: ClassVar[str] = "distill"
    config_class: ClassVar[type] = DistillStageConfig
    frozen_helpers: ClassVar[tuple[str, ...]] = (
        "teacher", "trajectory", "tokenizer", "projector", "encoder", "source", "pool", "pending")
    teacher: FlowTransformer
    trajectory: Callable[[torch.Tensor], torch.Tensor]  # the teacher's path, CUDA-graphed where it can be
    tokenizer: ImageTokenizer | None  # image to text only: text to image reads prompts
    projector: TextProjector
    encoder: TextEncoder
    source: BatchSource | None  # None: text to image on the shapes world, prompts drawn without images
    pool: ThreadPoolExecutor | None  # CUDA: draws the next step's prompts while the GPU works
    pending: tuple[StepKey, Future[TokenBatch]] | None

    def __init__(self, cfg: DistillStageConfig, data: DataConfig, seed: int) -> None:
        super().__init__(data, seed)
        self.cfg = cfg
        self.teacher = FlowTransformer.from_pretrained(cfg.teacher_path)
        freeze(self.teacher)
        self.student = FlowTransformer(self.teacher.config)
        if cfg.init_from_teacher:
            self.student.load_state_dict(self.teacher.state_dict())

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        self.teacher.to(device)
        if self.cfg.teacher_compile and device.type == "cuda":
            self.teacher.compile_blocks()
        graphed = self.cfg.teacher_cuda_graph and device.type == "cuda"
        self.trajectory = CudaGraphed(self._teacher_trajectory) if graphed else self._teacher_trajectory
        if self.cfg.tokenizer_path:  # text to image needs no tokenizer: prompts in, teacher latents out
            self.tokenizer = load_frozen_tokenizer(self.cfg.tokenizer_path, device)
        self.projector = TextProjector.from_pretrained(self.cfg.projector_path, device=device)
        freeze(self.projector)
        k = self.teacher.config.num_tokens
        self.encoder = load_text_encoder(self.cfg.text_encoder, max_length=k, device=device)
        prompts_only = self.cfg.direction == "t2i" and self.data_cfg.kind == "shapes"
        self.source = None if prompts_only else build_source(self.data_cfg, self.seed, device)
        if prompts_only and device.type == "cuda":  # host work of step s + 1 overlaps the GPU's step s
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-prompts")

    def _prompt_tokens(self, step: int, local_batch: int, rank: int, world: int) -> TokenBatch:
        """Token ids and mask of the batch's shapes captions (drawn without rendering images): host work only."""
        return self.encoder.tokenize(self.shapes.train_captions(step, local_batch, rank, world))

    def _next_prompt_tokens(self, step: int, local_batch: int, rank: int, world: int) -> TokenBatch:
        """This step's tokens, drawn ahead by the worker thread when it has them, and the next step's
        ordered. The captions are a pure function of (seed, step, rank), so this changes no number."""
        key = (step, local_batch, rank, world)
        pending, self.pending = self.pending, None
        tokens = pending[1].result() if pending is not None and pending[0] == key else self._prompt_tokens(*key)
        if self.pool is not None:
            ahead = (step + 1, local_batch, rank, world)
            self.pending = (ahead, self.pool.submit(self._prompt_tokens, *ahead))
        return tokens

    def _source_latents(self, step: int, local_batch: int, rank: int, world: int) -> torch.Tensor:
        if self.source is None:  # t2i on the shapes world: captions, no images rendered
            ts = self.encoder.encode_tokens(*self._next_prompt_tokens(step, local_batch, rank, world))
            return self.projector(ts.states, ts.mask, sample=self.cfg.source_latent != "mean").z
        b = self.source.get(step, local_batch, rank, world)
        if self.cfg.direction == "i2t":
            assert self.tokenizer is not None  # DistillStageConfig requires tokenizer_path for i2t
            return image_latents(b, self.tokenizer)
        states, mask = text_states(b, self.encoder)
        return self.projector(states, mask, sample=self.cfg.source_latent != "mean").z  # z = mean unsampled

    @torch.no_grad()
    def batch(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        x0 = self._source_latents(step, local_batch, rank, world).float()
        traj = self.trajectory(x0)
        n, bsz = self.cfg.teacher_steps, x0.shape[0]
        choices = torch.tensor(self.cfg.student_steps, device=x0.device)
        ks = choices[torch.randint(len(choices), (bsz,), device=x0.device)]
        j = (torch.rand(bsz, device=x0.device) * ks).long().clamp(max=ks - 1)
        ia, ib = j * (n // ks), (j + 1) * (n // ks)
        rows = torch.arange(bsz, device=x0.device)
        return {"x_a": traj[ia, rows], "x_b": traj[ib, rows], "t_a": ia.float() / n, "t_b": ib.float() / n}

    @torch.no_grad()
    def _teacher_trajectory(self, x0: torch.Tensor) -> torch.Tensor:
        """[teacher_steps + 1, B, K, C] float32: the teacher's guided Euler path from ``x0``; sync-free, so
        that it can be captured as a CUDA graph (autocast's weight cache is off for that reason)."""
        bf16 = self.cfg.teacher_precision == "bf16" or (self.cfg.teacher_precision == "auto"
                                                       and x0.device.type == "cuda")
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            _, traj = euler_sample(self.teacher, x0, num_steps=self.cfg.teacher_steps,
                                   guidance_scale=self.cfg.teacher_guidance, return_trajectory=True)
        return traj.float()

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        null = torch.zeros_like(batch["t_a"], dtype=torch.long)
        v = self.student(batch["x_a"], batch["t_a"], null)
        pred = batch["x_a"] + (batch["t_b"] - batch["t_a"])[:, None, None] * v.float()
        loss = torch.mean((pred - batch["x_b"]) ** 2)
        return loss, {"segment_mse": loss.detach()}

    def export(self, out_dir: Path) -> None:
        name = "t2i_flow" if self.cfg.direction == "t2i" else "i2t_flow"
        self.student.save_pretrained(Path(out_dir) / name)
