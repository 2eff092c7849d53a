"""Orchestration of the ``plan`` method."""

from __future__ import annotations

from ...registry import PruningResult, register_method
from .config import PlanConfig


@register_method("plan", PlanConfig, needs_calibration=False)
def run_plan(model, config: PlanConfig, calibration=None) -> PruningResult:
    """Return the configured plan; tensors attached to its ops (if given as a PruningPlan) are kept."""
    return PruningResult(plan=config._parsed, report={"ops": len(config._parsed.ops)})
