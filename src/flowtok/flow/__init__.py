"""The velocity transformer with its size registry, and the flow-matching objective."""

from .objective import FlowObjective, FlowObjectiveConfig, binned_losses
from .transformer import FLOW_PRESETS, UPSTREAM_RENAMES, FlowConfig, FlowTransformer, flop_count

__all__ = [
    "FLOW_PRESETS",
    "UPSTREAM_RENAMES",
    "FlowConfig",
    "FlowObjective",
    "FlowObjectiveConfig",
    "FlowTransformer",
    "binned_losses",
    "flop_count",
]
