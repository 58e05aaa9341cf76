"""Regional ``torch.compile``: the repeated block of a stack compiled in place, one graph shared by all.

Compiling the repeated block rather than the whole model costs one block's compile time whatever the depth
and keeps the Python loop, gradient checkpointing and the state-dict names as they are. The flow's blocks
(``FlowTransformer.compile_blocks``), a text tower's layers (``TextEncoder.compile_layers``) and the image
decoder's blocks (:mod:`flowtok.fast`) are compiled through here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


def compile_regions(modules: Iterable[nn.Module], **options: Any) -> None:
    """Compile every module in place (:meth:`torch.nn.Module.compile`, ``dynamic=False`` unless ``options``
    say otherwise: one graph per input shape, the fastest kernels for the fixed shapes of sampling)."""
    for module in modules:
        module.compile(**{"dynamic": False, **options})


def uncompile_regions(modules: Iterable[nn.Module]) -> None:
    """Undo :func:`compile_regions`: the eager forward is back."""
    for module in modules:
        module._compiled_call_impl = None  # what Module.compile set
