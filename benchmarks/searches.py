"""FinerCut's shared search (one search serves every FinerCut row of the same search settings) and the
search-cost comparisons the benchmark prints under its table: FinerCut exact / fast / naive, GradMAP's
selection against SLEB-style greedy selection, HARP's cached against naive alpha search. All timed in the run."""

from __future__ import annotations

import json

from hf_pruning import FinerCutConfig, prune_
from hf_pruning.evaluation import forward_seconds, measure_pruning, perplexity
from hf_pruning.methods.depth import candidates_for, resolve_budget
from hf_pruning.methods.finercut import finercut_search
from hf_pruning.methods.harp import AlphaSearch
from hf_pruning.methods.harp.pruner import harp_layers

from .counts import decoder_layer_count


def search_settings(settings: dict) -> dict:
    """A FinerCut row's settings without its budget (and the record-only fields): what its search depends on."""
    defaults = FinerCutConfig().to_dict()
    skip = {"param_ratio", "sublayer_ratio", "num_removals", "order", "method", "compensate", "ridge", "solver"}
    return {k: v for k, v in settings.items() if k not in skip and k in defaults and v != defaults[k]}


def shared_finercut_search(cache: dict, grid_rows, dense, calib, settings: dict) -> dict:
    """One search serves every FinerCut row of ``grid_rows`` whose settings other than the budget are ``settings``;
    it runs until the largest of their budgets and is kept in ``cache`` (``{"steps", "cost"}``)."""
    key = json.dumps(settings, sort_keys=True)
    if key not in cache:
        configs = [FinerCutConfig(**st) for _, m, st in grid_rows if m == "finercut" and search_settings(st) == settings]
        cands = candidates_for(dense, "sublayer")
        budgets = [resolve_budget(dense, cands, c.num_removals, c.param_ratio, c.sublayer_ratio) for c in configs]
        found = {}
        cost = measure_pruning(
            lambda: found.update(finercut_search(dense, FinerCutConfig(**settings), calib,
                                                 stop=lambda r: all(b.stop(r) for b in budgets))),
            dense, calib)
        cache[key] = {"steps": found["steps"], "cost": cost}
    return cache[key]


def finercut_row(cache: dict, grid_rows, config, dense, calib, load_model, eval_ids):
    """(config with the found order, cost up to this row's last removal, extra row fields) of a FinerCut row."""
    shared = shared_finercut_search(cache, grid_rows, dense, calib, search_settings(config.to_dict()))
    steps = shared["steps"]
    order = [str(st.candidate) for st in steps]
    budget = resolve_budget(dense, candidates_for(dense, "sublayer"), config.num_removals, config.param_ratio,
                            config.sublayer_ratio)
    k = budget.prefix([st.candidate for st in steps])
    step = steps[k - 1]
    cost = dict(shared["cost"])
    cost.update({"prune_s": step.seconds, "passes": step.seconds / cost["forward_s"],
                 "note": "cost of the shared search up to this row's last removal; peak RSS of the whole search"})
    extra = {"select_s": step.seconds, "search_layer_forwards": step.layer_forwards,
             "search_head_forwards": step.head_forwards}
    if config.sublayer_ratio is not None:
        extra["search_comparison"] = compare_searches(dense, calib, steps[:k], load_model, eval_ids)
    return config.replace(order=order), cost, extra


def _steps_summary(steps) -> dict:
    return {"order": [str(st.candidate) for st in steps], "search_s": steps[-1].seconds,
            "search_layer_forwards": steps[-1].layer_forwards, "search_head_forwards": steps[-1].head_forwards}


def compare_searches(dense, calib, exact_steps, load_model, eval_ids) -> dict:
    """Naive and fast searches to the same number of removals, in this run, against the exact one."""
    n = len(exact_steps)
    out = {"exact": _steps_summary(exact_steps)}
    for mode in ("fast", "naive"):
        out[mode] = _steps_summary(finercut_search(dense, FinerCutConfig(num_removals=n, search=mode), calib)["steps"])
    for mode in ("exact", "fast"):
        out[f"{mode}_over_naive_layer_forwards"] = (out[mode]["search_layer_forwards"]
                                                    / out["naive"]["search_layer_forwards"])
        out[f"{mode}_over_naive_s"] = out[mode]["search_s"] / out["naive"]["search_s"]
    out["exact_order_identical"] = out["exact"]["order"] == out["naive"]["order"]
    out["fast_same_set"] = set(out["fast"]["order"]) == set(out["exact"]["order"])
    fast_model = prune_(load_model(), FinerCutConfig(order=out["fast"]["order"]))
    exact_model = prune_(load_model(), FinerCutConfig(order=out["exact"]["order"]))
    out["fast_ppl"], out["exact_ppl"] = perplexity(fast_model, eval_ids), perplexity(exact_model, eval_ids)
    out["fast_ppl_over_exact"] = out["fast_ppl"] / out["exact_ppl"]
    return out


def compare_selection(dense, calib, row) -> dict:
    """SLEB-style greedy selection of as many blocks as ``row`` (GradMAP) removed, exact and naive, timed."""
    n = len(row["report"]["order"])
    out = {"gradmap_select_s": row["select_s"], "blocks": n}
    for mode in ("exact", "naive"):
        steps = finercut_search(dense, FinerCutConfig(granularity="block", metric="ppl", num_removals=n,
                                                      search=mode), calib)["steps"]
        out[f"sleb_{mode}_s"] = steps[-1].seconds
        out[f"gradmap_over_sleb_{mode}"] = row["select_s"] / steps[-1].seconds
    return out


def compare_harp_searches(dense, calib_depth, config) -> dict:
    """HARP's alpha search, cached and naive, on the depth calibration rows ``calib_depth``, timed in this run."""
    layers, _ = harp_layers(dense, config)
    out = {"layers": len(layers), "grid": len(config.grid)}
    for mode in ("cached", "naive"):
        search = AlphaSearch(dense, calib_depth, layers, config.grid, mode)
        alphas, _, _ = search.run(progress=False)
        out[mode] = {**search.cost(), "alphas": [alphas[i] for i in layers]}
    unit = forward_seconds(dense, calib_depth)
    n_layers = decoder_layer_count(dense)
    for mode in ("cached", "naive"):
        out[mode]["passes"] = out[mode]["search_s"] / unit
    out["forward_s"] = unit
    out["same_alphas"] = out["cached"]["alphas"] == out["naive"]["alphas"]
    out["cached_over_naive_s"] = out["cached"]["search_s"] / out["naive"]["search_s"]
    out["cached_over_naive_layer_forwards"] = (out["cached"]["search_layer_forwards"]
                                               / out["naive"]["search_layer_forwards"])
    # the target: N x grid x (fraction of layers re-run) passes; the fraction averages (k+1)/L over the N layers
    out["target_passes"] = len(config.grid) * sum((k + 1) / n_layers for k in range(len(layers)))
    return out
