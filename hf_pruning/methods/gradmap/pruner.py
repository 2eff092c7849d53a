"""GradMAP's search: gradient-ranked block removal (iterative or one shot); the compensation follows (depth/)."""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from ..depth import Candidate, candidates_for, config_budget, layers_return_tuple, register_depth_method
from ..depth.ranks import total_count
from .config import GradMAPConfig
from .scoring import check_token_ids, gradient_scores

logger = logging.getLogger(__name__)


def rank_blocks(model, calibration: torch.Tensor, config, score: str, mode: str) -> tuple[list[Candidate], dict]:
    """Blocks to remove under ``config``'s budget, by gradient ``score``; ``mode`` iterative or one_shot."""
    check_token_ids(calibration)
    start = time.perf_counter()
    candidates = candidates_for(model, "block")
    budget = config_budget(model, config, candidates)
    tuple_out = layers_return_tuple(model, calibration)
    removed: list[Candidate] = []
    history, backward_passes = [], 0
    counts = {"layer_forwards": 0, "layer_backwards": 0}  # decoder layers over the whole calibration set
    scores = None
    bar = tqdm(total=budget.steps, desc=f"gradient block ranking ({mode})", unit="removal")
    while not budget.stop(removed) and len(removed) < budget.steps:
        if scores is None or mode == "iterative":
            scores = gradient_scores(model, calibration, {c.layer for c in removed}, score, tuple_out,
                                     counts=counts)
            backward_passes += 1
        pool = [c for c in candidates if c not in removed]
        chosen = min(pool, key=lambda c: (scores[c.layer], c))
        history.append({"removed": str(chosen), "scores": {str(k): v for k, v in scores.items()}})
        removed.append(chosen)
        logger.info("removal %d: %s (score %.4g)", len(removed), chosen, scores[chosen.layer])
        bar.update(1)
    bar.close()
    search = {"search_s": time.perf_counter() - start, "backward_passes": backward_passes,
              "search_layer_forwards": counts["layer_forwards"], "search_layer_backwards": counts["layer_backwards"],
              "calibration_tokens": total_count(calibration.numel(), "calibration tokens"), "score": score,
              "mode": mode}
    return removed, {"history": history, "search": search}


def gradmap_search(model, config: GradMAPConfig, calibration: torch.Tensor) -> tuple[list[Candidate], dict]:
    """GradMAP's stage 1: blocks by ``config.score``, ranked once or re-scored after every removal (``mode``)."""
    return rank_blocks(model, calibration, config, config.score, config.mode)


run_gradmap = register_depth_method("gradmap", GradMAPConfig, gradmap_search)
