"""Calibration data (seeded token batches from text) and the machinery to run a model layer by layer."""

from ..engine import calibration_mode, capture_layer_inputs, hooks, run_layer
from .check import CalibrationError, check_calibration
from .data import (
    HUB_DATASETS,
    NotEnoughTextError,
    build_calibration,
    default_text,
    evaluation_windows,
    load_text,
    tokenize_text,
)

__all__ = [
    "CalibrationError",
    "HUB_DATASETS",
    "NotEnoughTextError",
    "build_calibration",
    "calibration_mode",
    "capture_layer_inputs",
    "check_calibration",
    "default_text",
    "evaluation_windows",
    "hooks",
    "load_text",
    "run_layer",
    "tokenize_text",
]
