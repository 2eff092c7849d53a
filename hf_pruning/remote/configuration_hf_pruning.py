"""Configurations of structurally pruned models (``model_type`` ``hf_pruning_<arch>``).

A pruned model's ``config.json`` describes the final architecture where a config field can (fewer layers,
sliced ``layer_types``) and carries ``pruning_plan``: the ops that turn the base architecture
(``pruning_plan["base"]``) into the pruned one. Per-layer shapes live only in the plan (transformers' configs
reject per-layer head counts). Copied next to saved weights: imports only transformers and siblings.
"""

from __future__ import annotations

import re

import transformers
from transformers import Gemma2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

#: the oldest transformers the saved code runs on (tested in CI with a second virtualenv)
MIN_TRANSFORMERS = (4, 57)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


if _version_tuple(transformers.__version__) < MIN_TRANSFORMERS:
    raise ImportError(
        f"this pruned model needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))}, found "
        f"{transformers.__version__}; upgrade with: pip install -U 'transformers>={'.'.join(map(str, MIN_TRANSFORMERS))}'"
    )


class PrunedLlamaConfig(LlamaConfig):
    model_type = "hf_pruning_llama"


class PrunedMistralConfig(MistralConfig):
    model_type = "hf_pruning_mistral"


class PrunedQwen2Config(Qwen2Config):
    model_type = "hf_pruning_qwen2"


class PrunedGemma2Config(Gemma2Config):
    model_type = "hf_pruning_gemma2"


class PrunedOPTConfig(OPTConfig):
    model_type = "hf_pruning_opt"


PRUNED_CONFIG_CLASSES = {
    "llama": PrunedLlamaConfig,
    "mistral": PrunedMistralConfig,
    "qwen2": PrunedQwen2Config,
    "gemma2": PrunedGemma2Config,
    "opt": PrunedOPTConfig,
}

for _cls in PRUNED_CONFIG_CLASSES.values():
    _cls.register_for_auto_class()
