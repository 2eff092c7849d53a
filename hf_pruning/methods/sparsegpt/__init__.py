"""SparseGPT: an OBS-style mask with a weight update that compensates each pruned weight."""

from .config import SparseGPTConfig
from .pruner import run_sparsegpt, sparsegpt_prune_layer_

__all__ = ["SparseGPTConfig", "run_sparsegpt", "sparsegpt_prune_layer_"]
