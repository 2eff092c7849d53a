"""Orchestration of SparseGPT: each linear's input Hessian X^T X accumulated batch by batch, group by group."""

from __future__ import annotations

import logging

import torch

from ...accounting import prunable_linears, sparsity_report
from ...engine import distributed
from ...registry import PruningResult, register_method
from ...remote.hf_pruning_surgery import adapter_for
from ..masks.layerwise import (
    check_widths,
    collect_input_stats,
    prune_staged,
    sequential,
)
from .config import SparseGPTConfig
from .scoring import block_mask, inverse_hessian_factor, sparsegpt_solve_
from .shared_factor import shared_inverse_hessian_factor

logger = logging.getLogger(__name__)


def new_hessian(lin):
    return {"h": torch.zeros(lin.in_features, lin.in_features, dtype=torch.float32, device=lin.weight.device), "n": 0}


def add_to_hessian(stat, x):  # x: [tokens, in], float32
    n = x.shape[0]
    total = stat["n"] + n
    stat["h"].mul_(stat["n"] / total).add_(x.T @ x, alpha=2.0 / total)  # running 2/N * sum x x^T
    stat["n"] = total


def new_rank_hessian(lin):
    """Under a process group: sum x x^T per batch (float32), kept in float64 and summed over the ranks."""
    return distributed.RankSum((lin.in_features, lin.in_features), lin.weight.device)


def add_to_rank_hessian(stat, x):  # x: [tokens, in], float32
    stat.add(x.T @ x, x.shape[0])


def hessian_of(stat, pop: bool = False) -> torch.Tensor:
    """The Hessian 2/N sum x x^T ``[in, in]`` of a statistic of either kind: the running one in float32 (``pop``:
    it lets go of it), the per-rank one in float64."""
    if isinstance(stat, dict):
        return stat.pop("h") if pop else stat["h"]
    total, n = stat.reduced("the SparseGPT Hessian")
    return total.mul_(2.0 / n)  # float64: the factorisation copies it into float64 anyway


def _solved_rows(lin, rows: slice, config, factor: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of ``lin``'s weight after :func:`sparsegpt_solve_` with the inverse-Hessian ``factor`` and
    the ``dead`` inputs (rows only mix in the unstructured choice of each block, which is then made over every
    rank's rows: :func:`_shared_block_mask`)."""
    w = lin.weight[rows].detach().to(lin.weight.dtype, copy=True)  # [r, in]
    whole = w.shape[0] == lin.weight.shape[0]
    sparsegpt_solve_(w, None, config.sparsity, config.nm, config.blocksize, config.percdamp, factor=factor,
                     dead=dead, select_block=None if whole else _shared_block_mask(lin.weight.shape[0], rows))
    return w


def _shared_block_mask(rows_total: int, mine: slice):
    """A ``select_block`` that chooses over the whole block, every rank's rows gathered, and keeps ``mine``."""
    def select(score, already_zero, sparsity):
        full = block_mask(distributed.gather_rows(score, rows_total, "block scores"),
                          distributed.gather_rows(already_zero, rows_total, "block zeros"), sparsity)
        return full[mine]

    return select


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
            hessian = hessian_of(stat, pop=True)  # [in, in] float32, freed before the sweeps: they need its factor
            dead = torch.diag(hessian) == 0  # [in]
            factor = hessian_factor(hessian, config.percdamp)
            del hessian
            # each rank solves its share of every linear's rows (all of them without a process group)
            distributed.split_rows_(linears, lambda name, lin, rows: _solved_rows(lin, rows, config, factor, dead))

        return {}, prune_staged(layer, inputs, kwargs, *hessian_statistic(), prune_group, outputs=outputs,
                                plans=plans, block_outputs=block_outputs)
    stats = collect_input_stats(layer, inputs, kwargs, *hessian_statistic())
    found: dict = {}  # linears that read one input share one statistic: reduced and factored once
    for stat in stats.values():
        if id(stat) not in found:
            hessian = hessian_of(stat)
            found[id(stat)] = (hessian_factor(hessian, config.percdamp), torch.diag(hessian) == 0)
    distributed.split_rows_(prunable_linears(layer), lambda name, lin, rows: _solved_rows(
        lin, rows, config, *found[id(stats[name])]))
    return {}


def hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The inverse-Hessian factor ``[in, in]`` float64: under a process group computed by every rank together
    (:mod:`.shared_factor`), else here alone (:func:`inverse_hessian_factor`)."""
    if distributed.active():
        return shared_inverse_hessian_factor(hessian, percdamp)
    return inverse_hessian_factor(hessian, percdamp)


def hessian_statistic():
    """``(new, update)`` of the Hessian statistic: running float32, or per rank in float64 (summed over the ranks
    by :func:`hessian_of`) under a process group."""
    return (new_rank_hessian, add_to_rank_hessian) if distributed.active() else (new_hessian, add_to_hessian)


def warn_if_few_tokens(model, calibration: torch.Tensor, config) -> None:
    """Log a warning when the calibration has fewer tokens than the widest linear has inputs: that Hessian is then
    singular and only the damping keeps the solve from fitting the few tokens seen (the paper calibrates on
    128 x 2048 tokens; on Qwen2.5 with 8 x 256 tokens SparseGPT came out worse than Wanda)."""
    tokens = calibration.numel() * distributed.world()[1]
    layers = adapter_for(model).decoder_layers(model)
    widest = max(lin.in_features for layer in layers for lin in prunable_linears(layer).values())
    if tokens < widest:
        logger.warning("SparseGPT: %d calibration tokens for inputs up to %d wide: the Hessians are singular and the "
                       "solve leans on percdamp=%g; give at least %d tokens (more rows or longer ones) or raise "
                       "percdamp", tokens, widest, config.percdamp, widest)


@register_method("sparsegpt", SparseGPTConfig)
def run_sparsegpt(model, config: SparseGPTConfig, calibration) -> PruningResult:
    check_widths(model, config.nm)
    warn_if_few_tokens(model, calibration, config)
    plans: dict = {}  # how a layer's forward reaches its linears, found once per layer structure
    sequential(model, calibration,
               lambda i, layer, inps, kw: sparsegpt_prune_layer_(layer, inps, kw, config, plans=plans), "sparsegpt")
    return PruningResult(report={"sparsity": sparsity_report(model)})
