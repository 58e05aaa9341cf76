"""Save and load models as a folder of ``config.json`` + ``model.safetensors``, locally or on the Hub.

A model class mixes in :class:`PretrainedMixin` (built on ``huggingface_hub``'s
:class:`~huggingface_hub.PyTorchModelHubMixin`, so ``push_to_hub`` and Hub ids work as in any Hub
library) and names its config dataclass and a ``model_type`` string. Loading checks the type, the keys
and the shapes, and turns every problem into one :class:`~flowtok.errors.CheckpointError` line naming
the first mismatch. No pickle is ever read: weights are safetensors only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from huggingface_hub import PyTorchModelHubMixin
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
    write_atomically(path, write_path=lambda name: _save_canonical(tensors, name, metadata))


def _save_canonical(tensors: dict[str, torch.Tensor], name: str, metadata: dict[str, str] | None) -> None:
    """``save_file``, then the header's metadata put in sorted order: safetensors writes it from a Rust
    HashMap, whose order changes from process to process, so the same weights saved by two runs (an
    uninterrupted one and a resumed one) would differ in their bytes. Same keys, same length."""
    save_file(tensors, name, metadata=metadata)
    if not metadata or len(metadata) < 2:
        return
    with open(name, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        raw = fh.read(n)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # serde writes compact JSON, then pads with spaces to 8-byte alignment
            fh.seek(8)
            fh.write(text.ljust(n, b" "))


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc.strerror or type(exc).__name__}") from None


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file, its tensors placed straight on ``device``; a missing, truncated or corrupt
    file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
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


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` that is not a local path: what :func:`from_pretrained` sends to the Hub."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith("/")


def hub_folder(name: str | os.PathLike, filenames: tuple[str, ...] = (CONFIG_NAME, WEIGHTS_NAME),
               **hub_kwargs: Any) -> Path:
    """A local folder as it is, or the local snapshot folder of a Hub repo holding ``filenames``
    (downloaded to, or found in, the Hugging Face cache; ``hub_kwargs`` go to ``hf_hub_download``)."""
    path = Path(name)
    if path.is_dir() or not looks_like_hub_id(str(name)):
        return path
    import huggingface_hub

    try:
        files = [huggingface_hub.hf_hub_download(str(name), f, **hub_kwargs) for f in filenames]
    except Exception as exc:  # noqa: BLE001 - offline, missing repo or file, auth: one user-facing message
        raise CheckpointError(f"cannot get '{name}' from the Hugging Face Hub: {type(exc).__name__}") from None
    return Path(files[0]).parent


MODEL_CARD = """---
{{ card_data }}
---

A `{{ model_type }}` of flowtok (FlowTok: flow matching between text tokens and compact 1D image tokens),
saved as `config.json` + `model.safetensors`. Load it with

```python
from {{ module }} import {{ class_name }}

model = {{ class_name }}.from_pretrained("<this folder or Hub id>")
```
"""


class PretrainedMixin(PyTorchModelHubMixin, library_name="flowtok", tags=["flowtok"], model_card_template=MODEL_CARD):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for an ``nn.Module`` with a dataclass ``config``.

    The Hub mixin supplies the Hub side (ids, the cache, ``push_to_hub``, a model card); the two hooks
    below write and read the files themselves, so that writes are atomic and loads are checked.
    """

    config_class: ClassVar[type]
    model_type: ClassVar[str]
    config: Any
    _save_dtype: torch.dtype | None = None

    # Narrower than the Hub mixin's on purpose: it takes a dtype and returns the folder it wrote.
    def save_pretrained(self, save_directory: str | os.PathLike, dtype: torch.dtype | None = None,  # type: ignore[override]
                        **hub_kwargs: Any) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (floating weights in ``dtype`` if given) and a model
        card; ``push_to_hub=True, repo_id=...`` uploads the folder too (see ``huggingface_hub``)."""
        from .nn.fp8 import FP8Linear

        if any(isinstance(m, FP8Linear) for m in self.modules()):  # type: ignore[attr-defined]
            raise InvalidInputError(f"this {self.model_type} is FP8-quantised for inference; save it before "
                                    "quantize_fp8() (its full-precision weights are gone)")
        directory = Path(save_directory)
        _make_folder(directory)
        self._save_dtype = dtype
        try:
            super().save_pretrained(directory, **hub_kwargs)
        finally:
            self._save_dtype = None
        return directory

    def _save_pretrained(self, save_directory: Path) -> None:
        state = self.state_dict()  # type: ignore[attr-defined]
        if self._save_dtype is not None:
            state = {k: (v.to(self._save_dtype) if v.is_floating_point() else v) for k, v in state.items()}
        atomic_save_safetensors(state, save_directory / WEIGHTS_NAME,
                                metadata={"model_type": self.model_type, **saved_config(self.config)})
        cfg = {"model_type": self.model_type, **to_dict(self.config)}
        atomic_write_text(save_directory / CONFIG_NAME, json.dumps(cfg, indent=2) + "\n")

    def generate_model_card(self, *args: Any, **kwargs: Any) -> Any:
        module = type(self).__module__.rsplit(".", 1)[0]  # the package that exports the class
        return super().generate_model_card(*args, model_type=self.model_type, class_name=type(self).__name__,
                                           module=module, **kwargs)

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
    def from_pretrained(cls: type[M], pretrained_model_name_or_path: str | os.PathLike,  # type: ignore[override]
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
                        force_download: bool = False, token: str | bool | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        revision: str | None = None) -> M:
        """A model from a ``save_pretrained`` folder or a Hub id (``owner/name``, through the local cache),
        on ``device``, in ``dtype`` (default float32), in eval mode."""
        directory = hub_folder(pretrained_model_name_or_path, force_download=force_download, token=token,
                               cache_dir=cache_dir, local_files_only=local_files_only, revision=revision)
        # Before the Hub mixin parses config.json and before anything is allocated: a bad folder is one line.
        preflight(cls, cls.read_config(directory), directory, WEIGHTS_NAME)
        return super().from_pretrained(directory, device=device, dtype=dtype)

    @classmethod
    def _from_pretrained(cls: type[M], *, model_id: str, device: str | torch.device = "cpu",
                         dtype: torch.dtype | None = None, **_hub: Any) -> M:
        # model_id is the local folder from_pretrained resolved; the mixin's own parse of config.json
        # (in _hub["config"]) is unchecked, so the folder is read again with the checks.
        directory = Path(model_id)
        config = cls.read_config(directory)
        model = cls(config)
        state = load_safetensors(directory / WEIGHTS_NAME)
        check_state_dict(model, state, str(directory))  # type: ignore[arg-type]
        model.load_state_dict(state)  # type: ignore[attr-defined]
        model = model.to(device=device)  # type: ignore[attr-defined]
        model = model.to(dtype=dtype) if dtype is not None else model.float()
        model.eval()
        return model

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameters as the checkpoint holds them (inference-only padding not counted)."""
        from .nn import count_parameters

        return count_parameters(self, trainable_only)  # type: ignore[arg-type]
