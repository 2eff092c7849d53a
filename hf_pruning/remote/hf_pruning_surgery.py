"""Executes a pruning plan on a live model: the one code path shared by ``prune_`` and by reloading.

Copied next to saved weights: imports only torch, transformers and siblings.
"""

from __future__ import annotations

import logging

from torch import nn

from .hf_pruning_adapter_base import DecoderAdapter, LayerState
from .hf_pruning_adapter_gemma2 import Gemma2Adapter
from .hf_pruning_adapter_llama import LlamaAdapter
from .hf_pruning_adapter_mistral import MistralAdapter
from .hf_pruning_adapter_opt import OPTAdapter
from .hf_pruning_adapter_qwen2 import Qwen2Adapter
from .hf_pruning_modules import prepare_cache_for_attentionless_layers
from .hf_pruning_plan import AddLinear, Op, PlanError, PruningPlan

logger = logging.getLogger(__name__)

#: one line per architecture; the registry test checks every adapter file is listed here
ADAPTER_CLASSES: tuple[type[DecoderAdapter], ...] = (
    LlamaAdapter,
    MistralAdapter,
    Qwen2Adapter,
    Gemma2Adapter,
    OPTAdapter,
)
PRUNED_PREFIX = "hf_pruning_"
ADAPTERS: dict[str, DecoderAdapter] = {}
for _cls in ADAPTER_CLASSES:
    for _mt in _cls.model_types:
        ADAPTERS[_mt] = ADAPTERS[PRUNED_PREFIX + _mt] = _cls()


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter."""


def stock_model_type(model_type: str) -> str:
    return model_type[len(PRUNED_PREFIX):] if model_type.startswith(PRUNED_PREFIX) else model_type


def adapter_for(model_or_config) -> DecoderAdapter:
    """The adapter of a model (or config); an unsupported architecture raises listing the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    adapter = ADAPTERS.get(model_type or "")
    if adapter is None:
        supported = ", ".join(sorted(mt for mt in ADAPTERS if not mt.startswith(PRUNED_PREFIX)))
        raise UnsupportedArchitectureError(
            f"hf_pruning has no adapter for model_type {model_type!r}; supported: {supported}. "
            "A new architecture is one adapter file in hf_pruning/remote/ plus one line in ADAPTER_CLASSES."
        )
    return adapter


def inspect_model(model: nn.Module) -> list[LayerState]:
    """The structural state of every decoder layer."""
    adapter = adapter_for(model)
    hidden = adapter.hidden_size(model.config)
    return [adapter.inspect_layer(layer, hidden) for layer in adapter.decoder_layers(model)]


def simulate_plan(model: nn.Module, plan: PruningPlan, states: list[LayerState] | None = None) -> list[LayerState]:
    """Validate every op against the model without touching it; return the predicted final layer states."""
    adapter = adapter_for(model)
    states = inspect_model(model) if states is None else states
    for i, op in enumerate(plan.ops):
        try:
            states = adapter.simulate(states, op)
        except PlanError as err:
            raise PlanError(f"op #{i} ({op.name}): {err}") from None
    return states


def base_fields(config) -> dict:
    """The config fields that plan ops change, as they are now (the replay starting point)."""
    layer_types = getattr(config, "layer_types", None)
    return {
        "num_hidden_layers": int(config.num_hidden_layers),
        "layer_types": list(layer_types) if layer_types is not None else None,
    }


def execute_ops_(model: nn.Module, ops: list[Op], replay: bool = False) -> None:
    """Run ops in order. ``replay=True`` rebuilds shapes only (weights come from a checkpoint next)."""
    adapter = adapter_for(model)
    hidden = adapter.hidden_size(model.config)
    for op in ops:
        if replay and not op.needs_replay():
            continue
        if op.name == "remove_layers":
            adapter.remove_layers_(model, op.layers)
            continue
        layer = adapter.decoder_layers(model)[op.layer]
        if op.name == "remove_heads":
            adapter.remove_heads_(layer, op.heads)
        elif op.name == "drop_attention":
            adapter.drop_attention_(layer)
        elif op.name == "drop_mlp":
            adapter.drop_mlp_(layer, hidden)
        elif op.name == "value_only_attention":
            adapter.value_only_attention_(layer)
        elif op.name == "shrink_mlp":
            adapter.shrink_mlp_(layer, op.keep, op.bias, None if replay else op.tensors.get("bias"))
        elif op.name == "scale_output":
            adapter.scale_output_(layer, op.sublayer, op.alpha)
        elif op.name == "add_linear":
            fused = adapter.add_linear_(
                layer,
                op,
                None if replay else _required(op, "weight"),
                None if replay else op.tensors.get("bias"),
            )
            if not replay:
                op.fused = fused
        else:  # pragma: no cover - the plan parser only builds known ops
            raise PlanError(f"unknown op {op.name!r}")


def _required(op: AddLinear, key: str):
    value = op.tensors.get(key)
    if value is None:
        raise PlanError(f"{op.name}: op.tensors[{key!r}] is missing; pass the tensor when building the op")
    return value


def replay_plan_(model: nn.Module, plan: PruningPlan) -> None:
    """Rebuild a pruned architecture from its base config (used by the saved model's ``__init__``)."""
    simulate_plan(model, PruningPlan(ops=[op for op in plan.ops if op.needs_replay()]))
    execute_ops_(model, plan.ops, replay=True)


def attentionless_layers(model: nn.Module) -> list[int]:
    """Indices of decoder layers that take no KV cache (dropped or value-only attention)."""
    return [i for i, s in enumerate(inspect_model(model)) if not s.has_attention]


def prepare_cache(model: nn.Module, cache) -> None:
    """Give attention-less layers cache slots that store nothing (see hf_pruning_modules)."""
    if cache is not None:
        prepare_cache_for_attentionless_layers(cache, attentionless_layers(model), model.config.num_hidden_layers)
