"""Executes a pruning plan on a live model: the one code path shared by ``prune_`` and by reloading.

Copied next to saved weights: imports only torch, transformers and siblings.
"""

from __future__ import annotations

import logging

from torch import nn

from .hf_pruning_adapters import ADAPTER_CLASSES, PRUNED_PREFIX, DecoderAdapter
from .hf_pruning_modules import prepare_cache_for_attentionless_layers
from .hf_pruning_plan import Op, PlanError, PruningPlan
from .hf_pruning_state import LayerState, simulate_op

logger = logging.getLogger(__name__)

#: model_type (stock and ``hf_pruning_<arch>``) -> adapter, built from ADAPTER_CLASSES
ADAPTERS: dict[str, DecoderAdapter] = {}
for _cls in ADAPTER_CLASSES:
    _adapter = _cls()  # one instance serves the stock and the pruned model_type
    for _mt in (*_cls.model_types, PRUNED_PREFIX + _cls.arch):
        ADAPTERS[_mt] = _adapter


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter."""


def adapter_for(model_or_config) -> DecoderAdapter:
    """The adapter of a model (or config); an unsupported architecture raises listing the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    adapter = ADAPTERS.get(model_type or "")
    if adapter is None:
        supported = ", ".join(sorted(mt for cls in ADAPTER_CLASSES for mt in cls.model_types))
        raise UnsupportedArchitectureError(
            f"hf_pruning has no adapter for model_type {model_type!r}; supported: {supported}. A new architecture "
            "is one adapter class in hf_pruning/remote/hf_pruning_adapters.py listed in ADAPTER_CLASSES there "
            "(the recipe: 'Adding an architecture' in the docs)."
        )
    return adapter


def stock_model_type(model_type: str) -> str:
    """The stock model_type of a pruned one (``hf_pruning_gemma3`` -> ``gemma3_text``); others unchanged."""
    adapter = ADAPTERS.get(model_type)
    return adapter.model_types[0] if adapter is not None else model_type


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
            states = simulate_op(adapter, states, op)
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
    """Run ops in order, each by its adapter method ``<op name>_``. ``replay=True`` rebuilds shapes only (the
    weights come from a checkpoint next), so ops get no tensors and folded ops are skipped."""
    adapter = adapter_for(model)
    for op in ops:
        if replay and not op.needs_replay():
            continue
        if not replay:
            for key, (_, required) in op.tensor_specs().items():
                if required and op.tensors.get(key) is None:
                    raise PlanError(f"{op.name}: op.tensors[{key!r}] is missing; pass the tensor when building the op")
        getattr(adapter, op.name + "_")(model, op, {} if replay else op.tensors)


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
