"""Structurally pruned causal LMs: the stock model classes plus a replay of the pruning plan.

``__init__`` builds the base architecture, then replays the plan's structural ops (on the meta device inside
``from_pretrained``, so it costs nothing) so that the shapes match the checkpoint before weights load.
``forward`` gives attention-less layers KV-cache slots that store nothing. Copied next to saved weights:
imports only torch, transformers and siblings.
"""

from __future__ import annotations

import functools
import inspect

import transformers
from transformers.cache_utils import DynamicCache

from .configuration_hf_pruning import PRUNED_CONFIG_CLASSES

# transformers < 5 copies only the files this module imports DIRECTLY into its dynamic-module cache, so
# every sibling is imported here, even those only the surgery module uses (a test checks the list).
from .hf_pruning_adapters import ADAPTER_CLASSES, pruned_class_names
from .hf_pruning_modules import NoAttention  # noqa: F401
from .hf_pruning_plan import PruningPlan
from .hf_pruning_state import set_config_fields
from .hf_pruning_surgery import base_fields, prepare_cache, replay_plan_


class PrunedCausalLMMixin:
    """Shared by every ``Pruned<Arch>ForCausalLM``: replay in ``__init__``, cache slots in ``forward``."""

    def __init__(self, config, *args, **kwargs):
        plan = PruningPlan.from_dict(getattr(config, "pruning_plan", None))
        final = base_fields(config)
        if plan.base:
            set_config_fields(config, plan.base["num_hidden_layers"], plan.base.get("layer_types"))
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


def _pruned_model_class(adapter_cls) -> type:
    """``Pruned<Arch>ForCausalLM``: the mixin over the stock class, defined as a real name of this module (saved
    ``config.json`` files name it in ``auto_map``)."""
    name = pruned_class_names(adapter_cls)[1]
    stock = getattr(transformers, adapter_cls.causal_lm)
    return type(name, (PrunedCausalLMMixin, stock), {
        "config_class": PRUNED_CONFIG_CLASSES[adapter_cls.arch], "__module__": __name__, "__qualname__": name,
        "__doc__": f"{stock.__name__} with its pruning plan replayed on construction (hf_pruning).",
    })


#: arch -> ``Pruned<Arch>ForCausalLM``, one per entry of ADAPTER_CLASSES (each also a module-level name)
PRUNED_MODEL_CLASSES: dict[str, type] = {}
for _adapter in ADAPTER_CLASSES:
    _cls = PRUNED_MODEL_CLASSES[_adapter.arch] = globals()[pruned_class_names(_adapter)[1]] = _pruned_model_class(_adapter)
    _cls.register_for_auto_class("AutoModelForCausalLM")
