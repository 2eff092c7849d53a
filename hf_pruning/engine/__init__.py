"""The sequential, offload-aware engine under every calibration method.

Layer at a time, batch at a time: activations in an :class:`ActivationStore` (CPU or disk), each decoder layer
onloaded once per stage (:func:`onloaded`, accelerate's offload hooks kept in place), layers captured and
skipped through stand-in entries (:func:`substituted`), never by assigning ``forward``; every weight edit
through :func:`write_param`.
"""

from . import distributed
from .capture import (
    LAYER_BATCH,
    Standin,
    StopForward,
    capture,
    capture_layer_inputs,
    head_forward,
    layer_kwargs,
    pass_through,
    run_layer,
    substituted,
)
from .checkpoint import CheckpointMismatchError, resumable
from .context import calibration_mode, hooks
from .offload import execution_device, is_offloaded, offload_hook, onload_bound, onloaded, write_param
from .sequential import propagate, sequential
from .store import ActivationStore, activations_on_disk, spill_reserve

__all__ = [
    "LAYER_BATCH", "ActivationStore", "CheckpointMismatchError", "Standin", "StopForward", "activations_on_disk",
    "calibration_mode", "capture", "capture_layer_inputs", "distributed", "execution_device", "head_forward", "hooks", "is_offloaded", "layer_kwargs", "onload_bound",
    "offload_hook", "onloaded", "pass_through", "propagate", "resumable", "run_layer", "sequential", "spill_reserve", "substituted",
    "write_param",
]
