"""Mistral adapter: the LLaMA layout; the sliding window lives in the attention module and is kept."""

from .hf_pruning_adapter_base import DecoderAdapter


class MistralAdapter(DecoderAdapter):
    model_types = ("mistral",)
    arch = "mistral"
