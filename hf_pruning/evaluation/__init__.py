"""Evaluation: perplexity, zero-shot accuracy (JSONL multiple choice, lm-eval tasks), speed and size, pruning cost."""

from .choices import choice_loglikelihoods, load_items, score_items
from .cost import PeakRSS, forward_seconds, measure_pruning, model_bytes_fp32
from .perplexity import perplexity
from .speed import compare_speed, kv_cache_bytes, measure_speed
from .zero_shot import LOCAL_METRIC, LOCAL_TASKS, zero_shot, zero_shot_details

__all__ = [
    "LOCAL_METRIC",
    "LOCAL_TASKS",
    "PeakRSS",
    "choice_loglikelihoods",
    "compare_speed",
    "forward_seconds",
    "kv_cache_bytes",
    "load_items",
    "measure_pruning",
    "measure_speed",
    "model_bytes_fp32",
    "perplexity",
    "score_items",
    "zero_shot",
    "zero_shot_details",
]
