"""The training stages handed to the one :class:`~flowtok.training.trainer.Trainer`.

- ``tokenizer``: the 1D image tokenizer (L2 + KL).
- ``t2i``: text projector + FlowTok transformer, text latent (t=0) -> image latent (t=1), trained
  jointly with flow + KL + alignment losses, as in the paper.
- ``text_decoder``: the non-autoregressive text decoder on the (frozen) projector's latents; with
  ``train_projector: true`` it trains both as a text autoencoder.
- ``i2t``: a second FlowTok transformer, image latent (t=0) -> text latent (t=1); KL and alignment
  weights are 0 in the paper, so the projector is simply frozen here.
- ``distill``: a 1-, 2- or 4-step student of a trained flow (either direction), see
  :class:`DistillStageConfig`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..config import from_dict
from ..errors import ConfigError
from ..flow.objective import binned_loss_tensors
from .data import DataConfig, build_source
from .trainer import Stage

log = logging.getLogger(__name__)


def _preset(registry: dict, name: str, overrides: dict[str, Any], what: str):
    from ..config import to_dict

    if name not in registry:
        raise ConfigError(f"unknown {what} preset '{name}' (choose from {', '.join(registry)})")
    base = registry[name]
    cls = type(base)
    return from_dict(cls, {**to_dict(base), **overrides}, what)


def _grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    rows = (b + ncol - 1) // ncol
    canvas = torch.ones(c, rows * h, ncol * w, device=images.device)
    for i in range(b):
        r, q = divmod(i, ncol)
        canvas[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = images[i]
    return canvas


class _Frozen:
    """Holds frozen helpers without registering them as sub-modules."""

    def __init__(self, **modules: Any) -> None:
        self.__dict__.update(modules)


def _freeze(m: nn.Module) -> nn.Module:
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


# ------------------------------------------------------------------------------------------ tokenizer
@dataclass
class TokenizerStageConfig:
    preset: str = "shapes-128"
    overrides: dict[str, Any] = field(default_factory=dict)
    kl_weight: float = 1e-6
    # Further TokenizerLossConfig fields: perceptual_weight / perceptual_weights / require_perceptual,
    # discriminator_weight / discriminator_start / lecam_weight (PatchGAN, hinge + LeCam), reconstruction.
    loss: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=lambda: {"name": "minilm"})
    eval_images: int = 64
    # The exported config's scale_factor is 1 / std of the latents of this many training images, so the
    # flows see unit-variance latents (0 keeps the preset's value). An unscaled shapes tokenizer (std 0.32)
    # left the image-to-text flow at 24% exact captions; scaled, 97%.
    scale_images: int = 2048


class TokenizerStage(Stage):
    name: ClassVar[str] = "tokenizer"

    def __init__(self, cfg: TokenizerStageConfig, data: DataConfig, seed: int) -> None:
        super().__init__()
        from ..tokenizer import TOKENIZER_PRESETS, ImageTokenizer

        self.cfg, self.data_cfg, self.seed = cfg, data, seed
        tcfg = _preset(TOKENIZER_PRESETS, cfg.preset, cfg.overrides, "model.tokenizer")
        if data.size != tcfg.image_size:
            raise ConfigError(f"data.size {data.size} differs from the tokenizer image_size {tcfg.image_size}")
        self.tokenizer = ImageTokenizer(tcfg)
        from ..tokenizer import TokenizerLoss, TokenizerLossConfig

        # A registered child: the discriminator (when on) is trained by the same optimizer and checkpointed.
        self.loss_fn = TokenizerLoss(from_dict(TokenizerLossConfig, {"kl_weight": cfg.kl_weight, **cfg.loss},
                                               "model.loss"))
        self.frozen = _Frozen(encoder=None, source=None)

    def setup(self, device: torch.device) -> None:
        self.device = device
        self.frozen.source = build_source(self.data_cfg, self.seed, device)
        if self.tokenizer.config.text_dim > 0:
            from ..text import load_text_encoder

            self.frozen.encoder = load_text_encoder(self.cfg.text_encoder,
                                                    max_length=self.tokenizer.config.num_latent_tokens,
                                                    device=device)

    def _text(self, captions: list[str]) -> torch.Tensor | None:
        if self.frozen.encoder is None:
            return None
        return self.frozen.encoder.encode(captions).states

    def batch(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        b = self.frozen.source.get(step, local_batch, rank, world)
        b["text_states"] = self._text(b["captions"])
        b["step"] = step
        return b

    def forward(self, batch: dict[str, Any]):
        images, step = batch["images"], batch["step"]
        recon, posterior = self.tokenizer(images, text_states=batch["text_states"], sample=True)
        loss, parts = self.loss_fn(images, recon, posterior, step)
        metrics = {"mse": torch.mean((recon.detach().float() - images.float()) ** 2), "kl": parts["kl_raw"]}
        metrics.update({k: v for k, v in parts.items() if k in ("perceptual", "adversarial")})
        if self.loss_fn.adversarial_active(step):
            # The generator term cannot move the discriminator and this term cannot move the generator
            # (reconstructions are detached), so one backward and one optimizer serve both.
            d_loss, d_parts = self.loss_fn.discriminator_loss(images, recon)
            loss = loss + d_loss
            metrics.update(disc_hinge=d_parts["hinge"], disc_logits_real=d_parts["logits_real"],
                           disc_logits_fake=d_parts["logits_fake"])
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, step: int):
        from ..shapes import judge_batch, scene_matches, shapes_batch

        n = self.cfg.eval_images
        images, captions, scenes = shapes_batch(self.seed + 10_000, 0, n, split="test", size=self.data_cfg.size,
                                                device=self.device)
        lat = self.tokenizer.encode(images)
        recon = self.tokenizer.decode(lat, text_states=self._text(captions)).clamp(0, 1)
        mse = torch.mean((recon.float() - images.float()) ** 2, dim=(1, 2, 3))
        psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()
        judged = judge_batch(list(recon.float().cpu()))
        acc = sum(scene_matches(p, t) for p, t in zip(judged, scenes)) / n
        grid = _grid(torch.cat([images[:8], recon[:8]]).float())
        return {"psnr": psnr, "judge_acc": acc}, {"recon": grid}

    @torch.no_grad()
    def measure_scale_factor(self, n: int, batch_size: int = 256) -> float:
        """``1 / std`` of the latents (posterior mode) of the first ``n`` training samples."""
        from ..tokenizer import latent_scale_factor

        lats = []
        for step in range(-(-n // batch_size)):
            images = self.frozen.source.get(step, batch_size, 0, 1)["images"].to(self.device)
            lats.append(self.tokenizer.encode(images).float().cpu())
        return latent_scale_factor(torch.cat(lats)[:n])

    def export(self, out_dir: Path) -> None:
        if self.cfg.scale_images > 0:  # the tokenizer has no train/eval-dependent layers
            self.tokenizer.config.scale_factor = round(self.measure_scale_factor(self.cfg.scale_images), 4)
            log.info("tokenizer scale_factor set to %s (latent std of %d training images)",
                     self.tokenizer.config.scale_factor, self.cfg.scale_images)
        self.tokenizer.save_pretrained(Path(out_dir) / "tokenizer")


# ---------------------------------------------------------------------------------- shared helpers
@dataclass
class FlowObjectiveConfig:
    sigma_min: float = 1e-5
    t_sampler: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    null_prob: float = 0.1


def _objective(cfg: FlowObjectiveConfig):
    from ..flow import FlowObjective

    return FlowObjective(sigma_min=cfg.sigma_min, t_sampler=cfg.t_sampler, logit_mean=cfg.logit_mean,
                         logit_std=cfg.logit_std, null_prob=cfg.null_prob)


def _flow_bins(info: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {f"flow_{k}": v for k, v in binned_loss_tensors(info["t"], info["per_sample_loss"]).items()}


def _image_latents(batch: dict[str, Any], tokenizer) -> torch.Tensor:
    """Scaled image latents of a batch: pre-tokenised (stored unscaled) or encoded from its images."""
    raw = batch["image_latents_raw"] if "image_latents_raw" in batch else tokenizer.encode(batch["images"])
    return raw * tokenizer.scale_factor


def _shapes_captions(seed: int, data: DataConfig, step: int, local_batch: int, rank: int, world: int) -> list[str]:
    """The captions of a shapes-world batch, drawn without rendering its images."""
    import numpy as np

    from ..shapes import caption, sample_scene

    start = (step * world + rank) * local_batch
    caps = []
    for j in range(local_batch):
        rng = np.random.default_rng([seed, start + j])
        caps.append(caption(sample_scene(rng, data.num_objects, split=data.split), rng))
    return caps


def _load_tokenizer(path: str, device):
    from ..tokenizer import ImageTokenizer

    return _freeze(ImageTokenizer.from_pretrained(path, device=device))


# ------------------------------------------------------------------------------------------------ t2i
@dataclass
class T2IStageConfig:
    tokenizer_path: str = ""
    text_encoder: dict[str, Any] = field(default_factory=lambda: {"name": "minilm"})
    # A trained projector folder to keep frozen (e.g. from a text-autoencoder run); empty: train one
    # jointly with the flow (flow + KL + alignment), as the paper does.
    projector_path: str = ""
    projector_preset: str = "shapes"
    projector: dict[str, Any] = field(default_factory=dict)
    flow_preset: str = "shapes"
    flow: dict[str, Any] = field(default_factory=dict)
    objective: FlowObjectiveConfig = field(default_factory=FlowObjectiveConfig)
    kl_weight: float = 1e-4
    align_weight: float = 1.0
    eval_prompts: int = 64
    eval_steps: int = 20
    eval_guidance: float = 2.0

    def __post_init__(self) -> None:
        if not self.tokenizer_path:
            raise ConfigError("model.tokenizer_path is required (a trained tokenizer folder)")


class T2IStage(Stage):
    name: ClassVar[str] = "t2i"

    def __init__(self, cfg: T2IStageConfig, data: DataConfig, seed: int) -> None:
        super().__init__()
        from ..flow import FLOW_PRESETS, FlowTransformer
        from ..text import PROJECTOR_PRESETS, TextProjector
        from ..tokenizer import ImageTokenizer

        self.cfg, self.data_cfg, self.seed = cfg, data, seed
        tok_cfg = ImageTokenizer.read_config(cfg.tokenizer_path)
        k, c = tok_cfg.num_latent_tokens, tok_cfg.token_channels
        fcfg = _preset(FLOW_PRESETS, cfg.flow_preset, cfg.flow, "model.flow")
        self.frozen = _Frozen(tokenizer=None, encoder=None, source=None, projector=None)
        if cfg.projector_path:
            self.frozen.projector = _freeze(TextProjector.from_pretrained(cfg.projector_path))
            pcfg = self.frozen.projector.config
        else:
            pcfg = _preset(PROJECTOR_PRESETS, cfg.projector_preset, cfg.projector, "model.projector")
            self.projector = TextProjector(pcfg)
        check_latent_shapes(k, c, pcfg, fcfg)
        self.flow = FlowTransformer(fcfg)
        self.objective = _objective(cfg.objective)
        self.k = k

    @property
    def proj(self):
        return self.frozen.projector if self.frozen.projector is not None else self.projector

    def setup(self, device: torch.device) -> None:
        from ..text import load_text_encoder

        self.device = device
        self.frozen.tokenizer = _load_tokenizer(self.cfg.tokenizer_path, device)
        self.frozen.encoder = load_text_encoder(self.cfg.text_encoder, max_length=self.k, device=device)
        if self.frozen.projector is not None:
            self.frozen.projector.to(device)
        if self.frozen.encoder.dim != self.proj.config.text_dim:
            raise ConfigError(f"text encoder width {self.frozen.encoder.dim} differs from "
                              f"projector text_dim {self.proj.config.text_dim}")
        self.frozen.source = build_source(self.data_cfg, self.seed, device)
        _check_pretokenized(self.frozen.source, self.frozen.tokenizer, self.frozen.encoder)

    @torch.no_grad()
    def batch(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        b = self.frozen.source.get(step, local_batch, rank, world)
        tok = self.frozen.tokenizer
        b["image_latents"] = _image_latents(b, tok)
        if "text_states" not in b:
            ts = self.frozen.encoder.encode(b["captions"])
            b["text_states"], b["text_mask"] = ts.states.float(), ts.mask
        return b

    def forward(self, batch: dict[str, Any]):
        if self.frozen.projector is not None:
            with torch.no_grad():
                out = self.frozen.projector(batch["text_states"], batch.get("text_mask"), sample=True)
            fm, info = self.objective.loss(self.flow, out.z, batch["image_latents"])
            metrics = {"flow": fm.detach()}
            metrics.update(_flow_bins(info))
            return fm, metrics
        out = self.projector(batch["text_states"], batch.get("text_mask"), sample=True)
        fm, info = self.objective.loss(self.flow, out.z, batch["image_latents"])
        kl = self.projector.kl_loss(out.mean, out.logvar)
        align = (self.projector.align_loss(out.z, batch["text_states"], batch.get("text_mask"))
                 if self.cfg.align_weight > 0 else torch.zeros((), device=fm.device))
        loss = fm + self.cfg.kl_weight * kl + self.cfg.align_weight * align
        metrics = {"flow": fm.detach(), "kl": kl.detach(), "align": align.detach()}
        metrics.update(_flow_bins(info))
        return loss, metrics

    @torch.no_grad()
    def generate(self, captions: list[str], steps: int, guidance: float) -> torch.Tensor:
        from ..sampling import euler_sample

        ts = self.frozen.encoder.encode(captions)
        z = self.proj(ts.states.float(), ts.mask, sample=False).z
        lat = euler_sample(self.flow, z, num_steps=steps, guidance_scale=guidance)
        tok = self.frozen.tokenizer
        text = ts.states.float() if tok.config.text_dim > 0 else None
        return tok.decode(lat / tok.scale_factor, text_states=text).clamp(0, 1)

    @torch.no_grad()
    def evaluate(self, step: int):
        from ..shapes import judge_batch, scene_matches, shapes_batch

        n = self.cfg.eval_prompts
        if n <= 0:
            return {}, {}
        real, captions, scenes = shapes_batch(self.seed + 20_000, 0, n, split="test", num_objects=1,
                                              size=self.data_cfg.size, device=self.device)
        images = self.generate(captions, self.cfg.eval_steps, self.cfg.eval_guidance)
        judged = judge_batch(list(images.float().cpu()))
        acc = sum(scene_matches(p, t) for p, t in zip(judged, scenes)) / n
        return {"judge_acc_1obj": acc}, {"samples": _grid(torch.cat([real[:8], images[:8]]).float())}

    def export(self, out_dir: Path) -> None:
        self.proj.save_pretrained(Path(out_dir) / "text_projector")  # frozen or trained: the one the flow used
        self.flow.save_pretrained(Path(out_dir) / "t2i_flow")


def _check_pretokenized(source, tokenizer, encoder) -> None:
    """Pre-tokenised shards must come from the same tokenizer shape and text encoder."""
    meta = getattr(source, "meta", None)
    if meta is None:
        return
    k, c = tokenizer.latent_shape
    if (meta["num_tokens"], meta["channels"]) != (k, c):
        raise ConfigError(f"pre-tokenised latents are {meta['num_tokens']}x{meta['channels']}, "
                          f"the tokenizer makes {k}x{c}")
    if meta["text_dim"] != encoder.dim or meta["text_length"] != encoder.max_length:
        raise ConfigError(f"pre-tokenised text states are {meta['text_length']}x{meta['text_dim']}, "
                          f"the text encoder makes {encoder.max_length}x{encoder.dim}")


def check_latent_shapes(k: int, c: int, pcfg, fcfg) -> None:
    """The text latent and the image latent must have one shape: the flow maps one onto the other."""
    if pcfg.latent_channels != c:
        raise ConfigError(f"text latent has {pcfg.latent_channels} channels, image latent has {c}: "
                          "they must be equal")
    if fcfg.num_tokens != k or fcfg.in_channels != c:
        raise ConfigError(f"flow model expects {fcfg.num_tokens}x{fcfg.in_channels} latents, "
                          f"the tokenizer gives {k}x{c}")


# ------------------------------------------------------------------------------------- text decoder
@dataclass
class TextDecoderStageConfig:
    projector_path: str = ""  # frozen projector (from the t2i stage); empty: train one jointly
    projector_preset: str = "shapes"
    projector: dict[str, Any] = field(default_factory=dict)
    decoder_preset: str = "shapes"
    decoder: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=lambda: {"name": "minilm"})
    max_length: int = 32
    latent: Literal["sample", "mean"] = "sample"
    kl_weight: float = 1e-4
    align_weight: float = 1.0
    eval_captions: int = 500


class TextDecoderStage(Stage):
    name: ClassVar[str] = "text_decoder"

    def __init__(self, cfg: TextDecoderStageConfig, data: DataConfig, seed: int) -> None:
        super().__init__()
        from ..text import DECODER_PRESETS, PROJECTOR_PRESETS, TextDecoder, TextProjector

        self.cfg, self.data_cfg, self.seed = cfg, data, seed
        self.train_projector = not cfg.projector_path
        if self.train_projector:
            self.projector = TextProjector(_preset(PROJECTOR_PRESETS, cfg.projector_preset, cfg.projector,
                                                   "model.projector"))
            frozen_proj = None
        else:
            frozen_proj = TextProjector.from_pretrained(cfg.projector_path)
        self.decoder = TextDecoder(_preset(DECODER_PRESETS, cfg.decoder_preset, cfg.decoder, "model.decoder"))
        if self.decoder.config.num_tokens != cfg.max_length:
            raise ConfigError(f"decoder num_tokens {self.decoder.config.num_tokens} differs from "
                              f"model.max_length {cfg.max_length}")
        pc = (self.projector if self.train_projector else frozen_proj).config
        if pc.latent_channels != self.decoder.config.latent_channels:
            raise ConfigError(f"decoder reads {self.decoder.config.latent_channels}-channel latents, the "
                              f"projector makes {pc.latent_channels}")
        self.frozen = _Frozen(projector=frozen_proj, encoder=None, source=None)

    @property
    def proj(self):
        return self.projector if self.train_projector else self.frozen.projector

    def setup(self, device: torch.device) -> None:
        from ..text import load_text_encoder

        self.device = device
        if self.frozen.projector is not None:
            self.frozen.projector = _freeze(self.frozen.projector.to(device))
        self.frozen.encoder = load_text_encoder(self.cfg.text_encoder, max_length=self.cfg.max_length, device=device)
        if self.frozen.encoder.vocab_size != self.decoder.config.vocab_size:
            raise ConfigError(f"decoder vocab_size {self.decoder.config.vocab_size} differs from the text "
                              f"encoder's tokenizer ({self.frozen.encoder.vocab_size})")
        self.frozen.source = None

    @torch.no_grad()
    def batch(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        # Captions only: no need to render images for this stage.
        caps = _shapes_captions(self.seed, self.data_cfg, step, local_batch, rank, world)
        ts = self.frozen.encoder.encode(caps)
        return {"captions": caps, "text_states": ts.states.float(), "text_mask": ts.mask, "input_ids": ts.input_ids}

    def forward(self, batch: dict[str, Any]):
        out = self.proj(batch["text_states"], batch["text_mask"], sample=self.cfg.latent == "sample")
        z = out.z if self.train_projector else out.z.detach()
        ce = self.decoder.loss(z, batch["input_ids"], batch["text_mask"])
        metrics = {"ce": ce.detach()}
        loss = ce
        if self.train_projector:
            kl = self.projector.kl_loss(out.mean, out.logvar)
            loss = loss + self.cfg.kl_weight * kl
            metrics["kl"] = kl.detach()
            if self.cfg.align_weight > 0:
                align = self.projector.align_loss(out.z, batch["text_states"], batch["text_mask"])
                loss = loss + self.cfg.align_weight * align
                metrics["align"] = align.detach()
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, step: int):
        import numpy as np

        from ..shapes import caption, sample_scene
        from ..text import text_roundtrip_accuracy

        rng = np.random.default_rng([self.seed, 777])
        caps = [caption(sample_scene(rng, None, split="test"), rng) for _ in range(self.cfg.eval_captions)]
        acc = text_roundtrip_accuracy(self.proj, self.decoder, self.frozen.encoder, caps)
        return {"text_roundtrip_exact": acc}, {}

    def export(self, out_dir: Path) -> None:
        self.decoder.save_pretrained(Path(out_dir) / "text_decoder")
        if self.train_projector:
            self.projector.save_pretrained(Path(out_dir) / "text_projector")


# ------------------------------------------------------------------------------------------------ i2t
@dataclass
class I2TStageConfig:
    tokenizer_path: str = ""
    projector_path: str = ""
    decoder_path: str = ""  # optional: enables caption accuracy in evaluation
    text_encoder: dict[str, Any] = field(default_factory=lambda: {"name": "minilm"})
    flow_preset: str = "shapes"
    flow: dict[str, Any] = field(default_factory=dict)
    objective: FlowObjectiveConfig = field(default_factory=FlowObjectiveConfig)
    target: Literal["mean", "sample"] = "mean"
    # The ODE from one image latent has one end point, so several paraphrases of one image would be
    # averaged; "canonical" trains on one fixed template per scene (shapes world only).
    caption_mode: Literal["canonical", "random"] = "canonical"
    eval_images: int = 64
    eval_steps: int = 20
    eval_guidance: float = 1.0

    def __post_init__(self) -> None:
        if not self.tokenizer_path or not self.projector_path:
            raise ConfigError("model.tokenizer_path and model.projector_path are required for the i2t stage")


class I2TStage(Stage):
    name: ClassVar[str] = "i2t"

    def __init__(self, cfg: I2TStageConfig, data: DataConfig, seed: int) -> None:
        super().__init__()
        from ..flow import FLOW_PRESETS, FlowTransformer
        from ..text import TextProjector
        from ..tokenizer import ImageTokenizer

        self.cfg, self.data_cfg, self.seed = cfg, data, seed
        tok_cfg = ImageTokenizer.read_config(cfg.tokenizer_path)
        pcfg = TextProjector.read_config(cfg.projector_path)
        fcfg = _preset(FLOW_PRESETS, cfg.flow_preset, cfg.flow, "model.flow")
        check_latent_shapes(tok_cfg.num_latent_tokens, tok_cfg.token_channels, pcfg, fcfg)
        self.flow = FlowTransformer(fcfg)
        self.objective = _objective(cfg.objective)
        self.k = tok_cfg.num_latent_tokens
        self.frozen = _Frozen(tokenizer=None, encoder=None, projector=None, decoder=None, source=None,
                              targets=None)

    def setup(self, device: torch.device) -> None:
        from ..text import TextProjector, load_text_encoder

        self.device = device
        self.frozen.tokenizer = _load_tokenizer(self.cfg.tokenizer_path, device)
        self.frozen.projector = _freeze(TextProjector.from_pretrained(self.cfg.projector_path, device=device))
        self.frozen.encoder = load_text_encoder(self.cfg.text_encoder, max_length=self.k, device=device)
        self.frozen.source = build_source(self.data_cfg, self.seed, device)
        _check_pretokenized(self.frozen.source, self.frozen.tokenizer, self.frozen.encoder)
        self.frozen.targets = None
        source = self.frozen.source
        if self.cfg.caption_mode == "canonical" and hasattr(source, "meta"):
            self.frozen.targets = self._canonical_targets(source.dataset)

    @torch.no_grad()
    def _canonical_targets(self, shards) -> torch.Tensor | None:
        """Text latents of every pre-tokenised sample's canonical caption, computed once."""
        from ..shapes import Scene, all_captions

        if not all(r.get("scene") for r in shards.records):
            return None
        out = []
        for i in range(0, len(shards), 2048):
            caps = [all_captions(Scene.from_dict(r["scene"]))[0] for r in shards.records[i:i + 2048]]
            ts = self.frozen.encoder.encode(caps)
            o = self.frozen.projector(ts.states.float(), ts.mask, sample=False)
            out.append(o.mean)
        return torch.cat(out)

    @torch.no_grad()
    def batch(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        b = self.frozen.source.get(step, local_batch, rank, world)
        tok = self.frozen.tokenizer
        b["image_latents"] = _image_latents(b, tok)
        if self.frozen.targets is not None and self.cfg.target == "mean":
            b["text_latents"] = self.frozen.targets.index_select(0, b["index"])
            return b
        caps = b["captions"]
        if self.cfg.caption_mode == "canonical" and b.get("scenes"):
            from ..shapes import all_captions

            caps = [all_captions(s)[0] for s in b["scenes"]]
        ts = self.frozen.encoder.encode(caps)
        out = self.frozen.projector(ts.states.float(), ts.mask, sample=self.cfg.target == "sample")
        b["text_latents"] = out.z if self.cfg.target == "sample" else out.mean
        return b

    def forward(self, batch: dict[str, Any]):
        fm, info = self.objective.loss(self.flow, batch["image_latents"], batch["text_latents"])
        metrics = {"flow": fm.detach()}
        metrics.update(_flow_bins(info))
        return fm, metrics

    @torch.no_grad()
    def caption(self, images: torch.Tensor, steps: int, guidance: float) -> list[str]:
        from ..sampling import euler_sample

        tok = self.frozen.tokenizer
        lat = tok.encode(images) * tok.scale_factor
        z = euler_sample(self.flow, lat, num_steps=steps, guidance_scale=guidance)
        return self.frozen.decoder.decode(z, self.frozen.encoder)

    @torch.no_grad()
    def evaluate(self, step: int):
        from ..text import TextDecoder

        # Loaded here, not in setup: the decoder may be trained at the same time as this stage.
        if self.frozen.decoder is None:
            if not self.cfg.decoder_path or not Path(self.cfg.decoder_path).is_dir():
                return {}, {}
            self.frozen.decoder = _freeze(TextDecoder.from_pretrained(self.cfg.decoder_path, device=self.device))
        from ..errors import InvalidInputError
        from ..shapes import parse, scene_matches, shapes_batch

        n = self.cfg.eval_images
        images, _, scenes = shapes_batch(self.seed + 30_000, 0, n, split="test", num_objects=1,
                                         size=self.data_cfg.size, device=self.device)
        caps = self.caption(images, self.cfg.eval_steps, self.cfg.eval_guidance)
        ok = 0
        for cap, truth in zip(caps, scenes):
            try:
                ok += scene_matches(parse(cap), truth)
            except InvalidInputError:
                pass
        return {"caption_exact_1obj": ok / n}, {}

    def export(self, out_dir: Path) -> None:
        self.flow.save_pretrained(Path(out_dir) / "i2t_flow")


# -------------------------------------------------------------------------------------------- distill
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
    text_encoder: dict[str, Any] = field(default_factory=lambda: {"name": "minilm"})
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

    def __init__(self, cfg: DistillStageConfig, data: DataConfig, seed: int) -> None:
        super().__init__()
        from ..flow import FlowTransformer

        self.cfg, self.data_cfg, self.seed = cfg, data, seed
        teacher = _freeze(FlowTransformer.from_pretrained(cfg.teacher_path))
        self.student = FlowTransformer(teacher.config)
        if cfg.init_from_teacher:
            self.student.load_state_dict(teacher.state_dict())
        self.frozen = _Frozen(teacher=teacher, tokenizer=None, projector=None, encoder=None, source=None,
                              trajectory=None, pool=None, pending=None)

    def setup(self, device: torch.device) -> None:
        from ..sampling import CudaGraphed
        from ..text import TextProjector, load_text_encoder

        self.device = device
        self.frozen.teacher.to(device)
        if self.cfg.teacher_compile and device.type == "cuda":
            self.frozen.teacher.compile_blocks()
        graphed = self.cfg.teacher_cuda_graph and device.type == "cuda"
        self.frozen.trajectory = CudaGraphed(self._teacher_trajectory) if graphed else self._teacher_trajectory
        if self.cfg.tokenizer_path:  # text to image needs no tokenizer: prompts in, teacher latents out
            self.frozen.tokenizer = _load_tokenizer(self.cfg.tokenizer_path, device)
        self.frozen.projector = _freeze(TextProjector.from_pretrained(self.cfg.projector_path, device=device))
        k = self.frozen.teacher.config.num_tokens
        self.frozen.encoder = load_text_encoder(self.cfg.text_encoder, max_length=k, device=device)
        prompts_only = self.cfg.direction == "t2i" and self.data_cfg.kind == "shapes"
        self.frozen.source = None if prompts_only else build_source(self.data_cfg, self.seed, device)
        if prompts_only and device.type == "cuda":  # host work of step s + 1 overlaps the GPU's step s
            from concurrent.futures import ThreadPoolExecutor

            self.frozen.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-prompts")

    def _prompt_tokens(self, step: int, local_batch: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask of the batch's shapes captions (drawn without rendering images): host work only."""
        return self.frozen.encoder.tokenize(_shapes_captions(self.seed, self.data_cfg, step, local_batch, rank, world))

    def _next_prompt_tokens(self, step: int, local_batch: int, rank: int, world: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's tokens, drawn ahead by the worker thread when it has them, and the next step's
        ordered. The captions are a pure function of (seed, step, rank), so this changes no number."""
        key = (step, local_batch, rank, world)
        pending, self.frozen.pending = self.frozen.pending, None
        tokens = pending[1].result() if pending is not None and pending[0] == key else self._prompt_tokens(*key)
        if self.frozen.pool is not None:
            ahead = (step + 1, local_batch, rank, world)
            self.frozen.pending = (ahead, self.frozen.pool.submit(self._prompt_tokens, *ahead))
        return tokens

    def _source_latents(self, step: int, local_batch: int, rank: int, world: int) -> torch.Tensor:
        if self.frozen.source is None:  # t2i on the shapes world: captions, no images rendered
            ts = self.frozen.encoder.encode_tokens(*self._next_prompt_tokens(step, local_batch, rank, world))
            return self.frozen.projector(ts.states, ts.mask, sample=self.cfg.source_latent != "mean").z
        b = self.frozen.source.get(step, local_batch, rank, world)
        if self.cfg.direction == "i2t":
            return _image_latents(b, self.frozen.tokenizer)
        if "text_states" in b:
            states, mask = b["text_states"], b["text_mask"]
        else:
            ts = self.frozen.encoder.encode(b["captions"])
            states, mask = ts.states.float(), ts.mask
        return self.frozen.projector(states, mask, sample=self.cfg.source_latent != "mean").z  # z = mean unsampled

    @torch.no_grad()
    def batch(self, step: int, local_batch: int, rank: int, world: int) -> dict[str, Any]:
        x0 = self._source_latents(step, local_batch, rank, world).float()
        traj = self.frozen.trajectory(x0)
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
        from ..sampling import euler_sample

        bf16 = self.cfg.teacher_precision == "bf16" or (self.cfg.teacher_precision == "auto"
                                                       and x0.device.type == "cuda")
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            _, traj = euler_sample(self.frozen.teacher, x0, num_steps=self.cfg.teacher_steps,
                                   guidance_scale=self.cfg.teacher_guidance, return_trajectory=True)
        return traj.float()

    def forward(self, batch: dict[str, Any]):
        null = torch.zeros_like(batch["t_a"], dtype=torch.long)
        v = self.student(batch["x_a"], batch["t_a"], null)
        pred = batch["x_a"] + (batch["t_b"] - batch["t_a"])[:, None, None] * v.float()
        loss = torch.mean((pred - batch["x_b"]) ** 2)
        return loss, {"segment_mse": loss.detach()}

    def export(self, out_dir: Path) -> None:
        name = "t2i_flow" if self.cfg.direction == "t2i" else "i2t_flow"
        self.student.save_pretrained(Path(out_dir) / name)


STAGES: dict[str, tuple[type[Stage], type]] = {
    "tokenizer": (TokenizerStage, TokenizerStageConfig),
    "t2i": (T2IStage, T2IStageConfig),
    "text_decoder": (TextDecoderStage, TextDecoderStageConfig),
    "i2t": (I2TStage, I2TStageConfig),
    "distill": (DistillStage, DistillStageConfig),
}
