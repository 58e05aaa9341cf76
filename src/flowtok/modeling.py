"""Save and load models as a folder of ``config.json`` + ``model.safetensors``.

A model class mixes in :class:`PretrainedMixin` and names its config dataclass and a
``model_type`` string. Loading checks the type, the keys and the shapes, and turns every
problem into one :class:`~flowtok.errors.CheckpointError` line naming the first mismatch.
No pickle is ever read: weights are safetensors only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, atomic_write_text, from_dict, to_dict
from .errors import CheckpointError, InvalidInputError, OutputError
from .model_checks import preflight, saved_config
from .untrusted import parse_json, write_atomically

M = TypeVar("M", bound="PretrainedMixin")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temp file, fsync, rename)."""
    path = Path(path)
    _make_folder(path.parent)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # An unpredictable temporary name, removed on failure; a full disk is one OutputError line.
    write_atomically(path, write_path=lambda name: save_file(tensors, name, metadata=metadata))


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc.strerror or type(exc).__name__}") from None


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or corrupt file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot read weights file {path}: corrupt or truncated ({msg})") from None


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming the first missing, unexpected, wrongly shaped or non-finite key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise CheckpointError(f"{source}: missing weight '{missing[0]}' ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected weight '{unexpected[0]}' ({len(unexpected)} unexpected in all)"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: weight '{k}' has shape {tuple(state[k].shape)}, model expects {tuple(v.shape)}"
            )
    for k, v in state.items():
        # A NaN weight loads without complaint and later yields black images or empty captions.
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: weight '{k}' contains NaN or inf")


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` with a dataclass ``config``."""

    config_class: ClassVar[type]
    model_type: ClassVar[str]
    config: Any

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        from .nn.fp8 import FP8Linear

        if any(isinstance(m, FP8Linear) for m in self.modules()):  # type: ignore[attr-defined]
            raise InvalidInputError(f"this {self.model_type} is FP8-quantised for inference; save it before "
                                    "quantize_fp8() (its full-precision weights are gone)")
        directory = Path(directory)
        _make_folder(directory)
        state = self.state_dict()  # type: ignore[attr-defined]
        if dtype is not None:
            state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
        atomic_save_safetensors(state, directory / WEIGHTS_NAME,
                                metadata={"model_type": self.model_type, **saved_config(self.config)})
        cfg = {"model_type": self.model_type, **to_dict(self.config)}
        atomic_write_text(directory / CONFIG_NAME, json.dumps(cfg, indent=2) + "\n")
        return directory

    @classmethod
    def read_config(cls, directory: str | os.PathLike) -> Any:
        directory = Path(directory)
        path = directory / CONFIG_NAME
        if not directory.is_dir():
            raise CheckpointError(f"model folder not found: {directory}")
        if not path.is_file():
            raise CheckpointError(f"{directory} has no {CONFIG_NAME}")
        try:
            data = parse_json(path.read_bytes())
        except ValueError as exc:
            raise CheckpointError(f"{path} is not valid: {exc}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} must hold a JSON object")
        kind = data.pop("model_type", None)
        if kind != cls.model_type:
            raise CheckpointError(
                f"{directory} holds a '{kind}' model, expected '{cls.model_type}'"
            )
        try:
            return from_dict(cls.config_class, data)
        except ConfigError as exc:
            raise CheckpointError(f"{path}: {exc}") from None

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> M:
        directory = Path(directory)
        config = cls.read_config(directory)
        preflight(cls, config, directory, WEIGHTS_NAME)  # before anything is allocated
        model = cls(config)  # type: ignore[call-arg]
        state = load_safetensors(directory / WEIGHTS_NAME)
        check_state_dict(model, state, str(directory))  # type: ignore[arg-type]
        model.load_state_dict(state)  # type: ignore[attr-defined]
        model = model.to(device=device)  # type: ignore[attr-defined]
        if dtype is not None:
            model = model.to(dtype=dtype)  # type: ignore[attr-defined]
        else:
            model = model.float()  # type: ignore[attr-defined]
        model.eval()  # type: ignore[attr-defined]
        return model

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameters as the checkpoint holds them (inference-only padding not counted)."""
        from .nn import count_parameters

        return count_parameters(self, trainable_only)  # type: ignore[arg-type]
