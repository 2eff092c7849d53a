"""Uniform head pruning: score every query head, remove the same number of units from every layer.

Scores of query head ``h`` (rows ``h*hd:(h+1)*hd`` of ``q_proj``, the same columns of ``o_proj``):
- ``magnitude``: squared L2 norm of its ``q_proj`` rows and ``o_proj`` columns;
- ``wanda``: sum over its ``o_proj`` columns ``j`` of ``|W_o[:, j]| * ||x_j||`` (``x``: the ``o_proj`` input over
  the calibration tokens), Wanda's weight-times-activation score gathered per head.
A KV group scores the sum of its query heads plus its ``k_proj``/``v_proj`` rows (squared norm, or
``|W| * ||x||`` with the attention input). ``unit="group"`` removes the lowest-scoring groups of every layer
(the KV cache shrinks by the same fraction); ``unit="query"`` removes the same number of lowest-scoring query
heads from every group, so the stock GQA layout stays exact (no padding heads).
"""

from __future__ import annotations

import torch

from ...calibration.moments import input_moments
from ...engine import onloaded
from ...plan import PruningPlan, RemoveHeads
from ...registry import PruningResult, register_method
from ...remote.hf_pruning_surgery import adapter_for, inspect_model, simulate_plan
from .config import HeadsConfig


def _rows(w: torch.Tensor, unit: int, hd: int) -> torch.Tensor:
    """Rows of head ``unit``: ``[hd, in]``."""
    return w[unit * hd : (unit + 1) * hd]


def head_scores(model, config: HeadsConfig, calibration: torch.Tensor | None) -> dict[int, tuple[list[float], list[float]]]:
    """Per full-attention layer: (query-head scores ``[n_q]``, KV-group scores ``[n_kv]``)."""
    adapter = adapter_for(model)
    decoder = adapter.decoder_layers(model)
    states = inspect_model(model)
    full = [i for i, s in enumerate(states) if s.attention == "full"]
    attn = {i: adapter.attention(decoder[i]) for i in full}

    def proj(i, name):
        return getattr(attn[i], name)

    moments = {}
    if config.score == "wanda":
        if calibration is None:
            raise ValueError("score='wanda' needs calibration token ids [n_samples, seq_len]")
        linears = {f"{i}.o": proj(i, adapter.o_name) for i in full}
        linears.update({f"{i}.k": proj(i, adapter.k_name) for i in full})
        moments = input_moments(model, calibration, linears)
    out = {}
    for i in full:
        s = states[i]
        hd, rep = s.head_dim, s.q_heads // s.kv_heads
        with onloaded(attn[i]):  # an offloaded layer's weights are read in once
            wq = proj(i, adapter.q_name).weight.data.double()  # [nq*hd, d]
            wo = proj(i, adapter.o_name).weight.data.double().T  # [nq*hd, d]: row j = o_proj column j
            wk = proj(i, adapter.k_name).weight.data.double()  # [nkv*hd, d]
            wv = proj(i, adapter.v_name).weight.data.double()
        if config.score == "magnitude":
            q = [float(_rows(wq, h, hd).pow(2).sum() + _rows(wo, h, hd).pow(2).sum()) for h in range(s.q_heads)]
            kv = [float(_rows(wk, g, hd).pow(2).sum() + _rows(wv, g, hd).pow(2).sum()) for g in range(s.kv_heads)]
        else:
            o_norm = moments[f"{i}.o"].norm  # [nq*hd]
            x_norm = moments[f"{i}.k"].norm  # [d]
            per_col = wo.abs().sum(1) * o_norm  # [nq*hd]
            q = per_col.view(s.q_heads, hd).sum(1).tolist()  # [nq]
            kv = [float((_rows(wk, g, hd).abs() * x_norm).sum() + (_rows(wv, g, hd).abs() * x_norm).sum())
                  for g in range(s.kv_heads)]
        out[i] = (q, [sum(q[g * rep : (g + 1) * rep]) + kv[g] for g in range(s.kv_heads)])
    return out


def _removal(scores: dict, states, unit: str, k: int) -> dict[int, list[int]]:
    """Query heads to remove per layer: ``k`` units of every layer, lowest scores first (ties: lower index)."""
    heads = {}
    for i, (q, groups) in scores.items():
        s = states[i]
        rep = s.q_heads // s.kv_heads
        if unit == "group":
            if k >= s.kv_heads:
                raise ValueError(f"removing {k} KV group(s) per layer would remove every head of layer {i} "
                                 f"({s.kv_heads} groups); choose fewer (use a depth method to drop whole sublayers)")
            gone = sorted(range(s.kv_heads), key=lambda g: (groups[g], g))[:k]
            heads[i] = sorted(h for g in gone for h in range(g * rep, (g + 1) * rep))
        else:
            if k % s.kv_heads:
                raise ValueError(f"removing {k} query heads per layer breaks the GQA groups of layer {i}: its "
                                 f"{s.kv_heads} KV heads each serve {rep} query heads, and every group must lose "
                                 f"the same number; remove a multiple of {s.kv_heads}, or use unit='group'")
            per_group = k // s.kv_heads
            if per_group >= rep:
                raise ValueError(f"removing {k} query heads per layer leaves layer {i} without query heads; "
                                 f"choose fewer than {s.q_heads}")
            heads[i] = sorted(h for g in range(s.kv_heads)
                              for h in sorted(range(g * rep, (g + 1) * rep), key=lambda h: (q[h], h))[:per_group])
    return heads


def _plan(heads: dict[int, list[int]]) -> PruningPlan:
    return PruningPlan(ops=[RemoveHeads(layer=i, heads=h) for i, h in sorted(heads.items())])


@register_method("heads", HeadsConfig)
def run_heads(model, config: HeadsConfig, calibration) -> PruningResult:
    from ...accounting import accounting

    states = inspect_model(model)
    scores = head_scores(model, config, calibration)
    if not scores:
        raise ValueError("the model has no layer with full attention left to prune heads from")
    if config.per_layer is not None:
        k = config.per_layer
    else:
        total = sum(s.num_params() for s in states)
        step = 1 if config.unit == "group" else min(states[i].kv_heads for i in scores)
        k = step
        while True:  # the smallest uniform count reaching the ratio (an impossible one raises in _removal)
            after = sum(s.num_params() for s in simulate_plan(model, _plan(_removal(scores, states, config.unit, k))))
            if total - after >= config.param_ratio * total:
                break
            k += step
    heads = _removal(scores, states, config.unit, k)
    plan = _plan(heads)
    report = {"per_layer": k, "unit": config.unit, "removed_heads": heads, "accounting": accounting(model, plan)}
    return PruningResult(plan=plan, report=report)
