"""Calibration data: seeded token batches from text, and the embedded default text."""

from .data import NotEnoughTextError, build_calibration, default_text, evaluation_windows, tokenize_text

__all__ = ["NotEnoughTextError", "build_calibration", "default_text", "evaluation_windows", "tokenize_text"]
