"""Qwen2 adapter: the LLaMA layout with q/k/v biases (sliced with their rows) and per-layer ``layer_types``."""

from .hf_pruning_adapter_base import DecoderAdapter


class Qwen2Adapter(DecoderAdapter):
    model_types = ("qwen2",)
    arch = "qwen2"
