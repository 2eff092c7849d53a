"""The ``plan`` method: apply a hand-written pruning plan (no calibration data needed)."""

from .config import PlanConfig
from .pruner import run_plan

__all__ = ["PlanConfig", "run_plan"]
