"""Pruning methods: one folder each. Importing a folder registers its method (one line per method here)."""

from .manual import PlanConfig

__all__ = ["PlanConfig"]
