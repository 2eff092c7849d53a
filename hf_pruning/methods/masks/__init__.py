"""The mask family: what magnitude, Wanda, SparseGPT and LLM-Barber share.

- ``config.py``: :class:`SparsityConfig` (``sparsity`` and ``pattern``), the base of their configs;
- ``selection.py``: the mask math (exact counts by stable sorting, N:M groups, LLM-Barber's swap);
- ``layerwise.py``: the layer-by-layer runner on the engine (each layer sees the already-pruned layers'
  outputs), the staged in-layer schedule (:func:`prune_staged`, one layer forward's work per layer) and the
  hooks that collect a linear's inputs;
- ``replay.py``: stand-ins that replay a finished block from its recorded outputs, or from its output
  linear's recorded inputs (the staged schedule, LLM-Barber).

``sparsity_report`` and ``prunable_linears`` live in ``hf_pruning.accounting``.

A mask method's folder holds its config (a ``SparsityConfig`` subclass), its scoring and its run function.
"""

from ...accounting import prunable_linears, sparsity_report
from .config import ONE_PASS_HELP, SparsityConfig
from .layerwise import (
    LAYER_BATCH,
    check_widths,
    collect_input_stats,
    input_groups,
    input_stat_hooks,
    layer_plan,
    prune_staged,
    sequential,
)
from .selection import GRANULARITIES, NM_RULES, parse_pattern, rebuild_masks, select_mask

__all__ = ["GRANULARITIES", "LAYER_BATCH", "NM_RULES", "ONE_PASS_HELP", "SparsityConfig", "check_widths",
           "collect_input_stats", "input_groups", "input_stat_hooks", "layer_plan", "parse_pattern", "prunable_linears", "prune_staged",
           "rebuild_masks", "select_mask", "sequential", "sparsity_report"]
