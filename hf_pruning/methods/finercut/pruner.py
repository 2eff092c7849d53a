"""Orchestration of FinerCut: resolve the budget, run the greedy search, turn the removal order into a plan."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ...calibration import calibration_mode
from ...registry import PruningResult, register_method
from ..depth import (
    Candidate,
    DepthRunner,
    candidates_for,
    depth_result,
    named_candidates,
    removal_from_order,
    removal_params,
    resolve_budget,
)
from .config import FinerCutConfig
from .metrics import Metric
from .search import GreedySearch

logger = logging.getLogger(__name__)

#: shortest calibration row the search accepts (the fast search screens on a prefix of it)
MIN_TOKENS = 16


def check_calibration(calibration: torch.Tensor) -> None:
    """Depth searches score whole rows: refuse rows too short to say anything about the output."""
    if calibration is None or calibration.ndim != 2 or calibration.shape[0] < 1:
        raise ValueError("calibration must be token ids [n_samples, seq_len]; build them with "
                         "hf_pruning.calibration.build_calibration(tokenizer, n_samples=8, seq_len=256)")
    if calibration.shape[1] < MIN_TOKENS:
        raise ValueError(f"calibration rows of {calibration.shape[1]} tokens are too short to score a removal "
                         f"(need at least {MIN_TOKENS}); build longer rows, e.g. build_calibration(..., seq_len=256)")


def _exclusion(model, config: FinerCutConfig, n_candidates: int) -> tuple[set[int], int]:
    """The official exclusion: layers 0..int(L*x) wait until int(C*x)+1 removals were made."""
    if config.exclude_front <= 0:
        return set(), 0
    n_layers = len(model.config.layer_types) if getattr(model.config, "layer_types", None) else model.config.num_hidden_layers
    return set(range(int(n_layers * config.exclude_front) + 1)), int(n_candidates * config.exclude_front) + 1


def finercut_search(model, config: FinerCutConfig, calibration: torch.Tensor, progress: bool = True,
                    stop: Callable[[list[Candidate]], bool] | None = None) -> dict:
    """Run FinerCut's search on ``model`` (left unchanged) and return the removal steps and their cost.

    The result has ``steps`` (a :class:`Step` per removal, with cumulative ``layer_forwards`` and ``seconds``),
    ``candidates`` and the resolved budget. Removing any prefix of ``steps`` is the method's answer for that
    ratio, so one search to the largest budget serves every smaller one: ``stop(removed)`` replaces the config's
    budget as the end of the search (e.g. "every budget of a list is reached").
    """
    check_calibration(calibration)
    candidates = candidates_for(model, config.granularity)
    default = 0.25 if config.param_ratio is None and config.num_removals is None else None
    budget = resolve_budget(model, candidates, config.num_removals, config.param_ratio,
                            config.sublayer_ratio if config.sublayer_ratio is not None else default,
                            what="block" if config.granularity == "block" else "sublayer")
    exclude, readmit = _exclusion(model, config, len(candidates))
    weights = None
    if config.cost_aware:  # score increase per freed parameter: a knapsack-style greedy for parameter budgets
        freed, _ = removal_params(model)
        weights = {c: float(freed[(c.layer, c.kind)]) for c in candidates}
    with calibration_mode(model):
        search = GreedySearch(model, calibration, config.metric, config.search, config.screen_fraction, config.rescore,
                              weights)
        steps = search.run(candidates, stop or budget.stop, len(candidates) - 1 if stop else budget.steps, exclude,
                           readmit, config.one_shot, progress)
    removed = [s.candidate for s in steps]
    if not (stop or budget.stop)(removed):
        raise ValueError(f"the search stopped after {len(removed)} removals without reaching param_ratio="
                         f"{config.param_ratio}; choose a smaller ratio")
    return {"steps": steps, "candidates": candidates, "budget": budget,
            "calibration_tokens": int(calibration.numel())}


def removal_score(model, calibration: torch.Tensor, removed, metric: str = "js_code") -> float:
    """FinerCut's score of any removal set: the ``metric`` distance between ``model``'s output distribution and
    the model with ``removed`` taken out (candidates or strings such as ``"12.mlp"``, ``"5.block"``), averaged over
    the calibration rows ``[n, T]``; ``model`` is left unchanged.

    The search's last step reports this value for the set it found, so two sets, e.g. a FinerCut result and a
    block method's, can be compared on the objective FinerCut minimises.
    """
    check_calibration(calibration)
    removed = tuple(named_candidates(model, removed, "the removal set",
                                     "name each once as '<layer>.<attention|mlp|block>' of a layer still in the model"))
    with calibration_mode(model):
        dense = DepthRunner(model, calibration)
        score = Metric(metric)
        if score.needs_reference:
            score.set_reference(dense.dense_logits())
        runner = DepthRunner(model, calibration, removed=removed, prefix_from=dense) if removed else dense
        final = runner.cache[len(runner.layers)]
        return sum(score.score(s, runner.logits(s, final[s]), runner.ids[s]) for s in range(runner.n)) / runner.n


@register_method("finercut", FinerCutConfig)
def run_finercut(model, config: FinerCutConfig, calibration, compensation_calibration=None) -> PruningResult:
    if config.order is not None:
        removed, report = removal_from_order(model, config, config.granularity, None), {"search": None}
    else:
        found = finercut_search(model, config, calibration)
        steps = found["steps"]
        removed = [s.candidate for s in steps]
        last = steps[-1]
        report = {
            "scores": [s.score for s in steps],
            "steps": [s.to_dict() for s in steps],
            "search": {"mode": config.search, "metric": config.metric, "cost_aware": config.cost_aware,
                       "search_s": last.seconds,
                       "search_layer_forwards": last.layer_forwards, "search_head_forwards": last.head_forwards,
                       "calibration_tokens": found["calibration_tokens"]},
        }
    return depth_result(model, config, removed, calibration, report, compensation_calibration)
