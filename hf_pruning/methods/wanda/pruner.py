"""Orchestration of Wanda: one forward per layer collects input norms, then every linear is masked."""

from __future__ import annotations

import torch

from ...accounting import prunable_linears, sparsity_report
from ...registry import PruningResult, register_method
from ..masks.layerwise import (
    check_widths,
    collect_input_stats,
    prune_in_flight,
    sequential,
)
from ..masks.selection import select_mask
from .config import WandaConfig


def _new_stat(lin):
    return torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device)  # sum of x_j^2


def _update(stat, x):  # x: [tokens, in]
    stat += x.pow(2).sum(0)


def _mask_(lin, sum_sq: torch.Tensor, config) -> None:
    """Zero ``lin``'s lowest |W| * ||X_j||_2 per output row; ``sum_sq`` ``[in]`` = sum of x_j^2 over tokens."""
    w = lin.weight.data
    score = w.abs().float() * sum_sq.sqrt()[None, :]  # [out, in]
    w[select_mask(score, config.sparsity, config.nm, per_row=True, already_zero=w == 0)] = 0


def wanda_prune_layer_(layer, inputs, kwargs, config):
    """Mask every linear of ``layer`` by |W| * ||X_j||_2 (per output row), in place.

    ``config.one_pass``: pruned in flight, returns ``({}, outputs)``; otherwise statistics from the unpruned
    layer first (returns ``{}``; the caller runs the pruned layer)."""
    if config.one_pass:
        outputs = prune_in_flight(layer, inputs, kwargs, lambda name, lin, x: _mask_(lin, x.pow(2).sum(0), config))
        return {}, outputs
    stats = collect_input_stats(layer, inputs, kwargs, _new_stat, _update)
    for name, lin in prunable_linears(layer).items():
        _mask_(lin, stats[name], config)
    return {}


@register_method("wanda", WandaConfig)
def run_wanda(model, config: WandaConfig, calibration) -> PruningResult:
    check_widths(model, config.nm)
    sequential(model, calibration, lambda i, layer, inps, kw: wanda_prune_layer_(layer, inps, kw, config), "wanda")
    return PruningResult(report={"sparsity": sparsity_report(model)})
