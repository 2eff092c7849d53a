"""Orchestration of SparseGPT: one forward per layer accumulates each linear's input Hessian X^T X."""

from __future__ import annotations

import torch

from ...registry import PruningResult, register_method
from ..layerwise import check_widths, collect_input_stats, prunable_linears, sequential, sparsity_report
from .config import SparseGPTConfig
from .scoring import sparsegpt_solve_


def _new_stat(lin):
    return {"h": torch.zeros(lin.in_features, lin.in_features, dtype=torch.float32, device=lin.weight.device), "n": 0}


def _update(stat, x):  # x: [tokens, in]
    n = x.shape[0]
    total = stat["n"] + n
    stat["h"].mul_(stat["n"] / total).add_(x.T @ x, alpha=2.0 / total)  # running 2/N * sum x x^T
    stat["n"] = total


def sparsegpt_prune_layer_(layer, inputs, kwargs, config) -> dict:
    stats = collect_input_stats(layer, inputs, kwargs, _new_stat, _update)
    for name, lin in prunable_linears(layer).items():
        sparsegpt_solve_(lin.weight.data, stats[name]["h"], config.sparsity, config.nm, config.blocksize,
                         config.percdamp)
        del stats[name]
    return {}


@register_method("sparsegpt", SparseGPTConfig)
def run_sparsegpt(model, config: SparseGPTConfig, calibration) -> PruningResult:
    check_widths(model, config.nm)
    sequential(model, calibration, lambda i, layer, inps, kw: sparsegpt_prune_layer_(layer, inps, kw, config),
               "sparsegpt")
    return PruningResult(report={"sparsity": sparsity_report(model)})
