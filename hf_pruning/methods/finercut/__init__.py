"""FinerCut: greedy removal of attention and MLP sublayers by their effect on the output distribution."""

from .config import FinerCutConfig
from .pruner import finercut_search, removal_score, run_finercut
from .search import GreedySearch, Step

__all__ = ["FinerCutConfig", "GreedySearch", "Step", "finercut_search", "removal_score", "run_finercut"]
