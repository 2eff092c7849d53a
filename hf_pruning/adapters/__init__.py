"""Architecture adapters.

They live in ``hf_pruning/remote/hf_pruning_adapters.py`` because a saved model's
remote code must replay the same surgery without hf_pruning installed; this package re-exports them.
"""

from ..remote.hf_pruning_adapters import DecoderAdapter
from ..remote.hf_pruning_state import LayerState
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
