"""What each decoder layer of a pruned model is, in the terms serving engines use, and its tensors.

One reader for every export format: :func:`describe` inspects the live model once (shapes only, no weight is
read, so it costs nothing on an offloaded model) and :func:`block_tensors` reads one layer's weights at a time
(onloading an offloaded layer once), as float32 tensors under neutral names. The format writers decide how each
block is expressed (exactly, with padding, or refused); this module refuses only what no format can carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine.offload import onloaded
from ..remote.hf_pruning_surgery import adapter_for, inspect_model, stock_model_type

#: the architectures whose pruned layers a serving engine can express (llama.cpp ``deci``, vLLM ``nemotron-nas``)
EXPORTABLE = ("llama", "mistral", "qwen2")


class ExportError(ValueError):
    """A model, or one op of its plan, that the requested export format cannot carry."""


@dataclass(frozen=True)
class Block:
    """One decoder layer as an engine sees it.

    ``attention`` is ``"full"`` (softmax attention with ``q_heads`` query heads reading ``kv_heads`` KV heads),
    ``"linear"`` (value-only attention: one d x d map of the normed input, no KV cache) or ``"none"``;
    ``mlp_width`` 0 means the MLP was dropped.
    """

    source: int  # the layer's index in the model
    attention: str
    q_heads: int
    kv_heads: int
    mlp_width: int
    qkv_bias: bool
    o_bias: bool  # a bias on the attention output (full or linear)
    mlp_in_bias: bool
    mlp_out_bias: bool

    @property
    def is_identity(self) -> bool:
        """Both sublayers gone: the layer passes the residual stream through unchanged."""
        return self.attention == "none" and self.mlp_width == 0


@dataclass(frozen=True)
class ModelSpec:
    """The whole model as an engine sees it: global sizes and one :class:`Block` per decoder layer."""

    arch: str  # llama | mistral | qwen2
    hidden: int
    head_dim: int
    num_heads: int  # the original number of query heads (engines with a global head count use it)
    num_kv_heads: int
    intermediate_size: int  # the original MLP width
    vocab_size: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    context_length: int
    sliding_window: int | None
    tied_embeddings: bool
    blocks: tuple[Block, ...] = field(default_factory=tuple)

    @property
    def uniform(self) -> bool:
        """Every layer has the original attention and MLP shapes and only the stock biases: a stock class serves it."""
        stock_bias = self.arch == "qwen2"
        return all(
            b.attention == "full" and b.q_heads == self.num_heads and b.kv_heads == self.num_kv_heads
            and b.mlp_width == self.intermediate_size and b.qkv_bias == stock_bias and not b.o_bias
            and not b.mlp_in_bias and not b.mlp_out_bias
            for b in self.blocks
        )


def _rope(config) -> tuple[float, dict | None]:
    """(rope theta, the rope scaling dict or None) from either spelling transformers has used."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    return float(theta), (None if kind == "default" else params)


def describe(model: nn.Module) -> ModelSpec:
    """The engine-level description of ``model`` (a LLaMA, Mistral or Qwen2 model, pruned or not).

    Raises :class:`ExportError` for a PEFT-wrapped model, another architecture or a compensation module that
    is not folded into a weight.
    """
    if hasattr(model, "peft_config"):
        raise ExportError("this is a PEFT model with unmerged adapters; merge them first "
                          "(model = model.merge_and_unload()) and export the merged model")
    config = model.config
    arch = stock_model_type(getattr(config, "model_type", ""))
    if arch not in EXPORTABLE:
        raise ExportError(
            f"export supports {', '.join(EXPORTABLE)} models; this one is {arch!r}. llama.cpp and vLLM have no "
            "architecture with per-layer shapes for it; save it with model.save_pretrained(...) and serve it in "
            "transformers (trust_remote_code=True, or with hf_pruning installed)")
    adapter = adapter_for(model)
    blocks = []
    for i, state in enumerate(inspect_model(model)):
        if state.attn_extra or state.mlp_extra:
            raise ExportError(f"layer {i} carries an unfused compensation module, which no serving format can carry")
        attention = {"full": "full", "value_only": "linear", "none": "none"}[state.attention]
        blocks.append(Block(
            source=i, attention=attention, q_heads=state.q_heads, kv_heads=state.kv_heads,
            mlp_width=state.mlp_width, qkv_bias=state.qkv_bias, o_bias=state.o_bias,
            mlp_in_bias=state.mlp_in_bias, mlp_out_bias=state.mlp_out_bias,
        ))
    heads = int(config.num_attention_heads)
    hidden = adapter.hidden_size(config)
    theta, scaling = _rope(config)
    window = getattr(config, "sliding_window", None)
    if arch == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    return ModelSpec(
        arch=arch, hidden=hidden,
        head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
        num_heads=heads, num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        intermediate_size=int(config.intermediate_size), vocab_size=int(config.vocab_size),
        rms_eps=float(config.rms_norm_eps), rope_theta=theta, rope_scaling=scaling,
        context_length=int(config.max_position_embeddings), sliding_window=int(window) if window else None,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)), blocks=tuple(blocks),
    )


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to("cpu", torch.float32)


def block_tensors(model: nn.Module, block: Block) -> dict[str, torch.Tensor]:
    """One layer's weights as float32 CPU tensors, read once (onloading an offloaded layer).

    Keys: ``attn_norm``, ``q``/``k``/``v``/``o`` (``[out, in]``) and ``q_bias``/``k_bias``/``v_bias``/``o_bias``
    for full attention; ``linear`` (``[d, d]`` = W_o W_v) and ``linear_bias`` (W_o b_v + b_o) for value-only
    attention; ``mlp_norm``, ``gate``/``up`` (``[w, d]``), ``down`` (``[d, w]``) and their biases for the MLP.
    """
    adapter = adapter_for(model)
    layer = adapter.decoder_layers(model)[block.source]
    out: dict[str, torch.Tensor] = {}
    with onloaded(layer), torch.no_grad():
        attn = adapter.attention(layer)
        if block.attention != "none":
            out["attn_norm"] = _f32(getattr(layer, adapter.attn_norm_names[0]).weight)
            o = getattr(attn, getattr(attn, "out_name", adapter.o_name))
            if block.attention == "full":
                for key, name in (("q", adapter.q_name), ("k", adapter.k_name), ("v", adapter.v_name)):
                    lin = getattr(attn, name)
                    out[key] = _f32(lin.weight)
                    if lin.bias is not None:
                        out[f"{key}_bias"] = _f32(lin.bias)
                out["o"] = _f32(o.weight)
                if o.bias is not None:
                    out["o_bias"] = _f32(o.bias)
            else:  # value-only: o(v(x)) = (W_o W_v) x + (W_o b_v + b_o), formed in float64
                v = attn.v_proj
                wo = o.weight.detach().to("cpu", torch.float64)  # [d, n_kv*hd]
                out["linear"] = (wo @ v.weight.detach().to("cpu", torch.float64)).float()  # [d, d]
                bias = torch.zeros(wo.shape[0], dtype=torch.float64)
                if v.bias is not None:
                    bias += wo @ v.bias.detach().to("cpu", torch.float64)
                if o.bias is not None:
                    bias += o.bias.detach().to("cpu", torch.float64)
                if v.bias is not None or o.bias is not None:
                    out["linear_bias"] = bias.float()
        if block.mlp_width:
            out["mlp_norm"] = _f32(getattr(layer, adapter.mlp_norm_names[0]).weight)
            mlp = adapter.mlp_container(layer)
            for key, name in (("gate", adapter.mlp_in_names[0]), ("up", adapter.mlp_in_names[1]),
                              ("down", adapter.mlp_out_name)):
                lin = getattr(mlp, name)
                out[key] = _f32(lin.weight)
                if lin.bias is not None:
                    out[f"{key}_bias"] = _f32(lin.bias)
    return out


def model_tensors(model: nn.Module, group: str) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder layers, one group at a time: ``"embed"`` -> ``embed``; ``"final"`` ->
    ``final_norm`` and (when not tied) ``lm_head``."""
    inner = model.model
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if group == "embed":
            with onloaded(inner.embed_tokens):
                out["embed"] = _f32(inner.embed_tokens.weight)
            return out
        with onloaded(inner.norm):
            out["final_norm"] = _f32(inner.norm.weight)
        if not getattr(model.config, "tie_word_embeddings", False):
            with onloaded(model.lm_head):
                out["lm_head"] = _f32(model.lm_head.weight)
    return out
