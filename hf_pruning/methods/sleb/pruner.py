"""SLEB through FinerCut's greedy engine: block candidates, perplexity as the score."""

from __future__ import annotations

from ...registry import PruningResult, register_method
from ..finercut import FinerCutConfig
from ..finercut.pruner import run_finercut
from .config import SLEBConfig


@register_method("sleb", SLEBConfig)
def run_sleb(model, config: SLEBConfig, calibration, compensation_calibration=None) -> PruningResult:
    search = FinerCutConfig(granularity="block", metric="ppl", search=config.search, param_ratio=config.param_ratio,
                            num_removals=config.num_removals, order=config.order, compensate=config.compensate,
                            ridge=config.ridge, solver=config.solver)
    result = run_finercut(model, search, calibration, compensation_calibration)
    result.record = {**config.to_dict(), "order": result.report["order"]}
    return result
