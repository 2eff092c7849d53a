"""What a pruned model looks like next to its base: the numbers behind model cards and ``hf-prune inspect``.

The base model is rebuilt from the config (the plan's ``base`` fields) on the meta device, so the comparison
needs neither the original weights nor any memory: only shapes are read.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..accounting import parameter_count, sparsity_report
from ..plan import get_plan
from ..remote.hf_pruning_state import set_config_fields
from ..remote.hf_pruning_surgery import base_fields, inspect_model, stock_model_type

logger = logging.getLogger(__name__)

#: config.json fields that belong to hf_pruning or to the saved file, not to the base architecture
_OWN_FIELDS = ("pruning_plan", "pruning_config", "hf_pruning_version", "auto_map", "architectures", "model_type",
               "transformers_version", "_name_or_path")


def dense_reference(model: nn.Module) -> nn.Module:
    """The unpruned base architecture of ``model`` as a stock model on the meta device (shapes only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    plan = get_plan(model)
    fields = {k: v for k, v in model.config.to_dict().items() if k not in _OWN_FIELDS}
    config = AutoConfig.for_model(stock_model_type(model.config.model_type), **fields)
    base = plan.base or base_fields(model.config)
    set_config_fields(config, base["num_hidden_layers"], base.get("layer_types"))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _kv_bytes(states, bytes_per_value: int = 2) -> int:
    return sum(s.kv_bytes_per_token(bytes_per_value) for s in states)


def pruning_summary(model: nn.Module) -> dict:
    """Structure and savings of ``model`` against its base architecture.

    Keys: ``methods`` (the recorded pruning configs' method names, in order), ``layers`` (before / after),
    ``attention`` and ``mlp`` (how many kept layers have each kind of sublayer), ``q_heads_removed``,
    ``kv_heads_removed`` and ``mlp_channels_removed`` (in kept layers with full attention / MLP),
    ``decoder_params`` and ``params`` (before / after, tied weights once), ``params_removed_fraction`` (of
    decoder-layer parameters, by shape), ``kv_bytes_per_token`` (bf16, before / after), ``kv_removed_fraction``,
    ``sparsity`` (fraction of zero weights in decoder linears now), ``per_layer`` (one dict per kept layer).
    """
    dense = dense_reference(model)
    before, after = inspect_model(dense), inspect_model(model)
    ref = before[0]  # every base layer of the five supported architectures has the same shape
    report = sparsity_report(model)
    history = list(getattr(model.config, "pruning_config", None) or [])
    dec0, dec1 = sum(s.num_params() for s in before), sum(s.num_params() for s in after)
    kv0, kv1 = _kv_bytes(before), _kv_bytes(after)
    per_layer = []
    for i, (s, sp) in enumerate(zip(after, report["layers"])):
        zeros = sum(sp.values()) / len(sp) if sp else 0.0
        per_layer.append({"layer": i, "attention": s.attention, "q_heads": s.q_heads, "kv_heads": s.kv_heads,
                          "mlp": s.mlp, "mlp_width": s.mlp_width, "params": s.num_params(),
                          "sparsity": zeros})
    full_attn = [s for s in after if s.attention == "full"]
    full_mlp = [s for s in after if s.mlp == "full"]
    return {
        "methods": [h.get("method") for h in history if isinstance(h, dict)],
        "layers": {"before": len(before), "after": len(after)},
        "attention": {k: sum(s.attention == k for s in after) for k in ("full", "value_only", "none")},
        "mlp": {k: sum(s.mlp == k for s in after) for k in ("full", "none")},
        "q_heads_removed": sum(ref.q_heads - s.q_heads for s in full_attn),
        "kv_heads_removed": sum(ref.kv_heads - s.kv_heads for s in full_attn),
        "mlp_channels_removed": sum(ref.mlp_width - s.mlp_width for s in full_mlp),
        "decoder_params": {"before": dec0, "after": dec1},
        "params": {"before": parameter_count(dense), "after": parameter_count(model)},
        "params_removed_fraction": 1 - dec1 / dec0 if dec0 else 0.0,
        "kv_bytes_per_token": {"before": kv0, "after": kv1},
        "kv_removed_fraction": 1 - kv1 / kv0 if kv0 else 0.0,
        "sparsity": report["overall"],
        "per_layer": per_layer,
    }
