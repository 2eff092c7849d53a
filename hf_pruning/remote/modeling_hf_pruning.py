"""Structurally pruned causal LMs: the stock model classes plus a replay of the pruning plan.

``__init__`` builds the base architecture, then replays the plan's structural ops (on the meta device inside
``from_pretrained``, so it costs nothing) so that the shapes match the checkpoint before weights load.
``forward`` gives attention-less layers KV-cache slots that store nothing. Copied next to saved weights:
imports only torch, transformers and siblings.
"""

from __future__ import annotations

import functools
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

# transformers < 5 copies only the files this module imports DIRECTLY into its dynamic-module cache, so
# every sibling is imported here, even those only the surgery module uses (a test checks the list).
from .hf_pruning_adapter_base import DecoderAdapter, _set_config_fields  # noqa: F401
from .hf_pruning_adapter_gemma2 import Gemma2Adapter  # noqa: F401
from .hf_pruning_adapter_llama import LlamaAdapter  # noqa: F401
from .hf_pruning_adapter_mistral import MistralAdapter  # noqa: F401
from .hf_pruning_adapter_opt import OPTAdapter  # noqa: F401
from .hf_pruning_adapter_qwen2 import Qwen2Adapter  # noqa: F401
from .hf_pruning_modules import NoAttention  # noqa: F401
from .hf_pruning_plan import PruningPlan
from .hf_pruning_surgery import base_fields, prepare_cache, replay_plan_


class PrunedCausalLMMixin:
    """Shared by every ``Pruned<Arch>ForCausalLM``: replay in ``__init__``, cache slots in ``forward``."""

    def __init__(self, config, *args, **kwargs):
        plan = PruningPlan.from_dict(getattr(config, "pruning_plan", None))
        final = base_fields(config)
        if plan.base:
            _set_config_fields(config, plan.base["num_hidden_layers"], plan.base.get("layer_types"))
        super().__init__(config, *args, **kwargs)
        replay_plan_(self, plan)
        rebuilt = base_fields(self.config)
        if rebuilt != final:
            raise ValueError(
                f"replaying pruning_plan gave {rebuilt}, but config.json says {final}; the checkpoint's config "
                "was edited by hand or written by an incompatible version"
            )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """The stock loader, made strict: a weight the replayed architecture lacks or expects is an error.

        A checkpoint whose ``pruning_plan`` was edited (an op lost or added) would otherwise load with some
        weights freshly initialised and the rest silently dropped.
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {key: sorted(info.get(key) or []) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {key: names for key, names in problems.items() if names}
        if problems:
            listed = "; ".join(f"{key.replace('_', ' ')}: {', '.join(map(str, names[:5]))}"
                               + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
                               for key, names in problems.items())
            raise ValueError(
                f"the checkpoint's weights do not match the architecture its pruning_plan describes ({listed}); "
                "config.json was edited by hand or the weights come from another save: save the model again "
                "with hf_pruning, or restore the original config.json"
            )
        return (model, info) if want_info else model

    def __init_subclass__(cls, **kwargs):
        """Give each subclass a forward with the stock signature (generate inspects it)."""
        super().__init_subclass__(**kwargs)
        stock_forward = cls.__mro__[cls.__mro__.index(PrunedCausalLMMixin) + 1].forward
        cache_name = "cache" if "cache" in inspect.signature(stock_forward).parameters else "past_key_values"

        def forward(self, *args, **kw):
            return self._forward_with_prepared_cache(stock_forward, cache_name, *args, **kw)

        cls.forward = functools.update_wrapper(forward, stock_forward)

    def _forward_with_prepared_cache(self, stock_forward, cache_name: str, *args, **kwargs):
        name = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.get(name)
        use_cache = kwargs.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache and len(args) <= 3:  # the cache is the 4th positional argument
            try:
                cache = DynamicCache(config=self.config)
            except TypeError:  # transformers without config-aware caches
                cache = DynamicCache()
            kwargs[cache_name] = cache
        prepare_cache(self, cache)
        return stock_forward(self, *args, **kwargs)


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
