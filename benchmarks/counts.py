"""What a row measures on the model itself: non-zero parameters (removal by masks and by surgery alike) and KV
bytes per token. The one benchmark module that reads the model's layers through the library's adapters."""

from __future__ import annotations

import torch

from hf_pruning.remote.hf_pruning_surgery import adapter_for, inspect_model


def decoder_params(model) -> int:
    """Parameters of the decoder layers as their shapes say (masked weights count)."""
    return sum(s.num_params() for s in inspect_model(model))


def nonzero(module) -> int:
    """Non-zero parameters (tied tensors once): removal by masks and by surgery both show up here."""
    return sum(int(torch.count_nonzero(p)) for p in module.parameters())


def decoder_nonzero(model) -> int:
    """Non-zero parameters of the decoder layers."""
    return nonzero(adapter_for(model).decoder_layers(model))


def decoder_layer_count(model) -> int:
    return len(adapter_for(model).decoder_layers(model))


def kv_per_token(model) -> int:
    """KV cache bytes per token in float32."""
    return sum(s.kv_bytes_per_token(4) for s in inspect_model(model))
