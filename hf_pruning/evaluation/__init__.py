"""Evaluation: perplexity (more in the evaluation issue: zero-shot through lm-eval, speed)."""

from .perplexity import perplexity

__all__ = ["perplexity"]
