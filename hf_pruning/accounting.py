"""Parameter counts and predicted savings, in one place: computed from layer shapes, no forward pass.

``parameter_count`` counts a live model; ``predicted_decoder_params`` and ``accounting`` predict what a plan
leaves (decoder-layer parameters, by part, KV-cache bytes and FLOPs per token) from the shapes the plan's
simulation gives, before any surgery.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .engine import distributed
from .engine.offload import onloaded
from .plan import PruningPlan
from .remote.hf_pruning_surgery import adapter_for, inspect_model, simulate_plan

#: the parts of a decoder layer that ``part_params`` and ``accounting(...)["removed_by_part"]`` count
PARTS = ("qk", "vo", "mlp")


def parameter_count(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once: ``parameters()`` already skips duplicates)."""
    return sum(p.numel() for p in model.parameters())


def predicted_decoder_params(model: nn.Module, plan: PruningPlan | None = None) -> int:
    """Decoder-layer parameters after ``plan`` (or now), computed from layer shapes without surgery."""
    states = simulate_plan(model, plan) if plan is not None else inspect_model(model)
    return sum(s.num_params() for s in states)


def _state_flops(states, head_params: int, context: int) -> float:
    """Forward FLOPs per token of decoder layers in ``states`` plus an LM head of ``head_params`` weights."""
    macs = 0
    for s in states:
        d, hd = s.hidden, s.head_dim
        if s.attention == "full":
            macs += d * hd * (2 * s.q_heads + 2 * s.kv_heads)  # q, k, v, o
            macs += 2 * s.q_heads * hd * (context / 2)  # q.k and a.v over the cached context
        elif s.attention == "value_only":
            macs += 2 * d * s.kv_heads * hd  # v, fused o
        if s.mlp == "full":
            macs += (s.n_mlp_in + 1) * d * s.mlp_width
    return 2.0 * (macs + head_params)


def _head_params(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return head.weight.numel() if head is not None else 0


def flops_per_token(model: nn.Module, context: int = 2048) -> float:
    """Forward FLOPs per token: 2 x multiply-adds of every decoder linear and the LM head, plus attention
    scores and weighted values at the average causal context ``context / 2``."""
    return _state_flops(inspect_model(model), _head_params(model), context)


def part_params(states, which: str) -> int:
    """Decoder parameters in one part of the layers ``states``: ``qk`` (query/key projections, their biases and
    norms), ``vo``
    (value and output projections, the value bias; the fused pair of a value-only layer) or ``mlp``."""
    n = 0
    for s in states:
        d, hd = s.hidden, s.head_dim
        if which == "qk" and s.attention == "full":
            n += d * hd * (s.q_heads + s.kv_heads) + ((s.q_heads + s.kv_heads) * hd if s.qkv_bias else 0)
            n += s.qk_norm_params  # Qwen3/Gemma3 q_norm and k_norm go with Q and K
        elif which == "vo" and s.attention == "full":
            n += d * hd * (s.kv_heads + s.q_heads) + (s.kv_heads * hd if s.qkv_bias else 0)
        elif which == "vo" and s.attention == "value_only":
            n += 2 * d * hd * s.kv_heads + (s.kv_heads * hd if s.qkv_bias else 0)
        elif which == "mlp" and s.mlp == "full":
            n += (s.n_mlp_in + 1) * s.hidden * s.mlp_width
    return n


def accounting(model: nn.Module, plan: PruningPlan | None = None, context: int = 2048) -> dict:
    """What ``plan`` saves on ``model`` (or, without a plan, nothing yet), computed from layer shapes.

    Decoder-layer parameters removed (total and by part: query/key projections, value/output paths, MLP
    channels), KV-cache bytes per token removed, and forward FLOPs per token at ``context`` tokens (attention
    over the average causal context ``context / 2``) before and after.
    """
    before = inspect_model(model)
    after = simulate_plan(model, plan) if plan is not None else before

    total = sum(s.num_params() for s in before)
    kv0 = sum(s.kv_bytes_per_token(2) for s in before)
    head = _head_params(model)
    f0, f1 = _state_flops(before, head, context), _state_flops(after, head, context)
    removed = total - sum(s.num_params() for s in after)
    return {
        "decoder_params": total,
        "params_removed": removed,
        "params_removed_fraction": removed / total if total else 0.0,
        "removed_by_part": {k: part_params(before, k) - part_params(after, k) for k in PARTS},
        "kv_removed_fraction": 1 - sum(s.kv_bytes_per_token(2) for s in after) / kv0 if kv0 else 0.0,
        "context": context,
        "flops_per_token_before": f0,
        "flops_per_token_after": f1,
        "flops_ratio": f1 / f0,
    }


def removal_params(model) -> tuple[dict[tuple[int, str], int], int]:
    """Parameters each removal frees, keyed (layer, "attention"|"mlp"|"block"), and the decoder total."""
    freed = {}
    states = inspect_model(model)
    for i, s in enumerate(states):
        freed[(i, "attention")] = s.num_params() - dataclasses.replace(s, attention="none").num_params()
        freed[(i, "mlp")] = s.num_params() - dataclasses.replace(s, mlp="none").num_params()
        freed[(i, "block")] = s.num_params()  # remove_layers also takes norms that stay on the residual stream
    return freed, sum(s.num_params() for s in states)


def params_of(removed, freed: dict[tuple[int, str], int]) -> int:
    """Parameters that removing ``removed`` frees (``freed`` from :func:`removal_params`)."""
    return sum(freed[(c.layer, c.kind)] for c in removed)


def prunable_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The linear weights of one decoder layer that mask methods may zero (biases never)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear) and "compensation" not in name}


def sparsity_report(model) -> dict:
    """Fraction of zero weights per decoder-layer linear, per layer, and over all of them. Under a process group
    (``engine.distributed``) each rank counts every W-th layer and the counts are gathered: the same report
    everywhere, each layer read once."""
    rank, size = distributed.world()
    counts: dict[int, dict[str, tuple[int, int]]] = {}  # layer -> linear -> (zeros, weights)
    for i, layer in enumerate(adapter_for(model).decoder_layers(model)):
        if i % size == rank:
            with onloaded(layer):  # an offloaded layer's weights are read in once
                counts[i] = {name: (int((lin.weight == 0).sum()), lin.weight.numel())
                             for name, lin in prunable_linears(layer).items()}
    for other in distributed.gather_objects(counts, "the sparsity counts"):
        counts.update(other)
    layers = [{name: z / n for name, (z, n) in counts[i].items()} for i in sorted(counts)]
    zeros = sum(z for entry in counts.values() for z, _ in entry.values())
    total = sum(n for entry in counts.values() for _, n in entry.values())
    return {"overall": zeros / total if total else 0.0, "layers": layers}
