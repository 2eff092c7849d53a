"""LLaMA adapter: pre-norm decoder, gated MLP, GQA attention with optional biases."""

from .hf_pruning_adapter_base import DecoderAdapter


class LlamaAdapter(DecoderAdapter):
    model_types = ("llama",)
    arch = "llama"
