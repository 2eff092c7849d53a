"""SLEB-style greedy block removal: remove the block whose absence gives the lowest calibration perplexity."""

from .config import SLEBConfig
from .pruner import run_sleb

__all__ = ["SLEBConfig", "run_sleb"]
