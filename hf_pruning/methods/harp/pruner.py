"""Orchestration of HARP: choose the layers, find (or take) their alphas, emit the plan, optionally add FLAP.

Per chosen layer the plan holds ``value_only_attention`` (Q/K deleted, the repeat folded into the output
projection: a rank <= n_kv*head_dim pair of linears, no KV cache) and ``scale_output`` with alpha (folded into
that projection; on Gemma2 into the post-attention norm's gain), or ``drop_attention`` when alpha is 0 (the
sublayer and its norms go, so no V/O work is left).
"""

from __future__ import annotations

import logging

from ...plan import DropAttention, PruningPlan, ScaleOutput, ValueOnlyAttention
from ...registry import PruningResult, register_method
from ...remote.hf_pruning_surgery import adapter_for, inspect_model
from .config import PRESETS, HARPConfig
from .search import AlphaSearch, replacement_layer

logger = logging.getLogger(__name__)


def harp_layers(model, config: HARPConfig) -> tuple[list[int], list[float] | None]:
    """The chosen layers (ascending) and their alphas when given (ascending layer order), validated."""
    states = inspect_model(model)
    n = len(states)
    alphas = config.alphas
    if config.preset is not None:
        preset = PRESETS[config.preset]
        if preset["layers"] != n:
            raise ValueError(f"HARP preset {config.preset!r} was found for a {preset['layers']}-layer model; this "
                             f"model has {n} decoder layers: pass alphas, or leave them out to search them")
        alphas = list(reversed(preset["alphas"]))  # published last layer first
        layers = list(range(n - len(alphas), n))
    elif config.num_layers is not None:
        if config.num_layers >= n:
            raise ValueError(f"num_layers={config.num_layers} but the model has {n} decoder layers; HARP prunes the "
                             f"top layers only: choose at most {n - 1}")
        layers = list(range(n - config.num_layers, n))
    else:
        bad = [i for i in config.layers if i >= n]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {n} decoder layers (0..{n - 1})")
        if len(config.layers) >= n:
            raise ValueError(f"HARP on all {n} layers leaves no attention at all; keep at least one layer")
        layers = list(config.layers)
    done = [i for i in layers if states[i].attention != "full"]
    if done:
        raise ValueError(f"layer(s) {done} have no full attention left (already value-only or dropped by an "
                         "earlier pruning); choose other layers or start from the unpruned model")
    return layers, alphas


def harp_plan(layers: list[int], alphas: list[float]) -> PruningPlan:
    """The HARP ops for ``layers`` with ``alphas`` (same order)."""
    ops = []
    for layer, alpha in zip(layers, alphas):
        if alpha == 0:
            ops.append(DropAttention(layer=layer))
            continue
        ops.append(ValueOnlyAttention(layer=layer))
        if alpha != 1:
            ops.append(ScaleOutput(layer=layer, sublayer="attention", alpha=float(alpha)))
    return PruningPlan(ops=ops)


def _flap_channels(model, config: HARPConfig, layers: list[int], plan: PruningPlan) -> int:
    """How many MLP channels the FLAP step removes."""
    from ...accounting import accounting, part_params
    from ..flap.pruner import channel_params, mlp_channels

    if config.flap_ratio is not None:
        return round(config.flap_ratio * mlp_channels(model))
    # flap_match: total = (N/L) of all attention parameters, what uniform head pruning at the same KV-cache
    # reduction removes; the HARP ops already remove Q/K (and V/O where alpha = 0)
    states = inspect_model(model)
    target = (part_params(states, "qk") + part_params(states, "vo")) * len(layers) / len(states)
    harp = accounting(model, plan)["removed_by_part"]
    fill = target - harp["qk"] - harp["vo"]
    return max(0, round(fill / channel_params(model)))


@register_method("harp", HARPConfig)
def run_harp(model, config: HARPConfig, calibration) -> PruningResult:
    from ...accounting import accounting
    from ..flap.pruner import flap_ops

    layers, alphas = harp_layers(model, config)
    adapter = adapter_for(model)
    report: dict = {"layers": layers}
    replacements = None
    if alphas is None:
        search = AlphaSearch(model, calibration, layers, config.grid, config.search)
        found, report["alpha_trace"], replacements = search.run()
        alphas = [found[i] for i in layers]
        report["search"] = search.cost()
    report["alphas"] = alphas
    plan = harp_plan(layers, alphas)
    if config.flap_ratio is not None or config.flap_match:
        remove = _flap_channels(model, config, layers, plan)
        if remove:
            if replacements is None:
                decoder = adapter.decoder_layers(model)
                replacements = {i: replacement_layer(adapter, decoder[i], a) for i, a in zip(layers, alphas)}
            ops, report["flap"] = flap_ops(model, calibration, remove, config.flap_metric, True, replacements)
            plan.ops.extend(ops)
        else:
            logger.info("HARP: the HARP ops already reach the matched budget; no FLAP channels removed")
            report["flap"] = {"channels_removed": 0}
    report["accounting"] = accounting(model, plan)
    record = {**config.to_dict(), "num_layers": None, "preset": None, "layers": layers, "alphas": alphas}
    return PruningResult(plan=plan, report=report, record=record)
