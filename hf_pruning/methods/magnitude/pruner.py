"""Orchestration of magnitude pruning (no calibration data: each matrix on its own)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ...accounting import prunable_linears, sparsity_report
from ...engine import onloaded, write_param
from ...registry import PruningResult, register_method
from ...remote.hf_pruning_surgery import adapter_for
from ..masks.layerwise import check_widths
from ..masks.selection import select_mask
from .config import MagnitudeConfig


@torch.no_grad()
def magnitude_prune_layer_(layer, config) -> None:
    """Zero the lowest |W| of each linear of ``layer`` (already-zero weights count first), each edit through
    ``write_param``; an offloaded layer is onloaded once for it."""
    with onloaded(layer):
        for lin in prunable_linears(layer).values():
            w = lin.weight
            mask = select_mask(w.abs(), config.sparsity, config.nm, per_row=False, already_zero=w == 0)
            write_param(lin, "weight", w.masked_fill(mask, 0))


@register_method("magnitude", MagnitudeConfig, needs_calibration=False)
@torch.no_grad()
def run_magnitude(model, config: MagnitudeConfig, calibration=None) -> PruningResult:
    check_widths(model, config.nm)
    for layer in tqdm(adapter_for(model).decoder_layers(model), desc="magnitude", unit="layer"):
        magnitude_prune_layer_(layer, config)
    return PruningResult(report={"sparsity": sparsity_report(model)})
