"""The pruning plan: a small, closed, versioned, JSON-native vocabulary of structural operations.

This file is copied next to saved weights and imported by the saved model's remote code, so it may import
only the standard library and torch (see docs/DESIGN-DECISIONS.md).

Every op names layer indices of the model *as it is when the op is applied* (ops apply in order). Ops that
need tensor values (bias compensation, compensation matrices) carry them in ``op.tensors``, which is never
serialised: after an op has been applied the values live in the model's weights, and a reload only has to
rebuild the shapes ("replay") before the checkpoint fills them in.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

PLAN_FORMAT_VERSION = 1
SUBLAYERS = ("attention", "mlp")


class PlanError(ValueError):
    """A plan that is malformed or cannot be applied to the model it was given."""


@dataclass
class Op:
    """Base class of plan operations. Subclasses set ``name`` and declare their JSON fields."""

    name: ClassVar[str] = ""
    #: True when the op changes parameter shapes or module types (it must be replayed on reload).
    structural: ClassVar[bool] = True
    #: True when the op works on the whole decoder (``layers``) rather than on one layer (``layer``).
    whole_model: ClassVar[bool] = False
    #: Tensor values needed to apply the op to real weights; never serialised (see ``tensor_specs``).
    tensors: dict = field(default_factory=dict, repr=False, compare=False, kw_only=True)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"op": self.name}
        for f in fields(self):
            if f.name != "tensors":
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def tensor_specs(self) -> dict[str, tuple[tuple[str, ...], bool]]:
        """The tensors this op reads from ``tensors``: name -> (shape in config fields, required).

        Checked before any surgery (a missing required tensor or a wrong shape is a PlanError); ops without
        tensor values declare none.
        """
        return {}

    def needs_replay(self) -> bool:
        """Whether a reload must re-run this op to rebuild shapes (folded ops live in the weights)."""
        return self.structural


#: the end of the message for plan data nested deeply enough to raise RecursionError
TOO_DEEP = "is nested too deeply to be a pruning plan (a JSON object whose 'ops' is a list of flat op objects)"


def _show(value: Any) -> str:
    """A short repr for messages (bounded in length and depth: a deeply nested value cannot overflow it)."""
    return reprlib.repr(value)


def _int_list(value: Any, what: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise PlanError(f"{what} must be a list of integers, got {_show(value)}")
    return [int(v) for v in value]


def _check_layer(value: Any, op: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise PlanError(f"{op}: 'layer' must be an integer layer index, got {_show(value)}")
    return value


def _check_sublayer(value: Any, op: str) -> str:
    if value not in SUBLAYERS:
        raise PlanError(f"{op}: 'sublayer' must be one of {SUBLAYERS}, got {_show(value)}")
    return value


@dataclass
class RemoveLayers(Op):
    """Delete whole decoder layers; the remaining layers are renumbered."""

    name: ClassVar[str] = "remove_layers"
    whole_model: ClassVar[bool] = True
    layers: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.layers = sorted(set(_int_list(self.layers, "remove_layers: 'layers'")))
        if not self.layers:
            raise PlanError("remove_layers: 'layers' is empty; give at least one layer index")


@dataclass
class RemoveHeads(Op):
    """Remove query heads of one layer. KV heads left without query heads go too (GQA-aware)."""

    name: ClassVar[str] = "remove_heads"
    layer: int = 0
    heads: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.layer = _check_layer(self.layer, self.name)
        self.heads = sorted(set(_int_list(self.heads, "remove_heads: 'heads'")))
        if not self.heads:
            raise PlanError("remove_heads: 'heads' is empty; give at least one query-head index")


@dataclass
class DropAttention(Op):
    """The layer's attention sublayer contributes nothing; its norms go with it; it takes no KV cache."""

    name: ClassVar[str] = "drop_attention"
    layer: int = 0

    def __post_init__(self):
        self.layer = _check_layer(self.layer, self.name)


@dataclass
class DropMLP(Op):
    """The layer's MLP sublayer contributes nothing; its norms go with it."""

    name: ClassVar[str] = "drop_mlp"
    layer: int = 0

    def __post_init__(self):
        self.layer = _check_layer(self.layer, self.name)


@dataclass
class ValueOnlyAttention(Op):
    """HARP: Q and K removed, each token attends only to itself: ``o_proj(repeat_kv(v_proj(x)))``."""

    name: ClassVar[str] = "value_only_attention"
    layer: int = 0

    def __post_init__(self):
        self.layer = _check_layer(self.layer, self.name)


@dataclass
class ShrinkMLP(Op):
    """Keep a subset of the layer's MLP channels; ``bias=True`` adds ``tensors['bias']`` to the output bias."""

    name: ClassVar[str] = "shrink_mlp"
    layer: int = 0
    keep: list[int] = field(default_factory=list)
    bias: bool = False

    def __post_init__(self):
        self.layer = _check_layer(self.layer, self.name)
        self.keep = sorted(set(_int_list(self.keep, "shrink_mlp: 'keep'")))
        if not self.keep:
            raise PlanError("shrink_mlp: 'keep' is empty; to remove the whole MLP use drop_mlp")
        if not isinstance(self.bias, bool):
            raise PlanError(f"shrink_mlp: 'bias' must be true or false, got {_show(self.bias)}")

    def tensor_specs(self) -> dict[str, tuple[tuple[str, ...], bool]]:
        return {"bias": (("hidden_size",), False)} if self.bias else {}  # no values: a zero bias


@dataclass
class ScaleOutput(Op):
    """Multiply a sublayer's residual contribution by ``alpha`` (always folded into existing weights)."""

    name: ClassVar[str] = "scale_output"
    structural: ClassVar[bool] = False
    layer: int = 0
    sublayer: str = "attention"
    alpha: float = 1.0

    def __post_init__(self):
        self.layer = _check_layer(self.layer, self.name)
        self.sublayer = _check_sublayer(self.sublayer, self.name)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise PlanError(f"scale_output: 'alpha' must be a finite number, got {_show(self.alpha)}")
        self.alpha = float(self.alpha)


@dataclass
class AddLinear(Op):
    """Replace a sublayer's residual contribution ``f`` by ``W @ f + b`` (a d x d compensation).

    ``tensors['weight']`` is the ``[d, d]`` matrix and ``tensors['bias']`` the optional ``[d]`` vector. The
    adapter folds it into the sublayer's output projection when the math is exact and no new parameter is
    needed (``fused=True``); otherwise it adds a module (``fused=False``) that a reload rebuilds.
    """

    name: ClassVar[str] = "add_linear"
    layer: int = 0
    sublayer: str = "mlp"
    bias: bool = False
    fused: bool | None = None  # decided when applied

    def __post_init__(self):
        self.layer = _check_layer(self.layer, self.name)
        self.sublayer = _check_sublayer(self.sublayer, self.name)
        if not isinstance(self.bias, bool):
            raise PlanError(f"add_linear: 'bias' must be true or false, got {_show(self.bias)}")

    def tensor_specs(self) -> dict[str, tuple[tuple[str, ...], bool]]:
        specs = {"weight": (("hidden_size", "hidden_size"), True)}
        return {**specs, "bias": (("hidden_size",), True)} if self.bias else specs

    def needs_replay(self) -> bool:
        return self.fused is False


OP_TYPES: dict[str, type[Op]] = {
    cls.name: cls
    for cls in (
        RemoveLayers,
        RemoveHeads,
        DropAttention,
        DropMLP,
        ValueOnlyAttention,
        ShrinkMLP,
        ScaleOutput,
        AddLinear,
    )
}


def op_from_dict(data: dict) -> Op:
    """Build one op from its JSON form, with a clear error for unknown ops or fields."""
    if not isinstance(data, dict) or "op" not in data:
        raise PlanError(f"each op must be a JSON object with an 'op' key, got {_show(data)}")
    name = data["op"]
    cls = OP_TYPES.get(name)
    if cls is None:
        raise PlanError(f"unknown op {_show(name)}; known ops: {', '.join(OP_TYPES)}")
    allowed = {f.name for f in fields(cls)} - {"tensors"}
    extra = set(data) - allowed - {"op"}
    if extra:
        raise PlanError(f"{name}: unknown field(s) {_show(sorted(map(str, extra)))}; allowed: {sorted(allowed)}")
    return cls(**{k: v for k, v in data.items() if k != "op"})


@dataclass
class PruningPlan:
    """An ordered list of ops plus the architecture they start from.

    ``base`` holds the config fields that ops change (``num_hidden_layers``, ``layer_types``) as they were
    before the first op; a reload builds that architecture and replays the ops. ``base`` is filled in by
    :func:`apply_plan_` when a plan first touches a model.
    """

    ops: list[Op] = field(default_factory=list)
    base: dict | None = None
    format_version: int = PLAN_FORMAT_VERSION

    def __post_init__(self):
        self.ops = [op if isinstance(op, Op) else op_from_dict(op) for op in self.ops]

    # ----- JSON -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "base": self.base,
            "ops": [op.to_dict() for op in self.ops],
        }

    @classmethod
    def from_dict(cls, data: dict | PruningPlan | None) -> PruningPlan:
        """Parse a plan; a plan written by a newer hf_pruning raises with the way out."""
        if data is None:
            return cls()
        if isinstance(data, PruningPlan):
            return data
        if isinstance(data, list):
            return cls(ops=[op_from_dict(d) for d in data])
        if not isinstance(data, dict):
            raise PlanError(f"a pruning plan must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version", PLAN_FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise PlanError(f"a pruning plan's format_version must be a positive integer, got {_show(version)}")
        if version > PLAN_FORMAT_VERSION:
            raise PlanError(
                f"this pruning plan has format_version {_show(version)}, newer than the {PLAN_FORMAT_VERSION} this "
                "code understands; upgrade hf_pruning (pip install -U hf_pruning) or load the checkpoint with "
                "trust_remote_code=True so that the code saved with it is used"
            )
        extra = set(data) - {"format_version", "base", "ops"}
        if extra:
            raise PlanError(f"unknown pruning-plan field(s) {_show(sorted(map(str, extra)))}")
        ops = data.get("ops", [])
        if not isinstance(ops, list):
            raise PlanError("a pruning plan's 'ops' must be a list")
        if data.get("base") is not None and not isinstance(data["base"], dict):
            raise PlanError(f"a pruning plan's 'base' must be a JSON object or null, got {_show(data['base'])}")
        return cls(ops=[op_from_dict(d) for d in ops], base=data.get("base"), format_version=PLAN_FORMAT_VERSION)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str, source: str = "the plan") -> PruningPlan:
        """Parse plan JSON text; text that is not JSON (or nested too deeply for one) raises PlanError naming
        ``source`` (e.g. the file it came from)."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise PlanError(f"{source} is not valid JSON: {err}") from None
        except RecursionError:
            raise PlanError(f"{source} {TOO_DEEP}") from None

    # ----- composition -----------------------------------------------------------------------------------
    def __add__(self, other: PruningPlan) -> PruningPlan:
        """Compose: ``other``'s ops run after ``self``'s, on the model ``self`` produced."""
        return PruningPlan(ops=[*self.ops, *other.ops], base=self.base or other.base)

    def __len__(self) -> int:
        return len(self.ops)

    def is_stock_expressible(self) -> bool:
        """True when the result needs no custom code: only whole-layer removal and folded ops."""
        return all(isinstance(op, RemoveLayers) or not op.needs_replay() for op in self.ops)
