"""Evaluation: perplexity, zero-shot accuracy (lm-eval), speed and size, pruning cost."""

from .cost import PeakRSS, forward_seconds, measure_pruning, model_bytes_fp32
from .perplexity import perplexity
from .speed import compare_speed, kv_cache_bytes, measure_speed
from .zero_shot import LOCAL_TASKS, zero_shot

__all__ = [
    "LOCAL_TASKS",
    "PeakRSS",
    "compare_speed",
    "forward_seconds",
    "kv_cache_bytes",
    "measure_pruning",
    "measure_speed",
    "model_bytes_fp32",
    "perplexity",
    "zero_shot",
]
