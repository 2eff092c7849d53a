"""Orchestration of SparseGPT: each linear's input Hessian X^T X accumulated batch by batch, group by group."""

from __future__ import annotations

import torch

from ...accounting import prunable_linears, sparsity_report
from ...engine import write_param
from ...registry import PruningResult, register_method
from ..masks.layerwise import (
    check_widths,
    collect_input_stats,
    prune_staged,
    sequential,
)
from .config import SparseGPTConfig
from .scoring import inverse_hessian_factor, sparsegpt_solve_


def new_hessian(lin):
    return {"h": torch.zeros(lin.in_features, lin.in_features, dtype=torch.float32, device=lin.weight.device), "n": 0}


def add_to_hessian(stat, x):  # x: [tokens, in], float32
    n = x.shape[0]
    total = stat["n"] + n
    stat["h"].mul_(stat["n"] / total).add_(x.T @ x, alpha=2.0 / total)  # running 2/N * sum x x^T
    stat["n"] = total


@torch.no_grad()
def solve_linear_(lin, hessian: torch.Tensor, sparsity: float, nm, blocksize: int, percdamp: float,
                  fixed_mask: torch.Tensor | None = None, factor: torch.Tensor | None = None,
                  start: torch.Tensor | None = None, dead: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`sparsegpt_solve_` on ``lin``'s weight (or on ``start``, values ``[out, in]`` to begin from),
    written back through ``write_param``; returns the pruned mask. ``hessian`` may be None when ``factor`` and
    ``dead`` are given."""
    w = (lin.weight if start is None else start).detach().to(lin.weight.dtype, copy=True)
    hessian = None if hessian is None else hessian.to(w.device)
    mask = sparsegpt_solve_(w, hessian, sparsity, nm, blocksize, percdamp, fixed_mask=fixed_mask, factor=factor,
                            dead=dead)
    write_param(lin, "weight", w)
    return mask


def _solve_(lin, hessian: torch.Tensor | None, config, factor: torch.Tensor | None = None,
            dead: torch.Tensor | None = None) -> None:
    solve_linear_(lin, hessian, config.sparsity, config.nm, config.blocksize, config.percdamp, factor=factor,
                  dead=dead)


def sparsegpt_prune_layer_(layer, inputs, kwargs, config, outputs: bool = True, plans: dict | None = None,
                           block_outputs: dict | None = None):
    """Prune every linear of ``layer`` with SparseGPT, in place; ``inputs`` is an
    :class:`~hf_pruning.engine.ActivationStore` of batches ``[b, T, d]``.

    ``config.one_pass``: staged (:func:`~hf_pruning.methods.masks.layerwise.prune_staged`; q/k/v read the
    same input: they share one Hessian and its factorisation), returns ``({}, outputs)`` (None with
    ``outputs=False``; ``plans`` and ``block_outputs`` go to ``prune_staged``); otherwise Hessians from the
    unpruned layer first (returns ``{}``)."""
    if config.one_pass:
        def prune_group(linears, stat):
            hessian = stat.pop("h")  # [in, in] float32, freed before the sweeps: they need its factor only
            dead = torch.diag(hessian) == 0  # [in]
            factor = inverse_hessian_factor(hessian, config.percdamp)
            del hessian
            for lin in linears.values():
                _solve_(lin, None, config, factor, dead)

        return {}, prune_staged(layer, inputs, kwargs, new_hessian, add_to_hessian, prune_group, outputs=outputs,
                                plans=plans, block_outputs=block_outputs)
    stats = collect_input_stats(layer, inputs, kwargs, new_hessian, add_to_hessian)
    for name, lin in prunable_linears(layer).items():
        _solve_(lin, stats.pop(name)["h"], config)
    return {}


@register_method("sparsegpt", SparseGPTConfig)
def run_sparsegpt(model, config: SparseGPTConfig, calibration) -> PruningResult:
    check_widths(model, config.nm)
    plans: dict = {}  # how a layer's forward reaches its linears, found once per layer structure
    sequential(model, calibration,
               lambda i, layer, inps, kw: sparsegpt_prune_layer_(layer, inps, kw, config, plans=plans), "sparsegpt")
    return PruningResult(report={"sparsity": sparsity_report(model)})
