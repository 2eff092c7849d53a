"""FinerCut's search: resolve the budget, run the greedy search, report its steps and cost."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ...accounting import removal_params
from ...calibration import calibration_mode
from ..depth import (
    Candidate,
    DepthRunner,
    candidates_for,
    check_search_rows,
    config_budget,
    named_candidates,
    register_depth_method,
)
from ..depth.ranks import total_count
from .config import FinerCutConfig
from .metrics import Metric
from .search import GreedySearch, score_rows

logger = logging.getLogger(__name__)


def _exclusion(model, config: FinerCutConfig, n_candidates: int) -> tuple[set[int], int]:
    """The official exclusion: layers 0..int(L*x) wait until int(C*x)+1 removals were made."""
    if config.exclude_front <= 0:
        return set(), 0
    n_layers = len(model.config.layer_types) if getattr(model.config, "layer_types", None) else model.config.num_hidden_layers
    return set(range(int(n_layers * config.exclude_front) + 1)), int(n_candidates * config.exclude_front) + 1


def finercut_search(model, config: FinerCutConfig, calibration: torch.Tensor, progress: bool = True,
                    stop: Callable[[list[Candidate]], bool] | None = None, store_folder: str | bool | None = None,
                    keep_every: int | str = 1, chunk_rows: int | None = None) -> dict:
    """Run FinerCut's search on ``model`` (left unchanged) and return the removal steps and their cost.

    The result has ``steps`` (a :class:`Step` per removal, with cumulative ``layer_forwards`` and ``seconds``),
    ``candidates`` and the resolved budget. Removing any prefix of ``steps`` is the method's answer for that
    ratio, so one search to the largest budget serves every smaller one: ``stop(removed)`` replaces the config's
    budget as the end of the search (e.g. "every budget of a list is reached").

    ``store_folder`` (residual streams on disk there; ``True``: a temporary folder), ``keep_every`` (keep every
    k-th layer's inputs, ``"sqrt"``) and ``chunk_rows`` (rows scored together) are the layer runner's
    (:class:`DepthRunner`); they change the memory and the work, never the result.
    """
    check_search_rows(calibration)
    candidates = candidates_for(model, config.granularity)
    budget = config_budget(model, config, candidates)
    exclude, readmit = _exclusion(model, config, len(candidates))
    weights = None
    if config.cost_aware:  # score increase per freed parameter: a knapsack-style greedy for parameter budgets
        freed, _ = removal_params(model)
        weights = {c: float(freed[(c.layer, c.kind)]) for c in candidates}
    with calibration_mode(model):
        search = GreedySearch(model, calibration, config.metric, config.search, config.screen_fraction, config.rescore,
                              weights, store_folder=store_folder, keep_every=keep_every, chunk_rows=chunk_rows)
        try:
            steps = search.run(candidates, stop or budget.stop, len(candidates) - 1 if stop else budget.steps,
                               exclude, readmit, config.one_shot, progress)
        finally:
            search.close()
    removed = [s.candidate for s in steps]
    if not (stop or budget.stop)(removed):
        raise ValueError(f"the search stopped after {len(removed)} removals without reaching param_ratio="
                         f"{config.param_ratio}; choose a smaller ratio")
    return {"steps": steps, "candidates": candidates, "budget": budget,
            "calibration_tokens": total_count(calibration.numel(), "calibration tokens")}


def removal_score(model, calibration: torch.Tensor, removed, metric: str = "js_code") -> float:
    """FinerCut's score of any removal set: the ``metric`` distance between ``model``'s output distribution and
    the model with ``removed`` taken out (candidates or strings such as ``"12.mlp"``, ``"5.block"``), averaged over
    the calibration rows ``[n, T]``; ``model`` is left unchanged.

    The search's last step reports this value for the set it found, so two sets, e.g. a FinerCut result and a
    block method's, can be compared on the objective FinerCut minimises.
    """
    check_search_rows(calibration)
    removed = tuple(named_candidates(model, removed, "the removal set",
                                     "name each once as '<layer>.<attention|mlp|block>' of a layer still in the model"))
    with calibration_mode(model):
        dense = DepthRunner(model, calibration)
        runner = DepthRunner(model, calibration, removed=removed, prefix_from=dense) if removed else dense
        score = Metric(metric)
        score.set_reference(dense.stores[len(dense.layers)])  # read only: the dense runner's own store
        tally = {"removed": [0.0, 0]}
        for chunk in runner.chunks():  # [1, T, V] logits of one row at a time
            score_rows(runner, score, chunk, {"removed": runner.chunk_input(chunk, len(runner.layers))}, tally)
        for r in {id(dense): dense, id(runner): runner}.values():
            r.close()
        return tally["removed"][0] / runner.n


def search_report(config: FinerCutConfig, found: dict) -> tuple[list[Candidate], dict]:
    """The removal set and report of a finished search (``found``: what :func:`finercut_search` returned)."""
    steps = found["steps"]
    last = steps[-1]
    return [s.candidate for s in steps], {
        "scores": [s.score for s in steps],
        "steps": [s.to_dict() for s in steps],
        "search": {"mode": config.search, "metric": config.metric, "cost_aware": config.cost_aware,
                   "search_s": last.seconds,
                   "search_layer_forwards": last.layer_forwards, "search_head_forwards": last.head_forwards,
                   "calibration_tokens": found["calibration_tokens"]},
    }


def greedy_search(model, config: FinerCutConfig, calibration: torch.Tensor) -> tuple[list[Candidate], dict]:
    """FinerCut's search as a depth method's: the removal set and the report."""
    return search_report(config, finercut_search(model, config, calibration))


run_finercut = register_depth_method("finercut", FinerCutConfig, greedy_search)
