"""Orchestration of ShortGPT: one forward collects every block's input and output, then rank by influence."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ...calibration import calibration_mode
from ...registry import PruningResult, register_method
from ..depth import Candidate, DepthRunner, candidates_for, depth_result, removal_from_order, resolve_budget
from ..finercut.pruner import check_calibration
from .config import ShortGPTConfig


@torch.no_grad()
def block_influence(runner: DepthRunner) -> list[float]:
    """BI_i = 1 - mean over tokens of cos(x_i, x_{i+1}), per block, from the runner's cached residual stream."""
    scores = []
    for i in range(len(runner.layers)):
        cos = [F.cosine_similarity(runner.cache[i][s].float(), runner.cache[i + 1][s].float(), dim=-1).flatten()
               for s in range(runner.n)]  # per sample [T]
        scores.append(float(1.0 - torch.cat(cos).mean()))
    return scores


def ranked_blocks(model, calibration: torch.Tensor, config) -> tuple[list[Candidate], list[Candidate], dict]:
    """Blocks in removal order (lowest influence first), the budget's prefix of them, and a cost report."""
    check_calibration(calibration)
    start = time.perf_counter()
    candidates = candidates_for(model, "block")
    fraction = 0.25 if config.param_ratio is None and config.num_removals is None else None
    budget = resolve_budget(model, candidates, config.num_removals, config.param_ratio, fraction, what="block")
    with calibration_mode(model):
        runner = DepthRunner(model, calibration)
        bi = block_influence(runner)
    order = sorted(candidates, key=lambda c: (bi[c.layer], c))
    n = budget.prefix(order)
    search = {"search_s": time.perf_counter() - start, "search_layer_forwards": runner.layer_forwards,
              "search_head_forwards": 0.0, "calibration_tokens": int(calibration.numel())}
    return order, order[:n], {"block_influence": bi, "search": search}


@register_method("shortgpt", ShortGPTConfig)
def run_shortgpt(model, config: ShortGPTConfig, calibration, compensation_calibration=None) -> PruningResult:
    if config.order is not None:
        removed, report = removal_from_order(model, config, "block", 0.25), {"search": None}
    else:
        _, removed, report = ranked_blocks(model, calibration, config)
    return depth_result(model, config, removed, calibration, report, compensation_calibration)
