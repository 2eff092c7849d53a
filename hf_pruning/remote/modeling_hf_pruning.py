"""Structurally pruned causal LMs: the stock model classes plus a replay of the pruning plan.

``__init__`` builds the base architecture, then replays the plan's structural ops (on the meta device inside
``from_pretrained``, so it costs nothing) so that the shapes match the checkpoint before weights load.
``forward`` gives attention-less layers KV-cache slots that store nothing. Copied next to saved weights:
imports only torch, transformers and siblings.
"""

from __future__ import annotations

import inspect

from transformers import (
    Gemma2ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    OPTForCausalLM,
    Qwen2ForCausalLM,
)
from transformers.cache_utils import DynamicCache

from .configuration_hf_pruning import (
    PrunedGemma2Config,
    PrunedLlamaConfig,
    PrunedMistralConfig,
    PrunedOPTConfig,
    PrunedQwen2Config,
)
from .hf_pruning_plan import PruningPlan
from .hf_pruning_surgery import base_fields, prepare_cache, replay_plan_


def _set_fields(config, fields: dict) -> None:
    if fields.get("layer_types") is not None:
        object.__setattr__(config, "layer_types", list(fields["layer_types"]))
    object.__setattr__(config, "num_hidden_layers", int(fields["num_hidden_layers"]))


class PrunedCausalLMMixin:
    """Shared by every ``Pruned<Arch>ForCausalLM``: replay in ``__init__``, cache slots in ``forward``."""

    def __init__(self, config, *args, **kwargs):
        plan = PruningPlan.from_dict(getattr(config, "pruning_plan", None))
        final = base_fields(config)
        if plan.base:
            _set_fields(config, plan.base)
        super().__init__(config, *args, **kwargs)
        replay_plan_(self, plan)
        rebuilt = base_fields(self.config)
        if rebuilt != final:
            raise ValueError(
                f"replaying pruning_plan gave {rebuilt}, but config.json says {final}; the checkpoint's config "
                "was edited by hand or written by an incompatible version"
            )

    @classmethod
    def _cache_arg_name(cls) -> str:
        params = inspect.signature(super().forward).parameters  # type: ignore[misc]
        return "cache" if "cache" in params else "past_key_values"

    def forward(self, *args, **kwargs):
        name = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.get(name)
        use_cache = kwargs.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache and len(args) <= 3:
            try:
                cache = DynamicCache(config=self.config)
            except TypeError:  # transformers without config-aware caches
                cache = DynamicCache()
            kwargs[self._cache_arg_name()] = cache
        prepare_cache(self, cache)
        return super().forward(*args, **kwargs)


class PrunedLlamaForCausalLM(PrunedCausalLMMixin, LlamaForCausalLM):
    config_class = PrunedLlamaConfig


class PrunedMistralForCausalLM(PrunedCausalLMMixin, MistralForCausalLM):
    config_class = PrunedMistralConfig


class PrunedQwen2ForCausalLM(PrunedCausalLMMixin, Qwen2ForCausalLM):
    config_class = PrunedQwen2Config


class PrunedGemma2ForCausalLM(PrunedCausalLMMixin, Gemma2ForCausalLM):
    config_class = PrunedGemma2Config


class PrunedOPTForCausalLM(PrunedCausalLMMixin, OPTForCausalLM):
    config_class = PrunedOPTConfig


PRUNED_MODEL_CLASSES = {
    "llama": PrunedLlamaForCausalLM,
    "mistral": PrunedMistralForCausalLM,
    "qwen2": PrunedQwen2ForCausalLM,
    "gemma2": PrunedGemma2ForCausalLM,
    "opt": PrunedOPTForCausalLM,
}

for _cls in PRUNED_MODEL_CLASSES.values():
    _cls.register_for_auto_class("AutoModelForCausalLM")
