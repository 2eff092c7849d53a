"""Gemma2 adapter: four norms per layer (sandwich norms around each sublayer), sliding/full ``layer_types``.

RMSNorm is scale invariant, so a scale or compensation on a sublayer's output goes after the post-sublayer
norm: a scalar folds into that norm's gain (``x * (1 + w)``), a matrix becomes an added module.
"""

from .hf_pruning_adapter_base import DecoderAdapter


class Gemma2Adapter(DecoderAdapter):
    model_types = ("gemma2",)
    arch = "gemma2"
    attn_norm_names = ("input_layernorm",)
    mlp_norm_names = ("pre_feedforward_layernorm",)
    attn_out_norm = "post_attention_layernorm"
    mlp_out_norm = "post_feedforward_layernorm"
    norm_weight_offset = 1.0
