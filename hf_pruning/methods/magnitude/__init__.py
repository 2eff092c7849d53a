"""Magnitude pruning: zero the smallest |W| of each matrix (unstructured) or of each N:M group."""

from .config import MagnitudeConfig
from .pruner import run_magnitude

__all__ = ["MagnitudeConfig", "run_magnitude"]
