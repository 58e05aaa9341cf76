"""flowtok: FlowTok text-to-image and image-to-text by flow matching between 1D token latents."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["FlowTokPipeline", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import flowtok` (and the CLI's --help) does not pay for torch and transformers.
    if name == "FlowTokPipeline":
        try:
            from .pipelines import FlowTokPipeline
        except ModuleNotFoundError as exc:  # `pip install flowtok[onnx]` alone: the runtime, not the pipeline
            from .errors import missing_dependency

            message = missing_dependency(exc, "FlowTokPipeline")
            if message is None:
                raise
            raise ModuleNotFoundError(f"{message}; the torch-free runtime is flowtok.export.runtime",
                                      name=exc.name) from None
        return FlowTokPipeline
    raise AttributeError(f"module 'flowtok' has no attribute {name!r}")
