"""ShortGPT's search: one streamed pass (layer at a time, batch at a time) measures every block's influence,
then blocks rank by it."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ...calibration import calibration_mode
from ...engine import ActivationStore, execution_device, run_layer, sequential
from ..depth import Candidate, candidates_for, check_search_rows, config_budget, register_depth_method
from .config import ShortGPTConfig


@torch.no_grad()
def block_influence(model, calibration: torch.Tensor, store_folder: str | bool | None = None) -> list[float]:
    """BI_i = 1 - mean over tokens of cos(x_i, x_{i+1}), per block, from one streamed pass over ``calibration``
    ``[n, T]``: each layer onloaded once, the rows through it batch by batch (``engine.sequential``; the stream
    between layers in an ``ActivationStore``, on disk in ``store_folder`` when given). The per-token cosines
    of a layer (``[n * T]`` floats) are averaged once the layer is done, as a single mean over all tokens."""

    def process(idx, layer, inputs: ActivationStore, kwargs):
        outputs, cos = inputs.like(), []
        device = execution_device(layer)
        for b in range(len(inputs)):
            hidden = inputs.get(b, device)  # [b, T, d]
            out = run_layer(layer, hidden, kwargs)
            cos.append(F.cosine_similarity(hidden.float(), out.float(), dim=-1).flatten())  # [b * T]
            outputs.append(out)
        return {"block_influence": float(1.0 - torch.cat(cos).mean())}, outputs

    reports = sequential(model, calibration, process, "block influence", store_folder=store_folder)
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
              "search_head_forwards": 0.0, "calibration_tokens": int(calibration.numel())}
    return order[:n], {"block_influence": bi, "search": search}


run_shortgpt = register_depth_method("shortgpt", ShortGPTConfig, ranked_blocks)
