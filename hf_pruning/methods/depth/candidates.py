"""Candidates of the depth methods: the removable pieces of a decoder layer, what removing them frees, and the
plan that removes them.

A *candidate* is a decoder layer's attention sublayer, its MLP sublayer or the whole block. A removal set becomes
plan ops (``drop_attention`` / ``drop_mlp``, whole layers as ``remove_layers``) by :func:`plan_for`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...plan import DropAttention, DropMLP, PruningPlan, RemoveLayers
from ...remote.hf_pruning_surgery import adapter_for, inspect_model

KINDS = ("attention", "mlp", "block")


@dataclass(frozen=True, order=True)
class Candidate:
    """One removable piece: ``kind`` of decoder layer ``layer``. Ordered by (layer, kind): the tie-break order."""

    layer: int
    kind: str  # "attention" | "mlp" | "block"

    @property
    def parts(self) -> tuple[str, ...]:
        return ("attention", "mlp") if self.kind == "block" else (self.kind,)

    def __str__(self) -> str:
        return f"{self.layer}.{self.kind}"

    @classmethod
    def parse(cls, text: str) -> Candidate:
        layer, _, kind = str(text).partition(".")
        if kind not in KINDS or not layer.isdigit():
            raise ValueError(f"bad candidate {text!r}: expected '<layer>.<attention|mlp|block>', e.g. '12.attention'")
        return cls(int(layer), kind)


def candidates_for(model, granularity: str) -> list[Candidate]:
    """Every candidate of ``granularity`` ("sublayer", "attention", "mlp", "block") still present in the model."""
    out = []
    for i, state in enumerate(inspect_model(model)):
        has_attn, has_mlp = state.attention != "none", state.mlp != "none"
        if granularity == "block":
            if has_attn or has_mlp:
                out.append(Candidate(i, "block"))
            continue
        if granularity in ("sublayer", "attention") and has_attn:
            out.append(Candidate(i, "attention"))
        if granularity in ("sublayer", "mlp") and has_mlp:
            out.append(Candidate(i, "mlp"))
    return sorted(out)


def named_candidates(model, names, what: str, fix: str) -> list[Candidate]:
    """``names`` (candidates or strings such as ``"12.mlp"``) as candidates of ``model``; a name the model does not
    have, or a repeat, is refused with a message about ``what`` and ``fix``."""
    parsed = [c if isinstance(c, Candidate) else Candidate.parse(c) for c in names]
    allowed = set(candidates_for(model, "block")) | set(candidates_for(model, "sublayer"))
    bad = [str(c) for c in parsed if c not in allowed]
    if bad or len(set(parsed)) != len(parsed):
        raise ValueError(f"{what} names candidates the model does not have (or repeats one): {bad or parsed}; {fix}")
    return parsed


def plan_for(model, removed: list[Candidate]) -> PruningPlan:
    """Drop ops in removal order; removed blocks, and layers that lose both sublayers and have no norm left on
    the residual stream (everything but OPT post-LN), are removed whole (stock-expressible)."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    parts: dict[int, set[str]] = {}
    for c in removed:
        parts.setdefault(c.layer, set()).add(c.kind)
    whole = sorted(i for i, p in parts.items()
                   if "block" in p or (p == {"attention", "mlp"} and not adapter.residual_norms(layers[i])))
    ops = []
    for c in removed:
        if c.layer in whole:
            continue
        ops.append(DropAttention(layer=c.layer) if c.kind == "attention" else DropMLP(layer=c.layer))
    if whole:
        ops.append(RemoveLayers(layers=whole))
    return PruningPlan(ops=ops)
