"""Calibration data: seeded token batches from text, and the embedded default text."""

from .data import (
    HUB_DATASETS,
    NotEnoughTextError,
    build_calibration,
    default_text,
    evaluation_windows,
    load_text,
    tokenize_text,
)

__all__ = ["HUB_DATASETS", "load_text", "NotEnoughTextError", "build_calibration", "default_text", "evaluation_windows", "tokenize_text"]
