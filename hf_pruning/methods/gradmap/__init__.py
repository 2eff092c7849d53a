"""GradMAP: gradient-ranked layer pruning with a fused projection compensation."""

from .config import GradMAPConfig
from .pruner import rank_blocks, run_gradmap
from .scoring import gradient_scores

__all__ = ["GradMAPConfig", "gradient_scores", "rank_blocks", "run_gradmap"]
