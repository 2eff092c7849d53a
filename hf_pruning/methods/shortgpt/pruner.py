"""ShortGPT's search: one streamed pass (layer at a time, batch at a time) measures every block's influence,
then blocks rank by it."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ...calibration import calibration_mode
from ...engine import ActivationStore, distributed, execution_device, run_layer, sequential
from ..depth import Candidate, candidates_for, check_search_rows, config_budget, register_depth_method
from ..depth.ranks import total_count
from .config import ShortGPTConfig


@torch.no_grad()
def block_influence(model, calibration: torch.Tensor, store_folder: str | bool | None = None) -> list[float]:
    """BI_i = 1 - mean over tokens of cos(x_i, x_{i+1}), per block, from one streamed pass over ``calibration``
    ``[n, T]``: each layer onloaded once, the rows through it batch by batch (``engine.sequential``; the stream
    between layers in an ``ActivationStore``, on disk in ``store_folder`` when given). The per-token cosines
    of a layer (``[n * T]`` floats) are averaged once the layer is done, as a single mean over all tokens.

    Under a process group (this rank's rows): each layer keeps the float64 sum of its cosines per batch and the
    token count, and one reduction after the last layer (``[L, 2]`` float64) gives the means over every rank."""
    parallel = distributed.active()

    def process(idx, layer, inputs: ActivationStore, kwargs):
        outputs, cos, total = inputs.like(), [], 0.0
        device = execution_device(layer)
        for b in range(len(inputs)):
            hidden = inputs.get(b, device)  # [b, T, d]
            out = run_layer(layer, hidden, kwargs)
            cos.append(F.cosine_similarity(hidden.float(), out.float(), dim=-1).flatten())  # [b * T]
            total += float(cos[-1].double().sum())
            outputs.append(out)
        if parallel:  # this rank's sum and count, reduced with every layer's below
            return {"cos_sum": total, "tokens": sum(c.numel() for c in cos)}, outputs
        return {"block_influence": float(1.0 - torch.cat(cos).mean())}, outputs

    reports = sequential(model, calibration, process, "block influence", store_folder=store_folder)
    if parallel:
        sums = distributed.all_sum(torch.tensor([[r["cos_sum"], r["tokens"]] for r in reports],
                                                dtype=torch.float64), "the block influences")  # [L, 2]
        return [float(1.0 - total / tokens) for total, tokens in sums.tolist()]
    return [r["block_influence"] for r in reports]


def ranked_blocks(model, config: ShortGPTConfig, calibration: torch.Tensor) -> tuple[list[Candidate], dict]:
    """The budget's prefix of the blocks in removal order (lowest influence first), and a cost report."""
    check_search_rows(calibration)
    start = time.perf_counter()
    candidates = candidates_for(model, "block")
    budget = config_budget(model, config, candidates)
    with calibration_mode(model):
        bi = block_influence(model, calibration)
    order = sorted(candidates, key=lambda c: (bi[c.layer], c))
    n = budget.prefix(order)
    search = {"search_s": time.perf_counter() - start, "search_layer_forwards": float(len(bi)),
              "search_head_forwards": 0.0,
              "calibration_tokens": total_count(calibration.numel(), "calibration tokens")}
    return order[:n], {"block_influence": bi, "search": search}


run_shortgpt = register_depth_method("shortgpt", ShortGPTConfig, ranked_blocks)
