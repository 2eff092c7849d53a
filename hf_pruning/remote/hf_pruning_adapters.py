"""Architecture adapters: execute plan ops on a live decoder model by slicing its real weights.

An adapter knows where an architecture keeps its layers, projections and norms; it never knows about
methods. ``DecoderAdapter`` holds all the surgery; each architecture is one small subclass below that sets
names and flags, listed once in ``ADAPTER_CLASSES`` (the Pruned* config and model classes are generated from
that table). Every plan op is one method ``<op name>_(model, op, tensors)``, used by pruning and by reloading
alike. Copied next to saved weights: imports only torch and siblings.
"""

from __future__ import annotations

import torch
from torch import nn

from .hf_pruning_modules import (
    EmptyProjection,
    NoAttention,
    ValueOnlyAttention,
    ZeroMLP,
    ZeroProjection,
    add_output_bias_,
    attach_output_linear,
    head_rows,
    left_multiply_,
    own_numel,
    scale_linear_,
    scale_norm_gain_,
    slice_linear_,
    zero_heads_,
)
from .hf_pruning_state import LayerState, head_layout, set_config_fields

#: attributes of an attention module that its decoder layer or the model read (Gemma3 picks the RoPE table by
#: ``is_sliding`` on transformers 4.x): a replacement module carries them over
_ATTENTION_FLAGS = ("head_dim", "is_sliding", "sliding_window", "attention_type")


def _optional(name: str | None) -> tuple[str, ...]:
    """``(name,)``, or ``()`` when the architecture has no such module."""
    return (name,) if name else ()


class DecoderAdapter:
    """Executes plan ops on one architecture. Subclasses set the names below."""

    #: model_type values this adapter serves (``hf_pruning_<arch>`` is added automatically)
    model_types: tuple[str, ...] = ()
    #: the short architecture name of ``hf_pruning_<arch>`` and of the ``PRUNED_*_CLASSES`` keys
    arch: str = ""
    #: the stock classes (names in ``transformers``) that ``Pruned<...>ForCausalLM`` / ``Pruned<...>Config`` extend
    causal_lm: str = ""
    stock_config: str = ""
    attn_name = "self_attn"
    q_name, k_name, v_name, o_name = "q_proj", "k_proj", "v_proj", "o_proj"
    #: per-head-dim norms of queries and keys inside the attention module (Qwen3, Gemma3)
    qk_norm_names: tuple[str, ...] = ()
    #: MLP container attribute on the layer, or None when the projections sit on the layer itself (OPT)
    mlp_name: str | None = "mlp"
    mlp_in_names: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_out_name = "down_proj"
    #: norms that exist only to feed a sublayer (they go when it is dropped)
    attn_norm_names: tuple[str, ...] = ("input_layernorm",)
    mlp_norm_names: tuple[str, ...] = ("post_attention_layernorm",)
    #: a norm applied to the sublayer's output before the residual add (Gemma2/3): scales fold here
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    #: Gemma-style RMSNorm computes x * (offset + weight)
    norm_weight_offset: float = 0.0

    # ----- locating modules ------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def set_decoder_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        model.model.layers = layers

    def attn_norms(self, layer: nn.Module) -> tuple[str, ...]:
        """Every norm that goes when the attention sublayer is dropped (input and output side)."""
        return self.attn_norm_names + _optional(self.attn_out_norm)

    def mlp_norms(self, layer: nn.Module) -> tuple[str, ...]:
        return self.mlp_norm_names + _optional(self.mlp_out_norm)

    def residual_norms(self, layer: nn.Module) -> tuple[str, ...]:
        """Norms on the residual stream itself: they stay when a sublayer is dropped."""
        return ()

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn_name)

    def mlp_container(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_name) if self.mlp_name else layer

    def head_dim(self, attn: nn.Module) -> int:
        return int(attn.head_dim)

    def hidden_size(self, model_or_layer_config) -> int:
        return int(model_or_layer_config.hidden_size)

    def out_norm(self, layer: nn.Module, sublayer: str) -> nn.Module:
        return getattr(layer, self.attn_out_norm if sublayer == "attention" else self.mlp_out_norm)

    def uses_norm_target(self, sublayer: str) -> bool:
        """True when a sublayer's output passes a norm before the residual add (scales fold into its gain)."""
        return (self.attn_out_norm if sublayer == "attention" else self.mlp_out_norm) is not None

    def output_linear(self, layer: nn.Module, sublayer: str) -> nn.Linear:
        if sublayer == "attention":
            attn = self.attention(layer)
            return getattr(attn, getattr(attn, "out_name", self.o_name))
        return getattr(self.mlp_container(layer), self.mlp_out_name)

    # ----- inspection ------------------------------------------------------------------------------------
    def _inspect_attention(self, attn: nn.Module) -> dict:
        if isinstance(attn, NoAttention):
            return dict(attention="none", q_heads=0, kv_heads=0, head_dim=getattr(attn, "head_dim", 0),
                        qkv_bias=False, o_bias=False)
        if isinstance(attn, ValueOnlyAttention):
            hd, v, o = attn.head_dim, attn.v_proj, getattr(attn, attn.out_name)
            return dict(attention="value_only", q_heads=0, kv_heads=v.out_features // hd, head_dim=hd,
                        qkv_bias=v.bias is not None, o_bias=o.bias is not None)
        hd = self.head_dim(attn)
        q, k, o = getattr(attn, self.q_name), getattr(attn, self.k_name), getattr(attn, self.o_name)
        return dict(attention="full", q_heads=q.out_features // hd, kv_heads=k.out_features // hd, head_dim=hd,
                    qkv_bias=q.bias is not None, o_bias=o.bias is not None,
                    qk_norm_params=sum(own_numel(getattr(attn, n)) for n in self.qk_norm_names))

    def _inspect_mlp(self, mlp: nn.Module) -> dict:
        out = getattr(mlp, self.mlp_out_name) if not isinstance(mlp, ZeroMLP) else None
        if out is None or isinstance(out, ZeroProjection):
            return dict(mlp="none", mlp_width=0, mlp_in_bias=False, mlp_out_bias=False)
        first_in = getattr(mlp, self.mlp_in_names[0])
        return dict(mlp="full", mlp_width=out.in_features, mlp_in_bias=first_in.bias is not None,
                    mlp_out_bias=out.bias is not None)

    def inspect_layer(self, layer: nn.Module, hidden: int) -> LayerState:
        def norms(names):
            return sum(own_numel(getattr(layer, n)) for n in names)

        def compensation(norm_name):  # an unfused add_linear attached to a post-sublayer norm
            norm = getattr(layer, norm_name, None) if norm_name else None
            comp = getattr(norm, "compensation", None)
            return sum(p.numel() for p in comp.parameters()) if comp is not None else 0

        return LayerState(
            **self._inspect_attention(self.attention(layer)),
            **self._inspect_mlp(self.mlp_container(layer)),
            hidden=hidden,
            attn_norm_params=norms(self.attn_norms(layer)),
            mlp_norm_params=norms(self.mlp_norms(layer)),
            n_mlp_in=len(self.mlp_in_names),
            attn_extra=compensation(self.attn_out_norm),
            mlp_extra=compensation(self.mlp_out_norm),
            fixed_params=norms(self.residual_norms(layer)),
        )

    # ----- the op table: one method per op, ``<op name>_(model, op, tensors)``; ``tensors`` is {} on replay --
    def remove_layers_(self, model: nn.Module, op, tensors: dict) -> None:
        gone = set(op.layers)
        kept = [layer for i, layer in enumerate(self.decoder_layers(model)) if i not in gone]
        for new_idx, layer in enumerate(kept):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx
        self.set_decoder_layers(model, nn.ModuleList(kept))
        layer_types = getattr(model.config, "layer_types", None)
        new_types = [t for i, t in enumerate(layer_types) if i not in gone] if layer_types is not None else None
        set_config_fields(model.config, num_hidden_layers=len(kept), layer_types=new_types)

    def remove_heads_(self, model: nn.Module, op, tensors: dict) -> None:
        self.remove_heads_in_(self.decoder_layers(model)[op.layer], op.heads)

    def drop_attention_(self, model: nn.Module, op, tensors: dict) -> None:
        self.drop_attention_in_(self.decoder_layers(model)[op.layer])

    def value_only_attention_(self, model: nn.Module, op, tensors: dict) -> None:
        self.value_only_attention_in_(self.decoder_layers(model)[op.layer])

    def drop_mlp_(self, model: nn.Module, op, tensors: dict) -> None:
        self.drop_mlp_in_(self.decoder_layers(model)[op.layer], self.hidden_size(model.config))

    def shrink_mlp_(self, model: nn.Module, op, tensors: dict) -> None:
        self.shrink_mlp_in_(self.decoder_layers(model)[op.layer], op.keep, op.bias, tensors.get("bias"))

    def scale_output_(self, model: nn.Module, op, tensors: dict) -> None:
        self.scale_output_in_(self.decoder_layers(model)[op.layer], op.sublayer, op.alpha)

    def add_linear_(self, model: nn.Module, op, tensors: dict) -> None:
        """Sets ``op.fused``: True when folded into existing weights, False when a module or bias was added."""
        layer = self.decoder_layers(model)[op.layer]
        op.fused = self.add_linear_in_(layer, op.sublayer, op.bias, tensors.get("weight"), tensors.get("bias"))

    # ----- surgery on one decoder layer (methods also use these on detached copies of a layer) -------------
    def remove_heads_in_(self, layer: nn.Module, heads: list[int]) -> None:
        attn = self.attention(layer)
        hd = self.head_dim(attn)
        q, k, v, o = (getattr(attn, n) for n in (self.q_name, self.k_name, self.v_name, self.o_name))
        q_src, kv_src = head_layout(q.out_features // hd, k.out_features // hd, heads)
        dev = q.weight.device
        q_rows = head_rows(hd, [h if h is not None else 0 for h in q_src], dev)
        kv_rows = head_rows(hd, kv_src, dev)
        slice_linear_(q, out_idx=q_rows)
        slice_linear_(k, out_idx=kv_rows)
        slice_linear_(v, out_idx=kv_rows)
        slice_linear_(o, in_idx=q_rows)
        # q/k norms act on one head_dim vector, shared by all heads: they stay as they are
        pads = [i for i, h in enumerate(q_src) if h is None]
        if pads:  # padding heads: zero query rows and zero output columns
            zero_heads_(q, o, head_rows(hd, pads, dev))
        if hasattr(attn, "num_key_value_groups"):  # keep what attention code reads in step with the shapes
            attn.num_key_value_groups = len(q_src) // len(kv_src)
        for name, value in (("num_heads", len(q_src)), ("num_attention_heads", len(q_src)),
                            ("num_key_value_heads", len(kv_src))):
            if hasattr(attn, name):
                setattr(attn, name, value)

    def drop_attention_in_(self, layer: nn.Module) -> None:
        attn = self.attention(layer)
        new = NoAttention(attn.layer_idx)
        _carry_flags(attn, new)
        new.head_dim = getattr(attn, "head_dim", 0)
        setattr(layer, self.attn_name, new)
        for name in self.attn_norms(layer):
            setattr(layer, name, nn.Identity())

    def value_only_attention_in_(self, layer: nn.Module) -> None:
        """Q, K and their norms go; the query heads of each KV group fold into ``o_proj``'s columns."""
        attn = self.attention(layer)
        hd = self.head_dim(attn)
        v, o = getattr(attn, self.v_name), getattr(attn, self.o_name)
        nq, nkv = o.in_features // hd, v.out_features // hd
        # o: [d, nq*hd] -> [d, nkv, rep, hd] -> sum over the query heads of each KV group -> [d, nkv*hd]
        w = o.weight.data
        fused = w.reshape(w.shape[0], nkv, nq // nkv, hd).sum(dim=2).reshape(w.shape[0], nkv * hd)
        o.weight = nn.Parameter(fused.contiguous(), requires_grad=o.weight.requires_grad)
        o.in_features = nkv * hd
        new = ValueOnlyAttention(v, o, attn.layer_idx, out_name=self.o_name)
        _carry_flags(attn, new)
        new.head_dim = hd
        setattr(layer, self.attn_name, new)

    def drop_mlp_in_(self, layer: nn.Module, hidden: int) -> None:
        if self.mlp_name:
            setattr(layer, self.mlp_name, ZeroMLP())
        else:
            for name in self.mlp_in_names:
                setattr(layer, name, EmptyProjection())
            setattr(layer, self.mlp_out_name, ZeroProjection(hidden))
        for name in self.mlp_norms(layer):
            setattr(layer, name, nn.Identity())

    def shrink_mlp_in_(self, layer: nn.Module, keep: list[int], bias: bool, bias_values: torch.Tensor | None) -> None:
        mlp = self.mlp_container(layer)
        out = getattr(mlp, self.mlp_out_name)
        idx = torch.tensor(keep, dtype=torch.long, device=out.weight.device)
        for name in self.mlp_in_names:
            slice_linear_(getattr(mlp, name), out_idx=idx)
        slice_linear_(out, in_idx=idx)
        if bias:
            add_output_bias_(out, bias_values)

    def scale_output_in_(self, layer: nn.Module, sublayer: str, alpha: float) -> None:
        if not self.uses_norm_target(sublayer):
            scale_linear_(self.output_linear(layer, sublayer), alpha)
            return
        norm = self.out_norm(layer, sublayer)
        comp = getattr(norm, "compensation", None)
        if comp is not None:  # the contribution is comp(norm(x)): scale the compensation
            scale_linear_(comp, alpha)
            return
        scale_norm_gain_(norm, alpha, self.norm_weight_offset)  # RMSNorm is scale invariant

    def add_linear_in_(self, layer: nn.Module, sublayer: str, bias: bool, weight: torch.Tensor | None,
                       bias_values: torch.Tensor | None) -> bool:
        """Apply ``f -> weight @ f + bias`` to a sublayer's contribution. Returns True when fused.

        ``weight`` None (a replay) rebuilds the shapes only: the checkpoint fills in the values.
        """
        if self.uses_norm_target(sublayer):
            norm = self.out_norm(layer, sublayer)
            d = norm.weight.shape[0]
            lin = nn.Linear(d, d, bias=bias, device=norm.weight.device, dtype=norm.weight.dtype)
            if weight is not None:
                lin.weight.data.copy_(weight)
            if bias:
                lin.bias.data.copy_(bias_values if bias_values is not None else torch.zeros(d))
            attach_output_linear(norm, lin)
            return False
        lin = self.output_linear(layer, sublayer)
        fused = lin.bias is not None or not bias
        if weight is not None:
            left_multiply_(lin, weight)
        if bias:
            add_output_bias_(lin, bias_values)
        return fused


def _carry_flags(old: nn.Module, new: nn.Module) -> None:
    for name in _ATTENTION_FLAGS:
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))


# ===== the architectures: one entry each ====================================================================
class LlamaAdapter(DecoderAdapter):
    """LLaMA: pre-norm decoder, gated MLP, GQA attention with optional biases."""

    model_types, arch, causal_lm, stock_config = ("llama",), "llama", "LlamaForCausalLM", "LlamaConfig"


class MistralAdapter(DecoderAdapter):
    """Mistral: the LLaMA layout; the sliding window lives in the attention module and is kept."""

    model_types, arch, causal_lm, stock_config = ("mistral",), "mistral", "MistralForCausalLM", "MistralConfig"


class Qwen2Adapter(DecoderAdapter):
    """Qwen2: the LLaMA layout with q/k/v biases (sliced with their rows) and per-layer ``layer_types``."""

    model_types, arch, causal_lm, stock_config = ("qwen2",), "qwen2", "Qwen2ForCausalLM", "Qwen2Config"


class Qwen3Adapter(DecoderAdapter):
    """Qwen3: the LLaMA layout plus per-head-dim RMSNorms on queries and keys (``q_norm``, ``k_norm``)."""

    model_types, arch, causal_lm, stock_config = ("qwen3",), "qwen3", "Qwen3ForCausalLM", "Qwen3Config"
    qk_norm_names = ("q_norm", "k_norm")


class Gemma2Adapter(DecoderAdapter):
    """Gemma2: four norms per layer (sandwich norms around each sublayer), sliding/full ``layer_types``.

    RMSNorm is scale invariant, so a scale or compensation on a sublayer's output goes after the
    post-sublayer norm: a scalar folds into that norm's gain (``x * (1 + w)``), a matrix becomes an added module.
    """

    model_types, arch, causal_lm, stock_config = ("gemma2",), "gemma2", "Gemma2ForCausalLM", "Gemma2Config"
    mlp_norm_names = ("pre_feedforward_layernorm",)
    attn_out_norm = "post_attention_layernorm"
    mlp_out_norm = "post_feedforward_layernorm"
    norm_weight_offset = 1.0


class Gemma3Adapter(Gemma2Adapter):
    """Gemma3 text models: Gemma2's four norms per layer plus q/k norms; sliding and global attention layers."""

    model_types, arch, causal_lm, stock_config = ("gemma3_text",), "gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig"
    qk_norm_names = ("q_norm", "k_norm")


class OPTAdapter(DecoderAdapter):
    """OPT: ``fc1``/``fc2`` on the layer itself, ``out_proj``, biases everywhere, no GQA.

    In the post-LayerNorm variant (``do_layer_norm_before=False``, OPT-350m) the norms sit on the residual
    stream after the add, so dropping a sublayer keeps them; in the pre-LN variant they feed the sublayer.
    """

    model_types, arch, causal_lm, stock_config = ("opt",), "opt", "OPTForCausalLM", "OPTConfig"
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


#: every supported architecture, once; the Pruned* classes and the model_type lookup are built from it
ADAPTER_CLASSES: tuple[type[DecoderAdapter], ...] = (
    LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Gemma2Adapter, Gemma3Adapter, OPTAdapter,
)
PRUNED_PREFIX = "hf_pruning_"


def pruned_class_names(adapter_cls: type[DecoderAdapter]) -> tuple[str, str]:
    """(config class name, model class name) of an architecture's pruned classes: ``Pruned<Arch>Config``,
    ``Pruned<Arch>ForCausalLM``; saved ``config.json`` files name them in ``auto_map``, so they never change."""
    stem = adapter_cls.causal_lm.removesuffix("ForCausalLM")
    return f"Pruned{stem}Config", f"Pruned{adapter_cls.causal_lm}"
