"""Wanda: zero the weights with the smallest |W_ij| * ||X_j|| in each output row (or N:M group)."""

from .config import WandaConfig
from .pruner import run_wanda, wanda_prune_layer_

__all__ = ["WandaConfig", "run_wanda", "wanda_prune_layer_"]
