"""ShortGPT's search: one pass collects every block's input and output, then blocks rank by influence."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ...calibration import calibration_mode
from ..depth import Candidate, DepthRunner, candidates_for, check_search_rows, config_budget, register_depth_method
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


def ranked_blocks(model, config: ShortGPTConfig, calibration: torch.Tensor) -> tuple[list[Candidate], dict]:
    """The budget's prefix of the blocks in removal order (lowest influence first), and a cost report."""
    check_search_rows(calibration)
    start = time.perf_counter()
    candidates = candidates_for(model, "block")
    budget = config_budget(model, config, candidates)
    with calibration_mode(model):
        runner = DepthRunner(model, calibration)
        bi = block_influence(runner)
    order = sorted(candidates, key=lambda c: (bi[c.layer], c))
    n = budget.prefix(order)
    search = {"search_s": time.perf_counter() - start, "search_layer_forwards": runner.layer_forwards,
              "search_head_forwards": 0.0, "calibration_tokens": int(calibration.numel())}
    return order[:n], {"block_influence": bi, "search": search}


run_shortgpt = register_depth_method("shortgpt", ShortGPTConfig, ranked_blocks)
