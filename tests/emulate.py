"""An independent reference for plan ops: emulate them on an UNPRUNED copy with hooks and zeroed weights.

Nothing here uses hf_pruning's adapters: module names are written out per architecture, so a test that
compares a pruned model with its emulation checks the surgery against a separate implementation.
"""

from __future__ import annotations

import torch
from torch import nn

#: where each sublayer's residual contribution leaves the layer: (module attr path, output is a tuple)
CONTRIBUTION = {
    "llama": {"attention": ("self_attn", True), "mlp": ("mlp", False)},
    "mistral": {"attention": ("self_attn", True), "mlp": ("mlp", False)},
    "qwen2": {"attention": ("self_attn", True), "mlp": ("mlp", False)},
    "qwen3": {"attention": ("self_attn", True), "mlp": ("mlp", False)},
    "gemma2": {"attention": ("post_attention_layernorm", False), "mlp": ("post_feedforward_layernorm", False)},
    "gemma3": {"attention": ("post_attention_layernorm", False), "mlp": ("post_feedforward_layernorm", False)},
    "opt": {"attention": ("self_attn", True), "mlp": ("fc2", False)},
}


def arch_family(model) -> str:
    return model.config.model_type.replace("hf_pruning_", "").replace("gemma3_text", "gemma3")


def layers_of(model) -> nn.ModuleList:
    return model.model.decoder.layers if arch_family(model) == "opt" else model.model.layers


def _map_output(module: nn.Module, is_tuple: bool, fn) -> None:
    def hook(mod, args, output):
        if is_tuple:
            return (fn(output[0]), *output[1:])
        return fn(output)

    module.register_forward_hook(hook)


class Emulator:
    """Applies plan ops (JSON dicts, plus tensors) to an unpruned model by hooks and weight zeroing."""

    def __init__(self, model):
        self.model = model
        self.arch = arch_family(model)
        cfg = model.config
        self.layers = list(range(cfg.num_hidden_layers))  # current index -> original layer index
        n_heads = cfg.num_attention_heads
        # original layer -> source of each current query head (an original head, or None for a padding head)
        self.heads = {i: list(range(n_heads)) for i in self.layers}
        self.kv_heads = {i: getattr(cfg, "num_key_value_heads", None) or n_heads for i in self.layers}
        inter = cfg.ffn_dim if self.arch == "opt" else cfg.intermediate_size
        self.channels = {i: list(range(inter)) for i in self.layers}

    def _layer(self, current_idx: int) -> nn.Module:
        return layers_of(self.model)[self.layers[current_idx]]

    def _contribution(self, layer: nn.Module, sublayer: str, fn) -> None:
        name, is_tuple = CONTRIBUTION[self.arch][sublayer]
        _map_output(getattr(layer, name), is_tuple, fn)

    def _attn(self, layer):
        return layer.self_attn

    def _o(self, layer):
        return self._attn(layer).out_proj if self.arch == "opt" else self._attn(layer).o_proj

    def _down(self, layer):
        return layer.fc2 if self.arch == "opt" else layer.mlp.down_proj

    @torch.no_grad()
    def apply(self, op: dict, tensors: dict | None = None) -> None:
        tensors = tensors or {}
        name = op["op"]
        if name == "remove_layers":
            for idx in op["layers"]:
                layer = self._layer(idx)
                layer.register_forward_hook(
                    lambda m, args, kwargs, out: kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                    with_kwargs=True,
                )
            gone = set(op["layers"])
            self.layers = [orig for i, orig in enumerate(self.layers) if i not in gone]
            return
        orig = self.layers[op["layer"]]
        layer = layers_of(self.model)[orig]
        if name == "remove_heads":
            # spec: heads are grouped by KV head; a group left empty goes; the others are padded with
            # zero heads up to the largest group
            hd = self._attn(layer).head_dim
            current, gone = self.heads[orig], set(op["heads"])
            for h in gone:
                if current[h] is not None:
                    self._o(layer).weight[:, current[h] * hd : (current[h] + 1) * hd] = 0
            rep = len(current) // self.kv_heads[orig]
            groups = [[current[j] for j in range(g * rep, (g + 1) * rep) if j not in gone]
                      for g in range(self.kv_heads[orig])]
            groups = [g for g in groups if g]
            width = max(len(g) for g in groups)
            self.heads[orig] = [h for g in groups for h in g + [None] * (width - len(g))]
            self.kv_heads[orig] = len(groups)
        elif name == "drop_attention":
            self._contribution(layer, "attention", torch.zeros_like)
        elif name == "drop_mlp":
            self._contribution(layer, "mlp", torch.zeros_like)
        elif name == "value_only_attention":
            attn = self._attn(layer)
            hd = attn.head_dim
            n_q = self.model.config.num_attention_heads
            n_kv = getattr(self.model.config, "num_key_value_heads", n_q)

            def value_only(mod, args, kwargs, out):
                x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                v = mod.v_proj(x)  # [B, T, n_kv*hd]
                v = v.unflatten(-1, (n_kv, hd)).repeat_interleave(n_q // n_kv, dim=-2).flatten(-2)  # [B, T, n_q*hd]
                o = mod.out_proj if hasattr(mod, "out_proj") else mod.o_proj
                return (o(v), *out[1:])

            # replaces the attention computation itself: earlier scales/compensations on its output still apply
            attn.register_forward_hook(value_only, with_kwargs=True, prepend=True)
        elif name == "shrink_mlp":
            kept = self.channels[orig]
            keep = set(op["keep"])
            down = self._down(layer)
            for i, ch in enumerate(kept):
                if i not in keep:
                    down.weight[:, ch] = 0
            self.channels[orig] = [ch for i, ch in enumerate(kept) if i in keep]
            if op.get("bias") and "bias" in tensors:
                # spec: the bias joins the output projection's bias as given, i.e. after earlier scales; on
                # Gemma2 the projection output still goes through the post-feedforward norm
                b = tensors["bias"]
                if self.arch in ("gemma2", "gemma3"):
                    _map_output(down, False, lambda y, b=b: y + b)
                else:
                    self._contribution(layer, "mlp", lambda y, b=b: y + b)
        elif name == "scale_output":
            alpha = op["alpha"]
            self._contribution(layer, op["sublayer"], lambda y, a=alpha: y * a)
        elif name == "add_linear":
            w, b = tensors["weight"], tensors.get("bias")
            self._contribution(layer, op["sublayer"], lambda y, w=w, b=b: y @ w.T + (b if b is not None else 0))
        else:
            raise ValueError(name)
