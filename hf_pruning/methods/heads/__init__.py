"""Uniform attention-head pruning (the width baselines HARP is compared with): the same number of query heads
or whole KV groups removed in every layer, ranked by weight magnitude or by a Wanda-style activation score."""

from .config import HeadsConfig
from .pruner import head_scores, run_heads

__all__ = ["HeadsConfig", "head_scores", "run_heads"]
