"""Configurations of structurally pruned models (``model_type`` ``hf_pruning_<arch>``).

A pruned model's ``config.json`` describes the final architecture where a config field can (fewer layers,
sliced ``layer_types``) and carries ``pruning_plan``: the ops that turn the base architecture
(``pruning_plan["base"]``) into the pruned one. Per-layer shapes live only in the plan (transformers' configs
reject per-layer head counts). Copied next to saved weights: imports only transformers and siblings.
"""

from __future__ import annotations

import re

import transformers

#: the oldest transformers the saved code runs on (tested in CI with a second virtualenv)
MIN_TRANSFORMERS = (4, 57)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


if _version_tuple(transformers.__version__) < MIN_TRANSFORMERS:
    raise ImportError(
        f"this pruned model needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))}, found "
        f"{transformers.__version__}; upgrade with: pip install -U 'transformers>={'.'.join(map(str, MIN_TRANSFORMERS))}'"
    )


# the sibling imports below come after the version check (they need a recent transformers); transformers < 5
# copies only the files a remote module imports DIRECTLY into its dynamic-module cache, so every sibling the
# adapters need is imported here too (a test checks the list)
from .hf_pruning_adapters import ADAPTER_CLASSES, PRUNED_PREFIX, pruned_class_names  # noqa: E402
from .hf_pruning_modules import NoAttention  # noqa: E402, F401
from .hf_pruning_plan import PruningPlan  # noqa: E402, F401
from .hf_pruning_state import LayerState  # noqa: E402, F401


def _pruned_config_class(adapter_cls) -> type:
    """``Pruned<Arch>Config``: the stock config class with ``model_type`` ``hf_pruning_<arch>``, defined as a real
    name of this module (saved ``config.json`` files name it in ``auto_map``)."""
    name = pruned_class_names(adapter_cls)[0]
    stock = getattr(transformers, adapter_cls.stock_config)
    return type(name, (stock,), {"model_type": PRUNED_PREFIX + adapter_cls.arch, "__module__": __name__,
                                 "__qualname__": name, "__doc__": f"{stock.__name__} of a structurally pruned model."})


#: arch -> ``Pruned<Arch>Config``, one per entry of ADAPTER_CLASSES (each also a module-level name)
PRUNED_CONFIG_CLASSES: dict[str, type] = {}
for _adapter in ADAPTER_CLASSES:
    _cls = PRUNED_CONFIG_CLASSES[_adapter.arch] = globals()[pruned_class_names(_adapter)[0]] = _pruned_config_class(_adapter)
    _cls.register_for_auto_class()
