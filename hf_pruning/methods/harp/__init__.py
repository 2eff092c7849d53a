"""HARP: value-only attention (Q/K removed) in the top layers, a searched residual scale per layer, and
optionally FLAP on the MLP channels."""

from .config import PRESETS, HARPConfig
from .pruner import harp_plan, run_harp
from .search import AlphaSearch, replacement_layer

__all__ = ["PRESETS", "AlphaSearch", "HARPConfig", "harp_plan", "replacement_layer", "run_harp"]
