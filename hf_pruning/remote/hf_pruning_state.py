"""What a decoder layer looks like (``LayerState``) and what each plan op does to it (the simulation).

The simulation validates a whole plan before any weight is touched and predicts parameter counts. It is one
function per op, found by the op's name in ``SIMULATIONS`` (the executor finds the adapter method the same
way: ``<op name>_``). Copied next to saved weights: imports only the standard library and siblings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    qk_norm_params: int = 0  # per-head-dim norms of queries and keys (Qwen3, Gemma3): they go with Q and K

    def num_params(self) -> int:
        """Parameters of this layer (decoder-layer linears, biases, norms and added modules)."""
        d, hd = self.hidden, self.head_dim
        n = self.attn_extra + self.mlp_extra + self.fixed_params
        if self.attention == "full":
            n += d * self.q_heads * hd * 2 + d * self.kv_heads * hd * 2  # q, o, k, v
            n += (self.q_heads + 2 * self.kv_heads) * hd if self.qkv_bias else 0
            n += self.qk_norm_params
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


def head_layout(nq: int, nkv: int, remove: list[int]) -> tuple[list[int | None], list[int]]:
    """The head layout after removing query heads ``remove``: the source query head of each new query head
    (None = zero padding head), and the source KV head of each new KV head.

    Query head ``j`` reads KV head ``j // (nq // nkv)``. A KV group left without query heads goes with them.
    When the remaining groups keep different numbers of query heads (uneven removal), each group is padded
    with zero query heads (zero ``q`` rows, zero ``o_proj`` columns: they contribute exactly nothing) up to
    the largest group, so the stock ``repeat_kv`` layout stays exact and no KV head is duplicated: the KV
    cache shrinks only by the removed groups, never grows.
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


# ----- one simulation per op: (adapter, layer state or all states, op) -> new state(s) ----------------------
def _remove_layers(adapter, states: list[LayerState], op) -> list[LayerState]:
    n = len(states)
    bad = [i for i in op.layers if not 0 <= i < n]
    if bad:
        raise PlanError(f"remove_layers: layer index(es) {bad} out of range; the model has {n} decoder layers (0..{n - 1})")
    if len(op.layers) >= n:
        raise PlanError(f"remove_layers would remove all {n} decoder layers; keep at least one")
    return [s for i, s in enumerate(states) if i not in set(op.layers)]


def _remove_heads(adapter, s: LayerState, op) -> LayerState:
    if s.attention != "full":
        raise PlanError(f"remove_heads: layer {op.layer} has no regular attention left (it is '{s.attention}')")
    bad = [h for h in op.heads if not 0 <= h < s.q_heads]
    if bad:
        raise PlanError(f"remove_heads: head index(es) {bad} out of range; layer {op.layer} has {s.q_heads} query "
                        f"heads (0..{s.q_heads - 1})")
    if len(op.heads) >= s.q_heads:
        raise PlanError(f"remove_heads would remove every head of layer {op.layer}; use drop_attention for that layer instead")
    q_src, kv_src = head_layout(s.q_heads, s.kv_heads, op.heads)
    return replace(s, q_heads=len(q_src), kv_heads=len(kv_src))


def _drop_attention(adapter, s: LayerState, op) -> LayerState:
    if s.attention == "none":
        raise PlanError(f"drop_attention: layer {op.layer} attention is already 'none'; the op cannot apply to it")
    return replace(s, attention="none", q_heads=0, kv_heads=0, qkv_bias=False, o_bias=False, attn_extra=0)


def _value_only_attention(adapter, s: LayerState, op) -> LayerState:
    if s.attention != "full":
        raise PlanError(f"value_only_attention: layer {op.layer} attention is already '{s.attention}'; the op "
                        "cannot apply to it")
    return replace(s, attention="value_only", q_heads=0)


def _drop_mlp(adapter, s: LayerState, op) -> LayerState:
    if s.mlp == "none":
        raise PlanError(f"drop_mlp: layer {op.layer} has no MLP left (it was dropped)")
    return replace(s, mlp="none", mlp_width=0, mlp_in_bias=False, mlp_out_bias=False, mlp_extra=0)


def _shrink_mlp(adapter, s: LayerState, op) -> LayerState:
    if s.mlp == "none":
        raise PlanError(f"shrink_mlp: layer {op.layer} has no MLP left (it was dropped)")
    bad = [c for c in op.keep if not 0 <= c < s.mlp_width]
    if bad:
        raise PlanError(f"shrink_mlp: channel index(es) {bad[:5]} out of range; layer {op.layer} MLP has {s.mlp_width} channels")
    return replace(s, mlp_width=len(op.keep), mlp_out_bias=s.mlp_out_bias or op.bias)


def _require_sublayer(s: LayerState, op) -> None:
    present = s.attention != "none" if op.sublayer == "attention" else s.mlp != "none"
    if not present:
        raise PlanError(f"{op.name}: layer {op.layer} has no {op.sublayer} sublayer left (it was dropped)")


def _scale_output(adapter, s: LayerState, op) -> LayerState:
    _require_sublayer(s, op)
    return s


def _add_linear(adapter, s: LayerState, op) -> LayerState:
    _require_sublayer(s, op)
    attention = op.sublayer == "attention"
    if adapter.uses_norm_target(op.sublayer):  # an added module after the post-sublayer norm
        if s.attn_extra if attention else s.mlp_extra:
            raise PlanError(
                f"add_linear: layer {op.layer} {op.sublayer} already carries a compensation; combine the two "
                "matrices (W2 @ W1) into one add_linear"
            )
        added = s.hidden * s.hidden + (s.hidden if op.bias else 0)
        return replace(s, attn_extra=s.attn_extra + added) if attention else replace(s, mlp_extra=s.mlp_extra + added)
    if op.bias and not (s.o_bias if attention else s.mlp_out_bias):  # folded, but the projection gains a bias
        return replace(s, o_bias=True) if attention else replace(s, mlp_out_bias=True)
    return s


#: op name -> its simulation; a whole-model op (``remove_layers``) sees every layer, the others ``op.layer``
SIMULATIONS = {
    "remove_layers": _remove_layers,
    "remove_heads": _remove_heads,
    "drop_attention": _drop_attention,
    "value_only_attention": _value_only_attention,
    "drop_mlp": _drop_mlp,
    "shrink_mlp": _shrink_mlp,
    "scale_output": _scale_output,
    "add_linear": _add_linear,
}


def simulate_op(adapter, states: list[LayerState], op) -> list[LayerState]:
    """The layer states after ``op``, or PlanError naming the problem and the fix."""
    simulate = SIMULATIONS.get(op.name)
    if simulate is None:  # pragma: no cover - the plan parser only builds known ops
        raise PlanError(f"no simulation for op {op.name!r}")
    if op.whole_model:
        return simulate(adapter, states, op)
    n = len(states)
    if not 0 <= op.layer < n:
        raise PlanError(f"{op.name}: layer {op.layer} out of range; the model has {n} decoder layers (0..{n - 1})")
    out = list(states)
    out[op.layer] = simulate(adapter, states[op.layer], op)
    return out


def set_config_fields(config, num_hidden_layers: int, layer_types: list[str] | None) -> None:
    """Set the layer count (and per-layer types) together, tolerating configs that validate on assignment."""
    if layer_types is not None:
        object.__setattr__(config, "layer_types", list(layer_types))
    object.__setattr__(config, "num_hidden_layers", int(num_hidden_layers))
