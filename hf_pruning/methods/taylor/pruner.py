"""The Taylor baseline through GradMAP's gradient scoring: score "taylor", ranked once."""

from __future__ import annotations

from ...registry import PruningResult, register_method
from ..depth import depth_result, removal_from_order
from ..gradmap.pruner import rank_blocks
from .config import TaylorConfig


@register_method("taylor", TaylorConfig)
def run_taylor(model, config: TaylorConfig, calibration, compensation_calibration=None) -> PruningResult:
    if config.order is not None:
        removed, report = removal_from_order(model, config, "block", 0.25), {"search": None}
    else:
        removed, report = rank_blocks(model, calibration, config, "taylor", "one_shot")
    return depth_result(model, config, removed, calibration, report, compensation_calibration)
