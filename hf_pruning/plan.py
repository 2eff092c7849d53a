"""Public home of the plan vocabulary (implemented in ``remote/`` because saved models replay it)."""

from .remote.hf_pruning_plan import (
    OP_TYPES,
    PLAN_FORMAT_VERSION,
    AddLinear,
    DropAttention,
    DropMLP,
    Op,
    PlanError,
    PruningPlan,
    RemoveHeads,
    RemoveLayers,
    ScaleOutput,
    ShrinkMLP,
    ValueOnlyAttention,
    op_from_dict,
)

__all__ = [
    "OP_TYPES",
    "PLAN_FORMAT_VERSION",
    "AddLinear",
    "DropAttention",
    "DropMLP",
    "Op",
    "PlanError",
    "PruningPlan",
    "RemoveHeads",
    "RemoveLayers",
    "ScaleOutput",
    "ShrinkMLP",
    "ValueOnlyAttention",
    "get_plan",
    "op_from_dict",
]


def get_plan(model) -> PruningPlan:
    """The plan a model carries (empty for an unpruned model), read from ``model.config.pruning_plan``."""
    return PruningPlan.from_dict(getattr(model.config, "pruning_plan", None))
