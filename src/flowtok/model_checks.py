"""Checks on model folders made before anything is allocated or trusted.

A ``config.json`` is read before the weights, and a model is built from it; a hostile or mistaken
value (a width of 2**20, a depth of 10**7, an ``mlp_ratio`` of NaN) would allocate terabytes or
fail deep inside torch. :func:`preflight` reads only the safetensors header (a few kB), checks every
config value, builds the model on the ``meta`` device (no memory) and compares every weight's shape
with the file, so a mismatch is one :class:`~flowtok.errors.CheckpointError` line before any
allocation. :func:`check_components` and :func:`read_pipeline_spec` do the same for a pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .untrusted import parse_json

# safetensors itself refuses headers over 100 MB.
_MAX_HEADER_BYTES = 100 * 2**20
# An int setting above this is not a size any model here has (widths are thousands, vocabularies
# tens of thousands); it would only make the meta-device build slow.
_MAX_INT = 2**24
SAVED_CONFIG_KEY = "flowtok_config"


def read_weights_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes of every tensor in a safetensors file and its metadata, from the header alone."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"cannot read weights file {path}: not a safetensors file, or truncated")
        try:
            header = parse_json(fh.read(n))
        except ValueError as exc:
            raise CheckpointError(f"cannot read weights file {path}: corrupt header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read weights file {path}: corrupt header")
    metadata = header.pop("__metadata__", None) or {}
    shapes = {}
    for name, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"cannot read weights file {path}: corrupt entry for '{name}'")
        shapes[name] = tuple(shape)
    return shapes, metadata if isinstance(metadata, dict) else {}


def check_config_values(config: Any, source: str) -> None:
    """Every number in a (flat) config dataclass finite and of a plausible size."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"{source}: {field.name} must be a finite number, got {value}")
        if isinstance(value, int) and abs(value) > _MAX_INT:
            raise CheckpointError(f"{source}: {field.name} = {value} is not a plausible size")


def saved_config(config: Any) -> dict[str, str]:
    """safetensors metadata recording the integer settings the weights were saved with."""
    sizes = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
             if isinstance(getattr(config, f.name), int) and not isinstance(getattr(config, f.name), bool)}
    return {SAVED_CONFIG_KEY: json.dumps(sizes, sort_keys=True)}


def preflight(cls: type, config: Any, directory: str | os.PathLike, weights_name: str) -> None:
    """CheckpointError if ``config`` cannot describe the weights in ``directory``; nothing allocated."""
    directory = Path(directory)
    source = str(directory / "config.json")
    shapes, metadata = read_weights_header(directory / weights_name)
    check_config_values(config, source)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        # Each layer holds at least one tensor: a depth above the file's tensor count cannot match it.
        if field.name.endswith(("depth", "layers")) and isinstance(value, int) and value > len(shapes):
            raise CheckpointError(f"{source}: {field.name} = {value}, but the weights hold only "
                                  f"{len(shapes)} tensors")
    recorded = metadata.get(SAVED_CONFIG_KEY)
    if recorded is not None:
        try:
            sizes = parse_json(recorded)
        except ValueError:
            sizes = {}
        for name, saved in (sizes.items() if isinstance(sizes, dict) else ()):
            now = getattr(config, name, saved)
            if now != saved:
                # e.g. a tokenizer's image_size: no weight's shape depends on it (its RoPE tables are derived).
                raise CheckpointError(f"{source}: {name} is {now}, but the weights were saved with {name} = {saved}")
    try:
        with torch.device("meta"):
            model = cls(config)
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError, ZeroDivisionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{source}: the model cannot be built with this config ({first})") from None
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    if missing:
        raise CheckpointError(f"{directory}: missing weight '{missing[0]}' ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected weight '{unexpected[0]}' ({len(unexpected)} unexpected in all)")
    for k, shape in own.items():
        if shapes[k] != shape:
            raise CheckpointError(f"{directory}: weight '{k}' has shape {shapes[k]}, config.json implies {shape}")


def check_components(configs: Mapping[str, Any], source: str, text_dim: int | None = None) -> None:
    """CheckpointError naming the first pair of pipeline components whose shapes disagree.

    ``configs`` maps component names to their config dataclasses; ``text_dim`` is the text
    encoder's width when it is known.
    """
    tok = configs.get("tokenizer")
    if tok is None:
        return
    k, c = tok.num_latent_tokens, tok.token_channels
    want = f"the tokenizer's latents are {k} x {c}"
    for name in ("t2i_flow", "i2t_flow"):
        cfg = configs.get(name)
        if cfg is not None and (cfg.num_tokens, cfg.in_channels) != (k, c):
            raise CheckpointError(f"{source}: {name} models {cfg.num_tokens} x {cfg.in_channels} tokens; {want}")
    dec = configs.get("text_decoder")
    if dec is not None and (dec.num_tokens, dec.latent_channels) != (k, c):
        raise CheckpointError(f"{source}: text_decoder reads {dec.num_tokens} x {dec.latent_channels} latents; {want}")
    proj = configs.get("text_projector")
    if proj is not None:
        if proj.latent_channels != c:
            raise CheckpointError(f"{source}: text_projector makes {proj.latent_channels}-channel text latents; {want}")
        if tok.text_dim and tok.text_dim != proj.text_dim:
            raise CheckpointError(f"{source}: the tokenizer's decoder reads {tok.text_dim}-d text states, "
                                  f"the text_projector {proj.text_dim}-d")
        if text_dim is not None and text_dim != proj.text_dim:
            raise CheckpointError(f"{source}: the text encoder gives {text_dim}-d states, the text_projector "
                                  f"reads {proj.text_dim}-d")


_DEFAULT_TYPES = {"num_inference_steps": int, "guidance_scale": float, "caption_guidance_scale": float}


def check_defaults(defaults: Any, source: str) -> dict[str, Any]:
    """Sampling defaults of a pipeline: a mapping whose known keys hold sane values."""
    if defaults is None:
        return {}
    if not isinstance(defaults, dict):
        raise CheckpointError(f"{source}: 'defaults' must be an object, got {type(defaults).__name__}")
    for key, kind in _DEFAULT_TYPES.items():
        if key not in defaults:
            continue
        value = defaults[key]
        ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
        if not ok or not math.isfinite(value) or (kind is int and not 1 <= value <= 1000):
            raise CheckpointError(f"{source}: defaults.{key} = {value!r} is not a valid setting")
    if defaults.get("caption_grammar") not in (None, "shapes"):
        raise CheckpointError(f"{source}: defaults.caption_grammar = {defaults['caption_grammar']!r} is not a valid "
                              "setting (expected \"shapes\" or none)")
    return defaults


def read_pipeline_spec(path: Path, components: tuple[str, ...]) -> dict[str, Any]:
    """``pipeline.json``, checked: components are sub-folders of the pipeline folder, the rest well formed."""
    try:
        spec = parse_json(path.read_bytes())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid: {exc}") from None
    if not isinstance(spec, dict) or spec.get("pipeline_type") != "flowtok":
        raise CheckpointError(f"{path} does not describe a flowtok pipeline")
    comps = spec.get("components", {})
    if not isinstance(comps, dict):
        raise CheckpointError(f"{path}: 'components' must be an object naming sub-folders")
    for name, sub in comps.items():
        if name not in components:
            raise CheckpointError(f"{path}: unknown component '{name}' (known: {', '.join(components)})")
        if sub is None:
            continue
        norm = os.path.normpath(sub) if isinstance(sub, str) and sub else ""
        if not norm or os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
            raise CheckpointError(f"{path}: component '{name}' must name a sub-folder of the pipeline, got {sub!r}")
    encoder = spec.get("text_encoder", {"name": "minilm"})
    if not isinstance(encoder, (dict, str)):
        raise CheckpointError(f"{path}: 'text_encoder' must be an object or a name, got {type(encoder).__name__}")
    check_defaults(spec.get("defaults"), str(path))
    return spec
