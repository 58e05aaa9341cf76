"""Convert the authors' released FlowTok checkpoints into flowtok folders: ``flowtok convert``.

The FlowTok re-implementation (TACJu/FlowTok, commit d4d43c5) released three raw PyTorch files on the
Hub repo ``turkeyju/FlowTok``: ``FlowTok-XL.pth`` and ``FlowTok-H.pth`` (the whole ``nnet``: the DiT
plus the text projector and its alignment MLP) and ``FlowTiTok_512.bin`` (the 512 px image tokenizer).
Upstream writes them with ``torch.save(module.state_dict())`` and reads them back with a strict
``load_state_dict`` (``eval_t2i_mjhq.py``, ``train_t2i.py``), so a plain flat state dict is what to
expect; a dict wrapping it (``model`` / ``state_dict`` / ``ema`` ...) or ``module.`` prefixes (DDP,
``torch.compile``) are unwrapped too, in case a copy went through other tools.

The file is read without running any pickled code (``torch.load(weights_only=True)``, or safetensors),
every key is mapped (none left over, none missing, every shape checked; the error names the first
mismatch), and the result is written in flowtok's folder format:

* ``--kind tokenizer-512``: a tokenizer folder (``config.json`` + ``model.safetensors``);
* ``--kind flow-xl`` / ``flow-h``: a pipeline folder with ``text_projector/`` (from the checkpoint's
  ``context_encoder.*``, ``context_projector.*`` and ``t2t_temperature``), ``t2i_flow/`` and, when
  ``--tokenizer`` names an already converted tokenizer folder, ``tokenizer/``; ``pipeline.json`` points
  the text encoder at the CLIP ViT-L/14-336 text tower upstream used.

Key correspondences live beside the models: :data:`flowtok.flow.UPSTREAM_RENAMES`,
:func:`flowtok.text.convert_upstream_state_dict`, and the table in :mod:`flowtok.tokenizer.model`,
implemented here by :func:`convert_tokenizer_state_dict`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import CheckpointError, InvalidInputError

log = logging.getLogger(__name__)
_M = TypeVar("_M", bound=torch.nn.Module)

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
FLOW_KINDS = {"flow-xl": "FlowTok-XL", "flow-h": "FlowTok-H"}
TOKENIZER_KINDS = {"tokenizer-512": "flowtitok-512"}
KINDS = (*FLOW_KINDS, *TOKENIZER_KINDS)

# Keys under which training tools nest a state dict, most useful first: EMA weights are the ones
# upstream samples with during training.
_WRAPPER_KEYS = ("nnet_ema", "ema", "model_ema", "ema_model", "state_dict", "model", "nnet", "module", "net")
_PREFIXES = ("module.", "_orig_mod.")

# Upstream tokenizer key -> ours (the table in flowtok.tokenizer.model's docstring).
_TOKENIZER_RULES: list[tuple[str, str]] = [
    (r"^latent_tokens$", "encoder.latent_tokens"),
    (r"^encoder\.patch_embed\.(weight|bias)$", r"encoder.patch_embed.\1"),
    (r"^(encoder|decoder)\.latent_token_positional_embedding$", r"\1.latent_pos_embed"),
    (r"^(encoder|decoder)\.ln_(pre|post)\.(weight|bias)$", r"\1.norm_\2.\3"),
    (r"^(encoder|decoder)\.transformer\.(\d+)\.ln_([12])\.(weight|bias)$", r"\1.blocks.\2.norm\3.\4"),
    (r"^(encoder|decoder)\.transformer\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)$", r"\1.blocks.\2.attn.\3.\4"),
    (r"^(encoder|decoder)\.transformer\.(\d+)\.mlp\.(w12|w3)\.(weight|bias)$", r"\1.blocks.\2.mlp.\3.\4"),
    (r"^encoder\.conv_out\.(weight|bias)$", r"encoder.to_moments.\1"),
    (r"^decoder\.decoder_embed\.(weight|bias)$", r"decoder.latent_embed.\1"),
    (r"^decoder\.mask_token$", "decoder.mask_token"),
    (r"^decoder\.text_guidance_proj\.(weight|bias)$", r"decoder.text_proj.\1"),
    (r"^decoder\.text_guidance_positional_embedding$", "decoder.text_pos_embed"),
    (r"^decoder\.ffn\.0\.(weight|bias)$", r"decoder.to_pixels.\1"),
    (r"^decoder\.conv_out\.(weight|bias)$", r"decoder.conv_out.\1"),
]
# Upstream stores its 1x1 convs as [out, in, 1, 1]; ours are Linears.
_SQUEEZE_1X1 = ("encoder.to_moments.weight", "decoder.to_pixels.weight")
_ROPE_TABLE = re.compile(r"^(encoder|decoder)\.positional_embedding\.freqs_(cos|sin)$")


# ----------------------------------------------------------------------------------------- reading
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a raw checkpoint without executing pickled code and return its flat state dict.

    safetensors files are recognised by their header whatever their name; everything else goes
    through ``torch.load(weights_only=True)``. Wrappers and ``module.`` prefixes are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if not head:
        raise CheckpointError(f"{path} is empty")
    if _looks_like_safetensors(head, path.stat().st_size):
        from .modeling import load_safetensors

        return unwrap_state_dict(load_safetensors(path), str(path))
    not_a_checkpoint = _what_else(head, path.stat().st_size)
    if not_a_checkpoint:
        raise CheckpointError(f"{path} is {not_a_checkpoint}")
    try:
        with warnings.catch_warnings():
            # torch warns in two lines about a pickle protocol it did not write; the error below says more.
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK"))
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "unsupported global" in str(exc).lower():
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} pickles Python objects{what} that only code could rebuild; flowtok loads tensors only "
                "(weights_only=True). Save the model's state_dict() instead of the model or training state"
            ) from None
        raise CheckpointError(f"cannot read {path}: corrupt or truncated ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"cannot read {path}: corrupt or truncated ({_first_line(exc)})") from None
    return unwrap_state_dict(obj, str(path))


def _what_else(head: bytes, size: int) -> str | None:
    """What a file that cannot be a checkpoint is, as the rest of an error sentence; None if it may be one.

    torch.save writes a zip archive (``PK``) or, before torch 1.6, a pickle (opcode ``0x80`` then the
    protocol number); anything else is not a checkpoint, and a pickle error about it would mislead.
    """
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        found = re.search(rb"size (\d+)", head)
        real = f" of {int(found.group(1)) / 2**30:.2f} GiB" if found else ""
        return (f"a Git LFS pointer ({size} bytes), not the weights{real}: run 'git lfs pull' in the clone, or "
                "download the file with huggingface_hub (hf_hub_download)")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<!--")) or b"<html" in text[:512]:
        return ("an HTML page, not a checkpoint (a browser's 'save' of the Hub's file page?): download the "
                "file's 'resolve' URL, or use huggingface_hub (hf_hub_download)")
    if head.startswith(b"PK") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return None
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed: decompress it first (gunzip)"
    return (f"not a PyTorch or safetensors checkpoint (it starts with {head[:8]!r}); a download may have "
            "failed or the wrong file was given")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # 8-byte little-endian header length, then the JSON header itself.
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < size


def unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` dict inside ``obj``: nested wrappers and DDP prefixes removed."""
    for _ in range(4):  # wrappers are at most a couple of levels deep in practice
        if not isinstance(obj, Mapping) or not obj:
            break
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = {}
            for key, value in obj.items():
                name = str(key)
                stripped = True
                while stripped:
                    stripped = False
                    for prefix in _PREFIXES:
                        if name.startswith(prefix):
                            name, stripped = name[len(prefix):], True
                state[name] = value
            return state
        inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        log.info("%s: using the state dict under '%s'", source, inner)
        obj = obj[inner]
    if isinstance(obj, Mapping):
        keys = ", ".join(map(str, list(obj)[:6])) or "none"
        raise CheckpointError(f"{source} holds no state dict of tensors (top-level keys: {keys})")
    raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict")


# ------------------------------------------------------------------------------------ kind checks
def detect_kind(state: Mapping[str, torch.Tensor]) -> str | None:
    """'tokenizer-512', 'flow-xl', 'flow-h', 'tokenizer' / 'flow' (other sizes) or None."""
    if "latent_tokens" in state or "encoder.patch_embed.weight" in state:
        from .tokenizer import TOKENIZER_PRESETS

        # The RoPE table has one row per patch: it tells the image size the tokenizer was saved for.
        table = state.get("encoder.positional_embedding.freqs_cos")
        for kind, preset in TOKENIZER_KINDS.items():
            if table is not None and table.dim() == 2 and table.shape[0] == TOKENIZER_PRESETS[preset].grid_size ** 2:
                return kind
        return "tokenizer"
    weight = state.get("x_embedder.weight")
    if weight is not None and weight.dim() == 2:
        width = weight.shape[0]
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        from .flow import FLOW_PRESETS

        for kind, preset in FLOW_KINDS.items():
            cfg = FLOW_PRESETS[preset]
            if (cfg.width, cfg.depth) == (width, depth):
                return kind
        return "flow"
    return None


def _check_kind(state: Mapping[str, torch.Tensor], kind: str, source: str) -> None:
    found = detect_kind(state)
    if found == kind:
        return
    if found is None:
        first = next(iter(state), "none")
        raise CheckpointError(f"{source} is not a FlowTok checkpoint of kind '{kind}' (first key '{first}')")
    if found in KINDS:
        raise CheckpointError(f"{source} looks like a '{found}' checkpoint, not '{kind}'; pass --kind {found}")
    if found == "flow":
        width, depth = state["x_embedder.weight"].shape[0], len({k.split(".")[1] for k in state
                                                                   if k.startswith("blocks.")})
        what = f"a flow checkpoint of width {width} and depth {depth}"
    else:
        rows = state.get("encoder.positional_embedding.freqs_cos")
        grid = math.isqrt(rows.shape[0]) if rows is not None and rows.dim() == 2 else None
        what = f"a tokenizer for {grid * 16} px images" if grid else "a tokenizer of unknown size"
    raise CheckpointError(f"{source} holds {what}, not '{kind}'")


# ------------------------------------------------------------------------------------------ mapping
def _check_against(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                   origin: Mapping[str, str] | None = None) -> None:
    """CheckpointError naming the first missing, left-over or wrongly shaped key (upstream names kept)."""
    from .modeling import check_state_dict

    origin = origin or {}
    own = model.state_dict()
    for key, value in own.items():
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            theirs = origin.get(key, key)
            raise CheckpointError(
                f"{source}: '{theirs}' has shape {tuple(state[key].shape)}, flowtok's '{key}' expects "
                f"{tuple(value.shape)}"
            )
    check_state_dict(model, dict(state), source)


def convert_tokenizer_state_dict(state: Mapping[str, torch.Tensor], config: Any,
                                 source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map an upstream FlowTiTok state dict onto :class:`~flowtok.tokenizer.ImageTokenizer` names.

    ``config`` is the :class:`~flowtok.tokenizer.TokenizerConfig` the weights are meant for. The
    upstream RoPE tables (persistent buffers there, derived ones here) are checked against ours and
    dropped; a key that no rule maps is a CheckpointError.
    """
    from .nn.rope import rope_2d_tables

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        table = _ROPE_TABLE.match(key)
        if table:
            part, fn = table.groups()
            heads = getattr(config, f"{part}_heads")
            head_dim = getattr(config, f"{part}_width") // heads
            ours = rope_2d_tables(head_dim, config.grid_size, config.rope_theta)[0 if fn == "cos" else 1]
            if tuple(value.shape) != tuple(ours.shape):
                raise CheckpointError(
                    f"{source}: '{key}' has shape {tuple(value.shape)}, a {config.image_size} px tokenizer with "
                    f"{heads} heads expects {tuple(ours.shape)}"
                )
            # bf16/fp16 copies of a table of cos/sin values round to about 4e-3.
            tol = 1e-4 if value.dtype == torch.float32 else 1e-2
            diff = (value.float() - ours).abs().max().item()
            if not diff <= tol:
                raise CheckpointError(
                    f"{source}: '{key}' differs from flowtok's 2D RoPE table by {diff:.3g}; "
                    "not the FlowTiTok rotary layout"
                )
            continue
        for pattern, repl in _TOKENIZER_RULES:
            if re.match(pattern, key):
                new = re.sub(pattern, repl, key)
                break
        else:
            raise CheckpointError(f"{source}: left-over weight '{key}' matches no FlowTiTok tokenizer key")
        if new in _SQUEEZE_1X1:
            if value.dim() != 4 or tuple(value.shape[2:]) != (1, 1):
                raise CheckpointError(f"{source}: '{key}' has shape {tuple(value.shape)}, expected a 1x1 conv")
            value = value[:, :, 0, 0]
        if new in out:
            raise CheckpointError(f"{source}: two weights map to '{new}' (the second is '{key}')")
        out[new] = value
    for part in ("encoder", "decoder"):
        for fn in ("cos", "sin"):
            if f"{part}.positional_embedding.freqs_{fn}" not in state:
                raise CheckpointError(f"{source}: missing weight '{part}.positional_embedding.freqs_{fn}'")
    return out


def split_flow_state_dict(state: Mapping[str, torch.Tensor]
                          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An upstream ``FlowTok`` (nnet) state dict -> (FlowTransformer state, TextProjector state)."""
    from .flow import UPSTREAM_RENAMES
    from .text.projector import convert_upstream_state_dict, upstream_key

    projector = convert_upstream_state_dict(state)
    flow = {UPSTREAM_RENAMES.get(k, k): v for k, v in state.items() if upstream_key(k) is None}
    return flow, projector


# ------------------------------------------------------------------------------------- conversion
def _materialise(model_cls: type[_M], config: Any, state: dict[str, torch.Tensor], source: str,
                 origin: Mapping[str, str] | None = None) -> _M:
    """Build ``model_cls(config)`` without initialising it and adopt the checked tensors."""
    with torch.device("meta"):
        model = model_cls(config)
    _check_against(model, state, source, origin)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, assign=True)
    return model


def convert_tokenizer(path: str | os.PathLike, out: str | os.PathLike, kind: str = "tokenizer-512",
                      dtype: torch.dtype | None = torch.float32) -> Path:
    """Convert a released FlowTiTok file to a tokenizer folder loadable by ``ImageTokenizer.from_pretrained``."""
    from .config import preset
    from .tokenizer import TOKENIZER_PRESETS, ImageTokenizer

    if kind not in TOKENIZER_KINDS:
        raise InvalidInputError(f"unknown tokenizer kind '{kind}' (known: {', '.join(TOKENIZER_KINDS)})")
    state = read_checkpoint(path)
    _check_kind(state, kind, str(path))
    config = preset(TOKENIZER_PRESETS, TOKENIZER_KINDS[kind])
    mapped = convert_tokenizer_state_dict(state, config, str(path))
    model = _materialise(ImageTokenizer, config, mapped, str(path))
    out = Path(out)
    model.save_pretrained(out, dtype=dtype)
    ImageTokenizer.from_pretrained(out)  # a folder that does not load is a bug here, not at first use
    return out


def convert_flow(path: str | os.PathLike, out: str | os.PathLike, kind: str,
                 tokenizer: str | os.PathLike | None = None, clip: str = DEFAULT_CLIP,
                 dtype: torch.dtype | None = torch.float32) -> Path:
    """Convert FlowTok-XL.pth / FlowTok-H.pth to a pipeline folder (``text_projector``, ``t2i_flow``,
    and ``tokenizer`` when a converted tokenizer folder is given)."""
    from .config import preset
    from .flow import FLOW_PRESETS, FlowTransformer
    from .pipelines import SamplingDefaults, assemble_pipeline, write_pipeline_spec
    from .text import PROJECTOR_PRESETS, TextEncoderSpec, TextProjector
    from .tokenizer import ImageTokenizer

    if kind not in FLOW_KINDS:
        raise InvalidInputError(f"unknown flow kind '{kind}' (known: {', '.join(FLOW_KINDS)})")
    # The config is enough to check compatibility; assemble_pipeline loads the weights below.
    tok_cfg = ImageTokenizer.read_config(tokenizer) if tokenizer is not None else None
    state = read_checkpoint(path)
    _check_kind(state, kind, str(path))
    flow_state, proj_state = split_flow_state_dict(state)

    flow_cfg = preset(FLOW_PRESETS, FLOW_KINDS[kind])
    # Upstream trained with CrossFlow's KL form summed over everything (weight 0.01); recording it keeps
    # a fine-tune of the converted projector on upstream's objective. Inference ignores both fields.
    proj_cfg = preset(PROJECTOR_PRESETS, "paper", kl_form="crossflow", kl_reduction="sum")
    if "logit_scale" not in proj_state:
        # Upstream builds t2t_temperature only when the (undefined) config key use_t2t_temperature is
        # set; it is a training-only contrastive temperature, so its initial value stands in.
        log.warning("%s has no t2t_temperature; using the initial value log(1/0.07) (used by training only)", path)
        proj_state["logit_scale"] = torch.tensor(proj_cfg.logit_scale_init)
    origin = {"null_embedder.weight": "y_embedder.embedding_table.weight"}
    flow = _materialise(FlowTransformer, flow_cfg, flow_state, str(path), origin)
    projector = _materialise(TextProjector, proj_cfg, proj_state, str(path))

    if tok_cfg is not None:
        t = tok_cfg
        if (t.num_latent_tokens, t.token_channels) != (flow_cfg.num_tokens, flow_cfg.in_channels):
            raise CheckpointError(
                f"{tokenizer}: tokenizer latents are {t.num_latent_tokens} x {t.token_channels}, the flow model's "
                f"{flow_cfg.num_tokens} x {flow_cfg.in_channels}"
            )
        if t.text_dim != proj_cfg.text_dim:
            raise CheckpointError(
                f"{tokenizer}: tokenizer decoder reads {t.text_dim}-d text states, the projector {proj_cfg.text_dim}-d"
            )

    out = Path(out)
    projector.save_pretrained(out / "text_projector", dtype=dtype)
    flow.save_pretrained(out / "t2i_flow", dtype=dtype)
    del flow, projector, state, flow_state, proj_state
    text_encoder = TextEncoderSpec("clip", str(clip)).to_dict()
    if tokenizer is not None:
        # assemble_pipeline re-loads every component, so a folder that would not load fails now.
        return assemble_pipeline(out, {"tokenizer": tokenizer, "text_projector": out / "text_projector",
                                       "t2i_flow": out / "t2i_flow"},
                                 text_encoder=text_encoder, defaults=SamplingDefaults(), dtype=dtype)
    # The same pipeline.json as assemble_pipeline writes; FlowTokPipeline needs a tokenizer before it loads.
    write_pipeline_spec(out, {"text_projector": "text_projector", "t2i_flow": "t2i_flow"}, text_encoder,
                        SamplingDefaults())
    log.warning("no --tokenizer given: %s is not a complete pipeline yet; convert FlowTiTok_512.bin "
                "(--kind tokenizer-512) and pass its folder with --tokenizer", out)
    return out


def convert_checkpoint(path: str | os.PathLike, kind: str, out: str | os.PathLike,
                       tokenizer: str | os.PathLike | None = None, clip: str = DEFAULT_CLIP,
                       dtype: torch.dtype | None = torch.float32) -> Path:
    """Convert one released file; ``kind`` is one of :data:`KINDS`. Returns the written folder."""
    if kind in TOKENIZER_KINDS:
        if tokenizer is not None:
            raise InvalidInputError("--tokenizer is for flow checkpoints; a tokenizer conversion takes none")
        return convert_tokenizer(path, out, kind, dtype)
    if kind in FLOW_KINDS:
        return convert_flow(path, out, kind, tokenizer, clip, dtype)
    raise InvalidInputError(f"unknown kind '{kind}' (known: {', '.join(KINDS)})")


# ------------------------------------------------------------------------------------------- CLI
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _convert(args: argparse.Namespace) -> int:
    out = convert_checkpoint(args.from_official, args.kind, args.out, tokenizer=args.tokenizer, clip=args.clip,
                             dtype=_DTYPES[args.dtype])
    print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert the authors' released FlowTok weights into flowtok folders",
        description="Convert turkeyju/FlowTok weights. Tokenizer first: flowtok convert --from-official "
                    "FlowTiTok_512.bin --kind tokenizer-512 --out tok512; then flowtok convert --from-official "
                    "FlowTok-XL.pth --kind flow-xl --tokenizer tok512 --out flowtok-xl")
    p.add_argument("--from-official", required=True, metavar="PATH", help="FlowTok-XL.pth, FlowTok-H.pth or "
                   "FlowTiTok_512.bin (read with weights_only=True; safetensors also accepted)")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default=None, help="flow kinds: an already converted tokenizer folder to "
                   "include, making the output a complete pipeline")
    p.add_argument("--clip", default=DEFAULT_CLIP, help="flow kinds: CLIP ViT-L/14-336 text tower, a local "
                   f"folder or Hub id, written into pipeline.json (default {DEFAULT_CLIP})")
    p.add_argument("--dtype", choices=list(_DTYPES), default="fp32", help="storage precision (default fp32)")
    p.set_defaults(func=_convert)


__all__ = [
    "DEFAULT_CLIP",
    "KINDS",
    "convert_checkpoint",
    "convert_flow",
    "convert_tokenizer",
    "convert_tokenizer_state_dict",
    "detect_kind",
    "read_checkpoint",
    "split_flow_state_dict",
    "unwrap_state_dict",
]
