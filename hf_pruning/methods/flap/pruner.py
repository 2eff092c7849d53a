"""FLAP on MLP channels: statistics of the down projection's inputs from one forward, then one global cut.

For input channel ``j`` of a layer's MLP output projection (``down_proj`` / OPT's ``fc2``) with weight column
``W[:, j]``: the fluctuation ``F_j`` is the unbiased variance of the channel over all calibration tokens, and
the scores are ``wifv = F_j * ||W[:, j]||^2`` (default), ``ifv = F_j`` and ``wifn = mean_i |W_ij| * ||x_j||``
(input norm over tokens, divided by sqrt(tokens)). Each layer's scores are standardised (minus their mean,
over their standard deviation); the channels with the lowest standardised scores over all layers are removed
(one global threshold, so widths differ per layer). The removed channels' mean contribution
``W[:, removed] @ mean(x[removed])`` joins the projection's bias, so the layer's output keeps its mean.
"""

from __future__ import annotations

import logging
import time

import torch

from ...calibration.moments import Moments, input_moments
from ...engine import onloaded, substituted
from ...plan import PruningPlan, ShrinkMLP
from ...registry import PruningResult, register_method
from ...remote.hf_pruning_surgery import adapter_for, inspect_model
from .config import FLAPConfig

logger = logging.getLogger(__name__)


def mlp_outputs(model) -> dict[int, torch.nn.Linear]:
    """Layer index -> MLP output projection, for every layer that still has an MLP."""
    adapter = adapter_for(model)
    states = inspect_model(model)
    return {i: adapter.output_linear(layer, "mlp") for i, layer in enumerate(adapter.decoder_layers(model))
            if states[i].mlp == "full"}


def mlp_channels(model) -> int:
    """MLP intermediate channels over all layers that still have an MLP."""
    return sum(lin.in_features for lin in mlp_outputs(model).values())


def output_weight(lin: torch.nn.Linear) -> torch.Tensor:
    """An MLP output projection's weight ``[d, width]`` in float64 (read in from its offloaded copy if need be)."""
    with onloaded(lin):
        return lin.weight.data.double()


def channel_scores(outputs: dict[int, torch.nn.Linear], moments: dict[int, Moments], metric: str) -> dict[int, torch.Tensor]:
    """Raw FLAP score per MLP channel, per layer: ``[width]`` float64."""
    scores = {}
    for i, lin in outputs.items():
        w = output_weight(lin)  # [d, width]
        m = moments[i]
        if metric == "ifv":
            scores[i] = m.variance
        elif metric == "wifv":
            scores[i] = m.variance * w.pow(2).sum(0)
        else:  # wifn
            scores[i] = w.abs().mean(0) * (m.squares / m.count).sqrt()
    return scores


def choose_channels(scores: dict[int, torch.Tensor], remove: int) -> dict[int, list[int]]:
    """Standardise each layer's scores and remove the ``remove`` lowest over all layers; kept channels per layer.

    Raises ValueError when a layer would lose every channel (the budget is too large for one global cut).
    """
    flat, owner = [], []
    for i, s in scores.items():
        std = s.std() if s.numel() > 1 else s.new_tensor(1.0)
        flat.append((s - s.mean()) / std.clamp_min(1e-12))  # [width_i]
        owner += [(i, j) for j in range(s.numel())]
    z = torch.cat(flat)  # [all channels]
    if not 0 < remove < z.numel():
        raise ValueError(f"FLAP would remove {remove} of {z.numel()} MLP channels; choose a budget that removes "
                         "at least one channel and keeps some")
    gone = set(torch.argsort(z, stable=True)[:remove].tolist())
    keep = {i: [] for i in scores}
    for k, (i, j) in enumerate(owner):
        if k not in gone:
            keep[i].append(j)
    empty = [i for i, kept in keep.items() if not kept]
    if empty:
        raise ValueError(f"this FLAP budget would remove every MLP channel of layer(s) {empty}; lower the ratio "
                         "(or drop those MLPs with a depth method instead)")
    return keep


def channel_params(model) -> int:
    """Decoder parameters that one MLP channel carries (the same in every layer of an unpruned model)."""
    s = next(s for s in inspect_model(model) if s.mlp == "full")
    return (s.n_mlp_in + 1) * s.hidden + (s.n_mlp_in if s.mlp_in_bias else 0)


def shrink_ops(outputs: dict[int, torch.nn.Linear], moments: dict[int, Moments], keep: dict[int, list[int]],
               bias: bool = True) -> list[ShrinkMLP]:
    """``shrink_mlp`` ops keeping ``keep[i]`` channels of layer ``i``; with ``bias`` the removed channels' mean
    contribution ``W[:, removed] @ mean(x[removed])`` ([d]) joins the output projection's bias."""
    ops = []
    for i, kept in keep.items():
        width = outputs[i].in_features
        if len(kept) == width:
            continue
        op = ShrinkMLP(layer=i, keep=kept, bias=bias)
        if bias:
            gone = torch.ones(width, dtype=torch.bool)
            gone[kept] = False
            w = output_weight(outputs[i])  # [d, width]
            op.tensors["bias"] = (w[:, gone] @ moments[i].mean[gone.to(moments[i].mean.device)]).float()  # [d]
        ops.append(op)
    return ops


def flap_ops(model, calibration: torch.Tensor, remove: int, metric: str = "wifv", bias: bool = True,
             replacements: dict | None = None) -> tuple[list[ShrinkMLP], dict]:
    """``shrink_mlp`` ops removing ``remove`` MLP channels by FLAP, and a report.

    ``replacements`` (layer index -> module): decoder layers that stand in for the model's during the statistics
    forward (HARP's value-only layers, so FLAP sees the HARP-modified model as the official runs do).
    """
    start = time.perf_counter()
    outputs = mlp_outputs(model)
    layers = adapter_for(model).decoder_layers(model)
    with substituted(layers, replacements or {}):
        moments = input_moments(model, calibration, outputs)
    keep = choose_channels(channel_scores(outputs, moments, metric), remove)
    ops = shrink_ops(outputs, moments, keep, bias)
    widths = {i: len(kept) for i, kept in keep.items()}
    logger.info("FLAP: removed %d MLP channels; widths %s", remove, widths)
    return ops, {"channels_removed": remove, "widths": widths, "flap_s": time.perf_counter() - start}


@register_method("flap", FLAPConfig)
def run_flap(model, config: FLAPConfig, calibration) -> PruningResult:
    from ...accounting import accounting

    if config.ratio is not None:
        remove = round(config.ratio * mlp_channels(model))
    else:
        target = config.param_ratio * sum(s.num_params() for s in inspect_model(model))
        remove = round(target / channel_params(model))
    ops, report = flap_ops(model, calibration, remove, config.metric, config.bias)
    plan = PruningPlan(ops=ops)
    report["accounting"] = accounting(model, plan)
    return PruningResult(plan=plan, report=report)
