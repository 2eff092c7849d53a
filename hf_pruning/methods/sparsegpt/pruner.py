"""Orchestration of SparseGPT: one forward per layer accumulates each linear's input Hessian X^T X."""

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
from .config import SparseGPTConfig
from .scoring import inverse_hessian_factor, sparsegpt_solve_


def new_hessian(lin):
    return {"h": torch.zeros(lin.in_features, lin.in_features, dtype=torch.float32, device=lin.weight.device), "n": 0}


def add_to_hessian(stat, x):  # x: [tokens, in]
    n = x.shape[0]
    total = stat["n"] + n
    stat["h"].mul_(stat["n"] / total).add_(x.T @ x, alpha=2.0 / total)  # running 2/N * sum x x^T
    stat["n"] = total


def _solve_(lin, hessian: torch.Tensor, config, factor: torch.Tensor | None = None) -> None:
    sparsegpt_solve_(lin.weight.data, hessian, config.sparsity, config.nm, config.blocksize, config.percdamp,
                     factor=factor)


def sparsegpt_prune_layer_(layer, inputs, kwargs, config):
    """Prune every linear of ``layer`` with SparseGPT, in place.

    ``config.one_pass``: solved in flight (q/k/v read the same input: they share one Hessian and its
    factorisation), returns ``({}, outputs)``; otherwise Hessians from the unpruned layer first (returns ``{}``)."""
    if config.one_pass:
        last: dict = {}

        def prune(name, lin, x):  # x: [tokens, in]
            if last.get("x") is not x:
                stat = new_hessian(lin)
                add_to_hessian(stat, x)
                last.update(x=x, h=stat["h"], u=inverse_hessian_factor(stat["h"], config.percdamp))
            _solve_(lin, last["h"], config, last["u"])

        return {}, prune_in_flight(layer, inputs, kwargs, prune)
    stats = collect_input_stats(layer, inputs, kwargs, new_hessian, add_to_hessian)
    for name, lin in prunable_linears(layer).items():
        _solve_(lin, stats.pop(name)["h"], config)
    return {}


@register_method("sparsegpt", SparseGPTConfig)
def run_sparsegpt(model, config: SparseGPTConfig, calibration) -> PruningResult:
    check_widths(model, config.nm)
    sequential(model, calibration, lambda i, layer, inps, kw: sparsegpt_prune_layer_(layer, inps, kw, config),
               "sparsegpt")
    return PruningResult(report={"sparsity": sparsity_report(model)})
