"""Architecture adapters.

They live in ``hf_pruning/remote/`` (one ``hf_pruning_adapter_<arch>.py`` file each) because a saved model's
remote code must replay the same surgery without hf_pruning installed; this package re-exports them.
"""

from ..remote.hf_pruning_adapter_base import DecoderAdapter, LayerState
from ..remote.hf_pruning_surgery import (
    ADAPTER_CLASSES,
    ADAPTERS,
    UnsupportedArchitectureError,
    adapter_for,
    inspect_model,
)

__all__ = [
    "ADAPTERS",
    "ADAPTER_CLASSES",
    "DecoderAdapter",
    "LayerState",
    "UnsupportedArchitectureError",
    "adapter_for",
    "inspect_model",
]
