"""Orchestration of Wanda: input norms accumulated batch by batch, group by group, then every linear is masked."""

from __future__ import annotations

import torch

from ...accounting import prunable_linears, sparsity_report
from ...engine import distributed
from ...registry import PruningResult, register_method
from ..masks.layerwise import (
    check_widths,
    collect_input_stats,
    prune_staged,
    sequential,
)
from ..masks.selection import select_mask
from ..masks.summation import StreamedColumnSum
from .config import WandaConfig


def _new_stat(lin):
    return torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device)  # sum of x_j^2


def _update(stat, x):  # x: [tokens, in], float32
    stat += x.pow(2).sum(0)


@torch.no_grad()
def _masked_rows(lin, rows: slice, sum_sq: torch.Tensor, config) -> torch.Tensor:
    """``lin``'s weight rows ``rows`` with their lowest |W| * ||X_j||_2 zeroed (rows are independent);
    ``sum_sq`` ``[in]`` = sum of x_j^2 over tokens."""
    w = lin.weight[rows]  # [r, in]
    score = w.abs().float() * sum_sq.to(w.device).sqrt()[None, :]  # [r, in]
    mask = select_mask(score, config.sparsity, config.nm, per_row=True, already_zero=w == 0)
    return w.masked_fill(mask, 0)


def _mask_(linears: dict, sums: dict, config) -> None:
    """Mask every linear (name -> module) on its ``sums[name]``; under a process group each rank selects its
    share of every linear's rows (the selection is most of Wanda's time) and the rows are gathered."""
    distributed.split_rows_(linears, lambda name, lin, rows: _masked_rows(lin, rows, sums[name], config))


def wanda_prune_layer_(layer, inputs, kwargs, config, outputs: bool = True, plans: dict | None = None,
                       block_outputs: dict | None = None):
    """Mask every linear of ``layer`` by |W| * ||X_j||_2 (per output row), in place; ``inputs`` is an
    :class:`~hf_pruning.engine.ActivationStore` of batches ``[b, T, d]``.

    ``config.one_pass``: staged (:func:`~hf_pruning.methods.masks.layerwise.prune_staged`), returns
    ``({}, outputs)`` (``outputs``: the pruned layer's outputs, or None when ``outputs=False``; ``plans`` and
    ``block_outputs`` go to ``prune_staged``); otherwise statistics from the unpruned layer first (returns
    ``{}``; the caller runs the pruned layer)."""
    if distributed.active():  # data parallel: per-batch sums in float64, added over the ranks
        def new_stat(lin):
            return distributed.RankSum(lin.in_features, lin.weight.device)

        def update(stat, x):  # x: [tokens, in] float32
            stat.add(x.pow(2).sum(0))

        def total(stat):
            return stat.reduced("Wanda's input norms")[0].float()
    else:
        tokens = inputs.rows() * inputs[0].shape[1]  # every calibration token, over all batches

        def new_stat(lin):  # the all-rows sum of squares, bit for bit (summation.py)
            return StreamedColumnSum(tokens, lin.in_features, lin.weight.device)

        def update(stat, x):
            stat.add(x.pow(2))

        def total(stat):
            return stat.total()

    if config.one_pass:
        def prune_group(linears, stat):
            sum_sq = total(stat)
            _mask_(linears, dict.fromkeys(linears, sum_sq), config)

        return {}, prune_staged(layer, inputs, kwargs, new_stat, update, prune_group,
                                outputs=outputs, plans=plans, block_outputs=block_outputs)
    if distributed.active():
        stats = collect_input_stats(layer, inputs, kwargs, new_stat, update)
        stats = {name: total(stat) for name, stat in stats.items()}
    else:
        stats = collect_input_stats(layer, inputs, kwargs, _new_stat, _update)
    _mask_(prunable_linears(layer), stats, config)
    return {}


@register_method("wanda", WandaConfig)
def run_wanda(model, config: WandaConfig, calibration) -> PruningResult:
    check_widths(model, config.nm)
    plans: dict = {}  # how a layer's forward reaches its linears, found once per layer structure
    sequential(model, calibration, lambda i, layer, inps, kw: wanda_prune_layer_(layer, inps, kw, config, plans=plans),
               "wanda")
    return PruningResult(report={"sparsity": sparsity_report(model)})
