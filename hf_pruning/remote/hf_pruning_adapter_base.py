"""Architecture adapters: execute plan ops on a live decoder model by slicing its real weights.

An adapter knows where an architecture keeps its layers, projections and norms; it never knows about
methods. The subclasses (one file per architecture) only set names and a few flags. Copied next to saved
weights: imports only torch and siblings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .hf_pruning_modules import (
    EmptyProjection,
    NoAttention,
    ValueOnlyAttention,
    ZeroMLP,
    ZeroProjection,
    attach_output_linear,
)
from .hf_pruning_plan import PlanError


@dataclass(frozen=True)
class LayerState:
    """What a decoder layer looks like, enough to validate ops and count parameters without touching it."""

    attention: str  # "full" | "value_only" | "none"
    q_heads: int
    kv_heads: int
    head_dim: int
    mlp: str  # "full" | "none"
    mlp_width: int
    hidden: int
    qkv_bias: bool
    o_bias: bool
    mlp_in_bias: bool
    mlp_out_bias: bool
    attn_norm_params: int  # parameters of the norms that go when attention is dropped
    mlp_norm_params: int  # parameters of the norms that go when the MLP is dropped
    n_mlp_in: int  # 2 for gated MLPs (gate, up), 1 for OPT's fc1
    attn_extra: int = 0  # parameters of an unfused compensation after the attention sublayer
    mlp_extra: int = 0  # same after the MLP sublayer
    fixed_params: int = 0  # norms on the residual stream that stay whatever is dropped (OPT post-LN)

    def num_params(self) -> int:
        """Parameters of this layer (decoder-layer linears, biases, norms and added modules)."""
        d, hd = self.hidden, self.head_dim
        n = self.attn_extra + self.mlp_extra + self.fixed_params
        if self.attention == "full":
            n += d * self.q_heads * hd * 2 + d * self.kv_heads * hd * 2  # q, o, k, v
            n += (self.q_heads + 2 * self.kv_heads) * hd if self.qkv_bias else 0
        elif self.attention == "value_only":
            n += d * self.kv_heads * hd * 2  # v, fused o
            n += self.kv_heads * hd if self.qkv_bias else 0
        if self.attention != "none":
            n += d if self.o_bias else 0
            n += self.attn_norm_params
        if self.mlp == "full":
            w = self.mlp_width
            n += self.n_mlp_in * d * w + w * d
            n += self.n_mlp_in * w if self.mlp_in_bias else 0
            n += d if self.mlp_out_bias else 0
            n += self.mlp_norm_params
        return n

    @property
    def has_attention(self) -> bool:
        """True when the layer computes attention over other tokens (it needs a KV cache slot)."""
        return self.attention == "full"

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        return 2 * self.kv_heads * self.head_dim * bytes_per_element if self.has_attention else 0


def _numel(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _own_numel(module: nn.Module) -> int:
    """Parameters of a norm, not counting an attached compensation."""
    return sum(p.numel() for n, p in module.named_parameters() if not n.startswith("compensation."))


def _index(rows_per_head: int, heads: list[int], device) -> torch.Tensor:
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


class DecoderAdapter:
    """Executes plan ops on one architecture. Subclasses set the names below."""

    #: model_type values this adapter serves (the stock one; ``hf_pruning_<arch>`` is added automatically)
    model_types: tuple[str, ...] = ()
    #: the short architecture name used in class names and ``hf_pruning_<arch>``
    arch: str = ""
    attn_name = "self_attn"
    q_name, k_name, v_name, o_name = "q_proj", "k_proj", "v_proj", "o_proj"
    #: MLP container attribute on the layer, or None when the projections sit on the layer itself (OPT)
    mlp_name: str | None = "mlp"
    mlp_in_names: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_out_name = "down_proj"
    #: norms that exist only to feed a sublayer (they go when it is dropped)
    attn_norm_names: tuple[str, ...] = ("input_layernorm",)
    mlp_norm_names: tuple[str, ...] = ("post_attention_layernorm",)
    #: a norm applied to the sublayer's output before the residual add (Gemma2): scales fold here
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
        return self.attn_norm_names

    def mlp_norms(self, layer: nn.Module) -> tuple[str, ...]:
        return self.mlp_norm_names

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

    # ----- inspection ------------------------------------------------------------------------------------
    def inspect_layer(self, layer: nn.Module, hidden: int) -> LayerState:
        attn = self.attention(layer)
        mlp = self.mlp_container(layer)
        if isinstance(attn, NoAttention):
            kind, nq, nkv, hd, qkv_bias, o_bias = "none", 0, 0, getattr(attn, "head_dim", 0), False, False
        elif isinstance(attn, ValueOnlyAttention):
            hd = attn.head_dim
            v, o = attn.v_proj, getattr(attn, attn.out_name)
            kind, nkv, qkv_bias, o_bias = "value_only", v.out_features // hd, v.bias is not None, o.bias is not None
            nq = 0
        else:
            hd = self.head_dim(attn)
            q, k, o = getattr(attn, self.q_name), getattr(attn, self.k_name), getattr(attn, self.o_name)
            kind, nq, nkv = "full", q.out_features // hd, k.out_features // hd
            qkv_bias, o_bias = q.bias is not None, o.bias is not None
        out = getattr(mlp, self.mlp_out_name) if not isinstance(mlp, ZeroMLP) else None
        if out is None or isinstance(out, ZeroProjection):
            mkind, width, in_bias, out_bias = "none", 0, False, False
        else:
            first_in = getattr(mlp, self.mlp_in_names[0])
            mkind, width, in_bias, out_bias = "full", out.in_features, first_in.bias is not None, out.bias is not None
        def comp(norm_name):
            return _numel(getattr(getattr(layer, norm_name, None), "compensation", None)) if norm_name else 0

        return LayerState(
            attention=kind,
            q_heads=nq,
            kv_heads=nkv,
            head_dim=hd,
            mlp=mkind,
            mlp_width=width,
            hidden=hidden,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_in_bias=in_bias,
            mlp_out_bias=out_bias,
            attn_norm_params=sum(_own_numel(getattr(layer, n)) for n in self.attn_norms(layer) + self._opt(self.attn_out_norm)),
            mlp_norm_params=sum(_own_numel(getattr(layer, n)) for n in self.mlp_norms(layer) + self._opt(self.mlp_out_norm)),
            n_mlp_in=len(self.mlp_in_names),
            attn_extra=comp(self.attn_out_norm),
            mlp_extra=comp(self.mlp_out_norm),
            fixed_params=sum(_own_numel(getattr(layer, n)) for n in self.residual_norms(layer)),
        )

    @staticmethod
    def _opt(name: str | None) -> tuple[str, ...]:
        return (name,) if name else ()

    # ----- simulation (validation before any surgery) ----------------------------------------------------
    def simulate(self, states: list[LayerState], op) -> list[LayerState]:
        """Return the layer states after ``op``, or raise PlanError naming the problem and the fix."""
        name = op.name
        n = len(states)
        if name == "remove_layers":
            bad = [i for i in op.layers if not 0 <= i < n]
            if bad:
                raise PlanError(f"remove_layers: layer index(es) {bad} out of range; the model has {n} decoder layers (0..{n - 1})")
            if len(op.layers) >= n:
                raise PlanError(f"remove_layers would remove all {n} decoder layers; keep at least one")
            return [s for i, s in enumerate(states) if i not in set(op.layers)]
        layer = op.layer
        if not 0 <= layer < n:
            raise PlanError(f"{name}: layer {layer} out of range; the model has {n} decoder layers (0..{n - 1})")
        s = states[layer]
        out = list(states)
        if name == "remove_heads":
            if s.attention != "full":
                raise PlanError(f"remove_heads: layer {layer} has no regular attention left (it is '{s.attention}')")
            bad = [h for h in op.heads if not 0 <= h < s.q_heads]
            if bad:
                raise PlanError(f"remove_heads: head index(es) {bad} out of range; layer {layer} has {s.q_heads} query heads (0..{s.q_heads - 1})")
            if len(op.heads) >= s.q_heads:
                raise PlanError(f"remove_heads would remove every head of layer {layer}; use drop_attention for that layer instead")
            nq, nkv = self.heads_after_removal(s, op.heads)
            out[layer] = replace(s, q_heads=nq, kv_heads=nkv)
        elif name in ("drop_attention", "value_only_attention"):
            if s.attention == "none" or (name == "value_only_attention" and s.attention != "full"):
                raise PlanError(f"{name}: layer {layer} attention is already '{s.attention}'; the op cannot apply to it")
            if name == "drop_attention":
                out[layer] = replace(s, attention="none", q_heads=0, kv_heads=0, qkv_bias=False, o_bias=False, attn_extra=0)
            else:
                out[layer] = replace(s, attention="value_only", q_heads=0)
        elif name in ("drop_mlp", "shrink_mlp"):
            if s.mlp == "none":
                raise PlanError(f"{name}: layer {layer} has no MLP left (it was dropped)")
            if name == "drop_mlp":
                out[layer] = replace(s, mlp="none", mlp_width=0, mlp_in_bias=False, mlp_out_bias=False, mlp_extra=0)
            else:
                bad = [c for c in op.keep if not 0 <= c < s.mlp_width]
                if bad:
                    raise PlanError(f"shrink_mlp: channel index(es) {bad[:5]} out of range; layer {layer} MLP has {s.mlp_width} channels")
                out[layer] = replace(s, mlp_width=len(op.keep), mlp_out_bias=s.mlp_out_bias or op.bias)
        elif name in ("scale_output", "add_linear"):
            present = s.attention != "none" if op.sublayer == "attention" else s.mlp != "none"
            if not present:
                raise PlanError(f"{name}: layer {layer} has no {op.sublayer} sublayer left (it was dropped)")
            if name == "add_linear":
                out[layer] = self._simulate_add_linear(s, op)
        else:  # pragma: no cover - the plan parser only builds known ops
            raise PlanError(f"adapter {type(self).__name__} cannot execute op {name!r}")
        return out

    def heads_after_removal(self, s: LayerState, heads: list[int]) -> tuple[int, int]:
        """(query heads, KV heads) after removing ``heads`` (padding heads included, see ``_head_layout``)."""
        q_src, kv_src = self._head_layout(s.q_heads, s.kv_heads, heads)
        return len(q_src), len(kv_src)

    def _simulate_add_linear(self, s: LayerState, op) -> LayerState:
        d = s.hidden
        if self.uses_norm_target(op.sublayer):
            if (s.attn_extra if op.sublayer == "attention" else s.mlp_extra):
                raise PlanError(
                    f"add_linear: layer {op.layer} {op.sublayer} already carries a compensation; combine the two "
                    "matrices (W2 @ W1) into one add_linear"
                )
            added = d * d + (d if op.bias else 0)
            if op.sublayer == "attention":
                return replace(s, attn_extra=s.attn_extra + added)
            return replace(s, mlp_extra=s.mlp_extra + added)
        has_bias = s.o_bias if op.sublayer == "attention" else s.mlp_out_bias
        if op.bias and not has_bias:
            return replace(s, o_bias=True) if op.sublayer == "attention" else replace(s, mlp_out_bias=True)
        return s

    # ----- heads ---------------------------------------------------------------------------------------
    @staticmethod
    def _head_layout(nq: int, nkv: int, remove: list[int]) -> tuple[list[int | None], list[int]]:
        """The new head layout: source query head of each new query head (None = zero padding head), and
        source KV head of each new KV head.

        Query head ``j`` reads KV head ``j // (nq // nkv)``. A KV group left without query heads goes with
        them. When the remaining groups keep different numbers of query heads (uneven removal), each group
        is padded with zero query heads (zero ``q`` rows, zero ``o_proj`` columns: they contribute exactly
        nothing) up to the largest group, so the stock ``repeat_kv`` layout stays exact and no KV head is
        duplicated: the KV cache shrinks only by the removed groups, never grows.
        """
        rep = nq // nkv
        gone = set(remove)
        groups = [[h for h in range(g * rep, (g + 1) * rep) if h not in gone] for g in range(nkv)]
        width = max(len(heads) for heads in groups)
        q_src: list[int | None] = []
        kv_src: list[int] = []
        for g, heads in enumerate(groups):
            if heads:
                q_src += heads + [None] * (width - len(heads))
                kv_src.append(g)
        return q_src, kv_src

    def remove_heads_(self, layer: nn.Module, heads: list[int]) -> None:
        attn = self.attention(layer)
        hd = self.head_dim(attn)
        q, k, v, o = (getattr(attn, n) for n in (self.q_name, self.k_name, self.v_name, self.o_name))
        nq, nkv = q.out_features // hd, k.out_features // hd
        q_src, kv_src = self._head_layout(nq, nkv, heads)
        dev = q.weight.device
        q_rows = _index(hd, [h if h is not None else 0 for h in q_src], dev)
        kv_rows = _index(hd, kv_src, dev)
        slice_linear_(q, out_idx=q_rows)
        slice_linear_(k, out_idx=kv_rows)
        slice_linear_(v, out_idx=kv_rows)
        slice_linear_(o, in_idx=q_rows)
        pads = [i for i, h in enumerate(q_src) if h is None]
        if pads:  # padding heads: zero query rows and zero output columns
            pad_rows = _index(hd, pads, dev)
            q.weight.data[pad_rows] = 0
            if q.bias is not None:
                q.bias.data[pad_rows] = 0
            o.weight.data[:, pad_rows] = 0
        self._set_head_counts(attn, len(q_src), len(kv_src))

    def _set_head_counts(self, attn: nn.Module, nq: int, nkv: int) -> None:
        """Keep the attributes that attention code reads in step with the new shapes."""
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = nq // nkv
        for name, value in (("num_heads", nq), ("num_attention_heads", nq), ("num_key_value_heads", nkv)):
            if hasattr(attn, name):
                setattr(attn, name, value)

    # ----- sublayers -----------------------------------------------------------------------------------
    def _drop_norms(self, layer: nn.Module, names: tuple[str, ...]) -> None:
        for name in names:
            setattr(layer, name, nn.Identity())

    def drop_attention_(self, layer: nn.Module) -> None:
        attn = self.attention(layer)
        new = NoAttention(attn.layer_idx)
        new.head_dim = getattr(attn, "head_dim", 0)
        setattr(layer, self.attn_name, new)
        self._drop_norms(layer, self.attn_norms(layer) + self._opt(self.attn_out_norm))

    def drop_mlp_(self, layer: nn.Module, hidden: int) -> None:
        if self.mlp_name:
            setattr(layer, self.mlp_name, ZeroMLP())
        else:
            for name in self.mlp_in_names:
                setattr(layer, name, EmptyProjection())
            setattr(layer, self.mlp_out_name, ZeroProjection(hidden))
        self._drop_norms(layer, self.mlp_norms(layer) + self._opt(self.mlp_out_norm))

    def value_only_attention_(self, layer: nn.Module) -> None:
        attn = self.attention(layer)
        hd = self.head_dim(attn)
        v, o = getattr(attn, self.v_name), getattr(attn, self.o_name)
        nq, nkv = o.in_features // hd, v.out_features // hd
        rep = nq // nkv
        # o: [d, nq*hd] -> [d, nkv, rep, hd] -> sum over the query heads of each KV group -> [d, nkv*hd]
        w = o.weight.data
        fused = w.reshape(w.shape[0], nkv, rep, hd).sum(dim=2).reshape(w.shape[0], nkv * hd)
        o.weight = nn.Parameter(fused.contiguous(), requires_grad=o.weight.requires_grad)
        o.in_features = nkv * hd
        new = ValueOnlyAttention(v, o, attn.layer_idx, out_name=self.o_name)
        new.head_dim = hd
        setattr(layer, self.attn_name, new)

    def shrink_mlp_(self, layer: nn.Module, keep: list[int], bias: bool, bias_values: torch.Tensor | None) -> None:
        mlp = self.mlp_container(layer)
        out = getattr(mlp, self.mlp_out_name)
        idx = torch.tensor(keep, dtype=torch.long, device=out.weight.device)
        for name in self.mlp_in_names:
            slice_linear_(getattr(mlp, name), out_idx=idx)
        slice_linear_(out, in_idx=idx)
        if bias:
            self._add_output_bias(out, bias_values)

    @staticmethod
    def _add_output_bias(linear: nn.Linear, values: torch.Tensor | None) -> None:
        """Add ``values`` ([out]) to a linear's bias, creating a zero bias first when it has none."""
        w = linear.weight
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        if values is not None:
            linear.bias.data += values.to(device=w.device, dtype=torch.float32).to(w.dtype)

    # ----- folding -------------------------------------------------------------------------------------
    def uses_norm_target(self, sublayer: str) -> bool:
        return (self.attn_out_norm if sublayer == "attention" else self.mlp_out_norm) is not None

    def output_linear(self, layer: nn.Module, sublayer: str) -> nn.Linear:
        if sublayer == "attention":
            attn = self.attention(layer)
            return getattr(attn, getattr(attn, "out_name", self.o_name))
        return getattr(self.mlp_container(layer), self.mlp_out_name)

    def scale_output_(self, layer: nn.Module, sublayer: str, alpha: float) -> None:
        if self.uses_norm_target(sublayer):
            # RMSNorm is scale invariant: scale its gain instead, x * (c + w) -> x * alpha * (c + w)
            norm = getattr(layer, self.attn_out_norm if sublayer == "attention" else self.mlp_out_norm)
            comp = getattr(norm, "compensation", None)
            if comp is not None:  # the contribution is comp(norm(x)): scale the compensation
                self._scale_linear(comp, alpha)
                return
            c = self.norm_weight_offset
            norm.weight.data = ((norm.weight.data.double() + c) * alpha - c).to(norm.weight.dtype)
            return
        self._scale_linear(self.output_linear(layer, sublayer), alpha)

    @staticmethod
    def _scale_linear(lin: nn.Linear, alpha: float) -> None:
        lin.weight.data = (lin.weight.data.double() * alpha).to(lin.weight.dtype)
        if lin.bias is not None:
            lin.bias.data = (lin.bias.data.double() * alpha).to(lin.bias.dtype)

    def add_linear_(self, layer: nn.Module, op, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
        """Apply ``f -> weight @ f + bias`` to a sublayer's contribution. Returns True when fused."""
        if self.uses_norm_target(op.sublayer):
            norm = getattr(layer, self.attn_out_norm if op.sublayer == "attention" else self.mlp_out_norm)
            ref = norm.weight
            d = ref.shape[0]
            lin = nn.Linear(d, d, bias=op.bias, device=ref.device, dtype=ref.dtype)
            if weight is not None:
                lin.weight.data.copy_(weight)
            if op.bias:
                lin.bias.data.copy_(bias if bias is not None else torch.zeros(d))
            attach_output_linear(norm, lin)
            return False
        lin = self.output_linear(layer, op.sublayer)
        fused = lin.bias is not None or not op.bias
        if weight is not None:  # real values (in replay the checkpoint provides them)
            m = weight.to(device=lin.weight.device, dtype=torch.float64)  # [d, d]
            lin.weight.data = (m @ lin.weight.data.double()).to(lin.weight.dtype)  # [d, d] @ [d, in]
            if lin.bias is not None:
                lin.bias.data = (m @ lin.bias.data.double()).to(lin.bias.dtype)
        if op.bias:
            self._add_output_bias(lin, bias)
        return fused

    # ----- whole layers --------------------------------------------------------------------------------
    def remove_layers_(self, model: nn.Module, remove: list[int]) -> None:
        layers = self.decoder_layers(model)
        gone = set(remove)
        kept = [layer for i, layer in enumerate(layers) if i not in gone]
        for new_idx, layer in enumerate(kept):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx
        self.set_decoder_layers(model, nn.ModuleList(kept))
        config = model.config
        layer_types = getattr(config, "layer_types", None)
        new_types = [t for i, t in enumerate(layer_types) if i not in gone] if layer_types is not None else None
        _set_config_fields(config, num_hidden_layers=len(kept), layer_types=new_types)


def _set_config_fields(config, num_hidden_layers: int, layer_types: list[str] | None) -> None:
    """Set the layer count (and per-layer types) together, tolerating configs that validate on assignment."""
    if layer_types is not None:
        object.__setattr__(config, "layer_types", list(layer_types))
    object.__setattr__(config, "num_hidden_layers", int(num_hidden_layers))
