"""Small modules that replace pruned sublayers, the in-place weight edits of surgery, and the KV-cache
adjustment for attention-less layers.

Copied next to saved weights: imports only torch and transformers. Each module keeps the state-dict key
names of what it replaces (``o_proj.weight`` stays ``o_proj.weight``) so that PEFT target names and the
checkpoint layout keep working.
"""

from __future__ import annotations

import torch
from torch import nn


class NoAttention(nn.Module):
    """A dropped attention sublayer: contributes zeros and never touches the KV cache."""

    has_attention = False

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        # hidden_states: [B, T, d] -> zeros [B, T, d]; second item mirrors (attn_output, attn_weights)
        return torch.zeros_like(hidden_states), None


class ValueOnlyAttention(nn.Module):
    """HARP's value-only attention: each token attends only to itself.

    ``o_proj(repeat_kv(v_proj(x)))`` with the repeat folded into ``o_proj`` (its input columns of the query
    heads sharing one KV head are summed), so ``o_proj`` maps ``n_kv * head_dim -> d``. No RoPE, no softmax,
    no KV cache.
    """

    has_attention = False

    def __init__(self, v_proj: nn.Linear, o_proj: nn.Linear, layer_idx: int, out_name: str = "o_proj"):
        super().__init__()
        self.layer_idx = layer_idx
        self.out_name = out_name
        self.v_proj = v_proj
        self.add_module(out_name, o_proj)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        # [B, T, d] -> v: [B, T, n_kv*hd] -> [B, T, d]
        return getattr(self, self.out_name)(self.v_proj(hidden_states)), None


class ZeroMLP(nn.Module):
    """A dropped MLP sublayer: contributes zeros."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class EmptyProjection(nn.Module):
    """Stands in for an input projection of a dropped MLP whose layer calls it directly (OPT's ``fc1``)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[..., :0]  # [..., d] -> [..., 0]


class ZeroProjection(nn.Module):
    """Stands in for the output projection of a dropped MLP (OPT's ``fc2``): zeros of width ``out_features``."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], self.out_features)


# ---------------------------------------------------------------------------------------------------------
# In-place weight edits
# ---------------------------------------------------------------------------------------------------------
def head_rows(rows_per_head: int, heads: list[int], device) -> torch.Tensor:
    """Row indices of whole heads: [len(heads) * rows_per_head]."""
    idx = torch.tensor(heads, dtype=torch.long, device=device)
    return (idx[:, None] * rows_per_head + torch.arange(rows_per_head, device=device)[None, :]).reshape(-1)


def slice_linear_(linear: nn.Linear, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None):
    """Keep rows ``out_idx`` (outputs) and columns ``in_idx`` (inputs) of a linear, in place."""
    w = linear.weight  # [out, in]
    grad = w.requires_grad
    new_w = w.data
    if out_idx is not None:
        new_w = new_w.index_select(0, out_idx.to(new_w.device))
        if linear.bias is not None:
            linear.bias = nn.Parameter(
                linear.bias.data.index_select(0, out_idx.to(new_w.device)), requires_grad=linear.bias.requires_grad
            )
    if in_idx is not None:
        new_w = new_w.index_select(1, in_idx.to(new_w.device))
    linear.weight = nn.Parameter(new_w.contiguous(), requires_grad=grad)
    linear.out_features, linear.in_features = new_w.shape
    return linear


def add_output_bias_(linear: nn.Linear, values: torch.Tensor | None) -> None:
    """Add ``values`` ([out]) to a linear's bias, creating a zero bias first when it has none."""
    w = linear.weight
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    if values is not None:
        linear.bias.data += values.to(device=w.device, dtype=torch.float32).to(w.dtype)


def scale_linear_(lin: nn.Linear, alpha: float) -> None:
    """Multiply a linear's output by ``alpha`` (weight and bias), computed in float64."""
    lin.weight.data = (lin.weight.data.double() * alpha).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.data.double() * alpha).to(lin.bias.dtype)


def zero_heads_(q: nn.Linear, o: nn.Linear, rows: torch.Tensor) -> None:
    """Make heads contribute nothing: zero query rows ``rows`` (and their bias) and the same columns of ``o``."""
    q.weight.data[rows] = 0
    if q.bias is not None:
        q.bias.data[rows] = 0
    o.weight.data[:, rows] = 0


def left_multiply_(lin: nn.Linear, m: torch.Tensor) -> None:
    """Fold ``y -> m @ y`` into a linear (weight and bias), computed in float64."""
    m = m.to(device=lin.weight.device, dtype=torch.float64)  # [d, d]
    lin.weight.data = (m @ lin.weight.data.double()).to(lin.weight.dtype)  # [d, d] @ [d, in]
    if lin.bias is not None:
        lin.bias.data = (m @ lin.bias.data.double()).to(lin.bias.dtype)


def scale_norm_gain_(norm: nn.Module, alpha: float, offset: float) -> None:
    """Scale an RMSNorm's output by ``alpha`` through its gain: x * (c + w) -> x * alpha * (c + w)."""
    norm.weight.data = ((norm.weight.data.double() + offset) * alpha - offset).to(norm.weight.dtype)


def own_numel(module: nn.Module) -> int:
    """Parameters of a module (a norm), not counting an attached compensation."""
    return sum(p.numel() for n, p in module.named_parameters() if not n.startswith("compensation."))


# ---------------------------------------------------------------------------------------------------------
# Compensations that cannot fold into a weight
# ---------------------------------------------------------------------------------------------------------
class _OutputCompensation:
    """Mixin: apply the attached ``compensation`` linear to the module's output."""

    def forward(self, *args, **kwargs):
        return self.compensation(super().forward(*args, **kwargs))


_COMPENSATED_CLASSES: dict[type, type] = {}


def attach_output_linear(module: nn.Module, linear: nn.Linear) -> nn.Module:
    """Make ``module`` return ``linear(module(x))`` in place, keeping its own parameter names.

    Used where a compensation cannot fold into an existing weight (after Gemma2's post-sublayer norm). The
    module's class becomes a subclass of its own class, so its forward and state-dict keys are unchanged and
    only ``<name>.compensation.weight`` (and ``.bias``) are added.
    """
    base = type(module)
    if issubclass(base, _OutputCompensation):
        raise ValueError(f"{base.__name__} already carries a compensation")
    cls = _COMPENSATED_CLASSES.get(base)
    if cls is None:
        cls = type(f"Compensated{base.__name__}", (_OutputCompensation, base), {})
        _COMPENSATED_CLASSES[base] = cls
    module.__class__ = cls
    module.add_module("compensation", linear)
    return module


# ---------------------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------------------
try:  # transformers >= 5.23: a cache layer that stores nothing and that prefetching and masks skip
    from transformers.cache_utils import DummyLayer as _CacheLayerBase
except ImportError:  # older transformers
    _CacheLayerBase = object


class _MirrorLayer(_CacheLayerBase):
    """The cache slot of an attention-less layer: stores nothing, reports a real attention layer's length.

    A subclass of transformers' ``DummyLayer`` where it exists, so offloading and masks skip it; it adds the
    length queries ``DummyLayer`` does not answer on every release (transformers 5.25 reads
    ``layers[0].get_seq_length()`` for positions, 5.23 redirected that call to the first attention layer).
    """

    is_sliding = False
    is_compileable = True  # holds no tensors; a cache is compileable (static) only when all its layers are
    is_croppable = True
    is_initialized = True
    supports_early_init = False

    def __init__(self, cache, source_idx: int | None):
        self._cache = cache
        self._source_idx = source_idx
        self.keys = None
        self.values = None

    def _source(self):
        if self._source_idx is None or self._source_idx >= len(self._cache.layers):
            return None
        return self._cache.layers[self._source_idx]

    def get_seq_length(self, *args, **kwargs) -> int:
        source = self._source()
        return 0 if source is None else source.get_seq_length()

    def get_mask_sizes(self, query_length: int, *args, **kwargs):
        source = self._source()
        if source is None:
            return query_length, 0
        return source.get_mask_sizes(query_length, *args, **kwargs)

    def get_max_length(self) -> int:
        source = self._source()
        return -1 if source is None else source.get_max_length()

    def update(self, key_states=None, value_states=None, *args, **kwargs):
        if key_states is None and value_states is None:  # DDP's cache reconstruction passes (None, None)
            return None, None
        raise RuntimeError("hf_pruning: an attention-less layer was asked to store KV states")

    def reset(self): ...
    def crop(self, *args, **kwargs): ...
    def reorder_cache(self, *args, **kwargs): ...
    def batch_repeat_interleave(self, *args, **kwargs): ...
    def batch_select_indices(self, *args, **kwargs): ...
    def offload(self): ...
    def prefetch(self): ...


def prepare_cache_for_attentionless_layers(cache, attentionless: list[int], num_layers: int) -> None:
    """Give every attention-less layer a cache slot that stores nothing and does not break lengths.

    Idempotent; a cache without per-layer slots (legacy tuples) is left alone.
    """
    layers = getattr(cache, "layers", None)
    if layers is None or not attentionless:
        return
    if len(layers) < num_layers:
        # lazily grown caches: pad with the cache's own layer class so indices line up
        layer_cls = getattr(cache, "layer_class_to_replicate", None)
        if layer_cls is None:
            return
        while len(layers) < num_layers:
            layers.append(layer_cls())
    skip = set(attentionless)
    source = next((i for i in range(num_layers) if i not in skip), None)
    for idx in attentionless:
        if idx < len(layers) and not isinstance(layers[idx], _MirrorLayer):
            layers[idx] = _MirrorLayer(cache, source)
