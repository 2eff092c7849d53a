"""OPT adapter: ``fc1``/``fc2`` on the layer itself, ``out_proj``, biases everywhere, no GQA.

In the post-LayerNorm variant (``do_layer_norm_before=False``, OPT-350m) the norms sit on the residual stream
after the add, so dropping a sublayer keeps them; in the pre-LN variant they feed the sublayer and go with it.
"""

from .hf_pruning_adapter_base import DecoderAdapter


class OPTAdapter(DecoderAdapter):
    model_types = ("opt",)
    arch = "opt"
    o_name = "out_proj"
    mlp_name = None
    mlp_in_names = ("fc1",)
    mlp_out_name = "fc2"

    def decoder_layers(self, model):
        return model.model.decoder.layers

    def set_decoder_layers(self, model, layers):
        model.model.decoder.layers = layers

    def attn_norms(self, layer):
        return ("self_attn_layer_norm",) if layer.do_layer_norm_before else ()

    def mlp_norms(self, layer):
        return ("final_layer_norm",) if layer.do_layer_norm_before else ()

    def residual_norms(self, layer):
        return () if layer.do_layer_norm_before else ("self_attn_layer_norm", "final_layer_norm")
