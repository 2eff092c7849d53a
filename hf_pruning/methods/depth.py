"""Shared pieces of the depth methods (FinerCut, ShortGPT, SLEB, ...): candidates, budgets, a layer runner.

A *candidate* is a removable piece of a decoder layer: its attention sublayer, its MLP sublayer or the whole
block. :class:`DepthRunner` runs the model layer by layer on calibration rows with any set of candidates
removed, using the very drop operations of the plan (``drop_attention_in_`` / ``drop_mlp_in_``) applied for the
duration of one call, so what the search scores is exactly what the saved model computes. It caches the
residual stream at the input of every layer for the current removal set; scoring a candidate in layer ``l``
then re-runs layers ``l..L-1`` only. Work is counted in *layer-forwards*: one decoder layer over the whole
calibration set (a call on a fraction of the tokens counts that fraction).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..calibration.capture import capture_layer_inputs, run_layer
from ..config import ConfigError, PruningConfig, check_fraction
from ..plan import DropAttention, DropMLP, PruningPlan, RemoveLayers
from ..remote.hf_pruning_surgery import adapter_for, inspect_model
from .layerwise import LAYER_BATCH

logger = logging.getLogger(__name__)

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


def removal_params(model) -> tuple[dict[tuple[int, str], int], int]:
    """Parameters each removal frees, keyed (layer, "attention"|"mlp"|"block"), and the decoder total."""
    freed = {}
    states = inspect_model(model)
    for i, s in enumerate(states):
        freed[(i, "attention")] = s.num_params() - dataclasses.replace(s, attention="none").num_params()
        freed[(i, "mlp")] = s.num_params() - dataclasses.replace(s, mlp="none").num_params()
        freed[(i, "block")] = s.num_params()  # remove_layers also takes norms that stay on the residual stream
    return freed, sum(s.num_params() for s in states)


def params_of(removed, freed: dict[tuple[int, str], int]) -> int:
    """Parameters that removing ``removed`` frees (``freed`` from :func:`removal_params`)."""
    return sum(freed[(c.layer, c.kind)] for c in removed)


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


@contextlib.contextmanager
def skipping(model, skip, tuple_out: bool):
    """Layers ``skip`` pass their input through (as ``remove_layers`` would) for the duration; full-model
    forwards and backwards then see the model with those blocks removed. ``tuple_out``: what layers return."""
    layers = adapter_for(model).decoder_layers(model)

    def through(hidden_states, *args, **kwargs):
        return (hidden_states,) if tuple_out else hidden_states

    try:
        for idx in skip:
            layers[idx].forward = through
        yield model
    finally:
        for idx in skip:
            layers[idx].__dict__.pop("forward", None)


def layers_return_tuple(model, ids: torch.Tensor) -> bool:
    """Whether this model's decoder layers return a tuple (older transformers) or a tensor; one short forward."""
    inputs, kwargs = capture_layer_inputs(model, ids[:1, :8])
    with torch.no_grad():
        return isinstance(adapter_for(model).decoder_layers(model)[0](inputs[0], **kwargs[0]), tuple)


@torch.no_grad()
def head_logits(model, layers, ids: torch.Tensor, final_hidden: torch.Tensor, tuple_out: bool) -> torch.Tensor:
    """The model's logits ``[T, V]`` (float32) for token ids ``[T]`` given the last layer's output ``[1, T, d]``.

    Runs the model's own forward with every decoder layer passing its input through and the last one
    returning ``final_hidden``, so the final norm, any output projection, the LM head and logit soft-capping
    are exactly the model's. ``tuple_out``: whether decoder layers return tuples (older transformers).
    """
    last = len(layers) - 1
    wrap = (lambda h: (h,)) if tuple_out else (lambda h: h)

    def through(idx):
        def forward(hidden_states, *args, **kwargs):
            return wrap(final_hidden if idx == last else hidden_states)

        return forward

    try:
        for idx, layer in enumerate(layers):
            layer.forward = through(idx)
        out = model(ids[None].to(final_hidden.device), use_cache=False)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    return out.logits[0].float()


class DepthRunner:
    """Runs decoder layers on calibration rows with candidates removed; caches the residual stream.

    ``calibration``: LongTensor ``[n_samples, seq_len]``; every row is run on its own (batch 1), so costs can be
    cut short per sample. ``token_weight`` scales the work counter (a runner on a subset of the tokens of the
    main calibration counts its share of a full layer-forward). ``removed``: candidates removed from the start.
    """

    def __init__(self, model, calibration: torch.Tensor, token_weight: float = 1.0, removed: tuple = (),
                 prefix_from: DepthRunner | None = None):
        """``prefix_from``: a runner on the same rows with nothing removed; its cached stream up to the first
        removed layer is this runner's too, so only the layers from there on are run."""
        self.model = model
        self.adapter = adapter_for(model)
        self.layers = self.adapter.decoder_layers(model)
        self.hidden = self.adapter.hidden_size(model.config)
        self.ids = calibration
        self.n = calibration.shape[0]
        self.token_weight = token_weight
        self.removed: dict[int, set[str]] = {}
        for c in removed:  # start from these removals: the first pass is already the pruned one
            self.removed.setdefault(c.layer, set()).add(c.kind)
        self.layer_forwards = 0.0
        self.head_forwards = 0.0
        self._tuple_out = None
        if prefix_from is not None:
            if prefix_from.removed or prefix_from.ids is not calibration:
                raise ValueError("prefix_from must be a runner on the same calibration rows with nothing removed")
            first = min(self.removed, default=len(self.layers))
            self.kwargs, self._tuple_out = prefix_from.kwargs, prefix_from._tuple_out
            # cache[l][s]: input of layer l for sample s under the current removal set (cache[L]: final hidden)
            self.cache = [list(prefix_from.cache[i]) if i <= first else [None] * self.n
                          for i in range(len(self.layers) + 1)]
            self.refresh(first)
            return
        inputs, self.kwargs = capture_layer_inputs(model, calibration)
        self.cache: list[list[torch.Tensor | None]] = [inputs] + [[None] * self.n for _ in self.layers]
        self.refresh(0)

    # ----- removal ---------------------------------------------------------------------------------------
    def remove(self, candidate: Candidate, refresh: bool = True) -> None:
        """Make ``candidate``'s removal permanent for this runner; ``refresh`` updates the cached residual stream
        (a naive search, which always runs from layer 0, skips it: only the layer-0 inputs are used then)."""
        self.removed.setdefault(candidate.layer, set()).add(candidate.kind)
        if refresh:
            self.refresh(candidate.layer)

    @contextlib.contextmanager
    def dropped(self, idx: int, parts: set[str]):
        """Layer ``idx`` with ``parts`` ("attention", "mlp") dropped through the adapter's own drop ops; restored
        afterwards. (A removed "block" never gets here: the layer is skipped, as ``remove_layers`` does.)"""
        layer = self.layers[idx]
        if not parts:
            yield layer
            return
        saved = dict(layer._modules)
        try:
            if "attention" in parts and self.adapter.attention(layer).__class__.__name__ != "NoAttention":
                self.adapter.drop_attention_in_(layer)
            if "mlp" in parts and not self._mlp_dropped(layer):
                self.adapter.drop_mlp_in_(layer, self.hidden)
            yield layer
        finally:
            layer._modules.clear()
            layer._modules.update(saved)

    def _mlp_dropped(self, layer) -> bool:
        name = self.adapter.mlp_name
        module = getattr(layer, name) if name else getattr(layer, self.adapter.mlp_out_name)
        return type(module).__name__ in ("ZeroMLP", "ZeroProjection")

    # ----- running ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, sample: int, start: int, extra: Candidate | None = None) -> torch.Tensor:
        """Final hidden state ``[1, T, d]`` of ``sample`` with the current removals plus ``extra``, from layer ``start``."""
        hidden = self.cache[start][sample]
        for idx in range(start, len(self.layers)):
            parts = set(self.removed.get(idx, ()))
            if extra is not None and extra.layer == idx:
                parts.add(extra.kind)
            hidden = self._layer(idx, hidden, parts)
        return hidden

    def _layer(self, idx: int, hidden: torch.Tensor, parts: set[str]) -> torch.Tensor:
        """One decoder layer with ``parts`` removed (``"block"``: the layer is skipped, costing nothing) on
        ``hidden`` ``[b, T, d]`` (``b`` calibration rows)."""
        if "block" in parts:
            return hidden
        with self.dropped(idx, parts) as layer:
            hidden = run_layer(layer, hidden, self.kwargs[idx])
        self.layer_forwards += self.token_weight * hidden.shape[0] / self.n
        return hidden

    @torch.no_grad()
    def refresh(self, start: int) -> None:
        """Recompute the cached inputs of layers ``start+1..L`` (after a change in layer ``start``). Rows run
        in batches of ``LAYER_BATCH`` (the captured masks and position embeddings broadcast over the batch);
        the cache keeps one ``[1, T, d]`` view per row."""
        if start >= len(self.layers):
            return
        for b0 in range(0, self.n, LAYER_BATCH):
            rows = slice(b0, min(b0 + LAYER_BATCH, self.n))
            hidden = torch.cat(self.cache[start][rows])  # [b, T, d]
            for idx in range(start, len(self.layers)):
                hidden = self._layer(idx, hidden, set(self.removed.get(idx, ())))
                self.cache[idx + 1][rows] = list(hidden.split(1))
        if self._tuple_out is None:
            out = self.layers[0](self.cache[0][0], **self.kwargs[0])
            self._tuple_out = isinstance(out, tuple)

    @torch.no_grad()
    def logits(self, sample: int, final_hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits ``[T, V]`` (float32) for ``sample`` given the last layer's output ``[1, T, d]``."""
        self.head_forwards += self.token_weight / self.n
        return head_logits(self.model, self.layers, self.ids[sample], final_hidden, self._tuple_out)

    def dense_logits(self) -> list[torch.Tensor]:
        """Logits ``[T, V]`` per sample with the current removals (the dense model when nothing is removed)."""
        return [self.logits(s, self.cache[len(self.layers)][s]) for s in range(self.n)]


# ---------------------------------------------------------------------------------------------------------
# budgets
# ---------------------------------------------------------------------------------------------------------
@dataclass
class DepthConfig(PruningConfig):
    """Budget fields shared by the depth methods: give ``param_ratio`` or ``num_removals`` (not both)."""

    method: ClassVar[str] = ""
    param_ratio: float | None = field(default=None, metadata={
        "help": "remove candidates until at least this fraction of decoder-layer parameters is gone (0, 1)"})
    num_removals: int | None = field(default=None, metadata={"help": "remove exactly this many candidates"})
    order: list[str] | None = field(default=None, metadata={
        "help": "a removal order from an earlier search (e.g. [\"12.attention\", \"20.mlp\"]; the budget takes its "
                "first entries, all of them without a budget): skips the search, needs no calibration"})

    compensate: bool = field(default=False, metadata={
        "help": "GradMAP's stage 2: fit a d x d projection at a kept layer that drifted most (the validated best of the "
                "largest shifts) and fuse it into "
                "its MLP down projection"})
    ridge: float | None = field(default=None, metadata={
        "help": "compensation: ridge strength (relative to the contribution's energy per dimension), > 0; "
                "default: chosen by leave-one-sample-out error"})
    solver: str = field(default="closed_form", metadata={"help": "compensation: closed_form (one solve) or adam"})

    def uses_calibration(self) -> bool:
        return self.order is None or self.compensate

    def _budgets(self) -> dict:
        return {"param_ratio": self.param_ratio, "num_removals": self.num_removals}

    def __post_init__(self):
        super().__post_init__()  # field types first
        given = [k for k, v in self._budgets().items() if v is not None]
        if len(given) > 1:
            raise ConfigError(f"give one budget, not {' and '.join(given)}")
        if self.param_ratio is not None:
            check_fraction("param_ratio", self.param_ratio)
        if self.num_removals is not None and (isinstance(self.num_removals, bool)
                                              or not isinstance(self.num_removals, int) or self.num_removals < 1):
            raise ConfigError(f"num_removals must be a positive integer, got {self.num_removals!r}")
        if self.ridge is not None and (isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float))
                                       or not self.ridge > 0):
            raise ConfigError(f"ridge must be a number > 0 (it keeps the compensation solvable), got {self.ridge!r}")
        if self.solver not in ("closed_form", "adam"):
            raise ConfigError(f"solver must be 'closed_form' or 'adam', got {self.solver!r}")
        if self.order is not None:
            try:
                self.order = [str(Candidate.parse(c)) for c in self.order]
            except ValueError as err:
                raise ConfigError(str(err)) from None


@dataclass
class Budget:
    """A resolved budget: stop after ``steps`` removals, or once ``param_ratio`` of the parameters is gone."""

    steps: int
    param_ratio: float | None
    freed: dict
    total: int

    def stop(self, removed: list[Candidate]) -> bool:
        if self.param_ratio is None:
            return len(removed) >= self.steps
        return params_of(removed, self.freed) >= self.param_ratio * self.total

    def prefix(self, order: list[Candidate]) -> int:
        """How many of ``order``'s first candidates this budget removes."""
        for k in range(1, min(len(order), self.steps) + 1):
            if self.stop(order[:k]):
                return k
        raise ValueError(f"{len(order)} removals in order do not reach the budget "
                         f"(param_ratio={self.param_ratio}); choose a smaller ratio")


def resolve_budget(model, candidates: list[Candidate], num_removals: int | None, param_ratio: float | None,
                   fraction: float | None = None, what: str = "sublayer") -> Budget:
    """Turn a budget into a step count (and a parameter target), refusing budgets that empty the model."""
    freed, total = removal_params(model)
    available = len(candidates)
    if not available:
        raise ValueError(f"the model has no {what} left to remove")
    if param_ratio is not None:
        # at most every candidate but one can go: the smallest one stays at best
        smallest = min(params_of([c], freed) for c in candidates)
        reachable = (params_of(candidates, freed) - smallest) / total
        if param_ratio > reachable:
            raise ValueError(f"param_ratio={param_ratio} would need every {what} removed (all but one free at most "
                             f"{reachable:.1%} of decoder parameters); choose a smaller ratio")
        return Budget(available - 1, param_ratio, freed, total)
    steps = num_removals if num_removals is not None else int(available * fraction)
    if steps >= available:
        raise ValueError(f"removing {steps} of {available} {what}s would remove every {what} (more removals than "
                         f"candidates); ask for fewer than {available}")
    if steps < 1:
        raise ValueError(f"a ratio of {fraction} removes no {what} out of {available}; raise it to at least "
                         f"{1 / available:.3f}")
    return Budget(steps, None, freed, total)


def named_candidates(model, names, what: str, fix: str) -> list[Candidate]:
    """``names`` (candidates or strings such as ``"12.mlp"``) as candidates of ``model``; a name the model does not
    have, or a repeat, is refused with a message about ``what`` and ``fix``."""
    parsed = [c if isinstance(c, Candidate) else Candidate.parse(c) for c in names]
    allowed = set(candidates_for(model, "block")) | set(candidates_for(model, "sublayer"))
    bad = [str(c) for c in parsed if c not in allowed]
    if bad or len(set(parsed)) != len(parsed):
        raise ValueError(f"{what} names candidates the model does not have (or repeats one): {bad or parsed}; {fix}")
    return parsed


def removal_from_order(model, config: DepthConfig, granularity: str, default_fraction: float | None) -> list[Candidate]:
    """The candidates ``config.order`` names, cut to the budget (all of them when no budget is given)."""
    order = named_candidates(model, config.order, "order", "pass an order found on this model")
    budgets = {k: v for k, v in config._budgets().items() if v is not None}
    if not budgets:
        return order
    fraction = budgets.get("sublayer_ratio", default_fraction)
    budget = resolve_budget(model, candidates_for(model, granularity), config.num_removals, config.param_ratio,
                            fraction)
    return order[:budget.prefix(order)]


def depth_result(model, config: DepthConfig, removed: list[Candidate], calibration, report: dict,
                 compensation_calibration=None):
    """The PruningResult of a depth method: removal ops, the optional compensation (fitted on
    ``compensation_calibration`` when given, else on ``calibration``), the order in the record."""
    from ..registry import PruningResult
    from .compensation import fit_compensation

    plan = plan_for(model, removed)
    if config.compensate:
        fit_on = compensation_calibration if compensation_calibration is not None else calibration
        if fit_on is None:
            raise ValueError("compensate=True fits on calibration data: pass calibration token ids")
        ops, report["compensation"] = fit_compensation(model, removed, fit_on, config.ridge, config.solver)
        report["compensation"]["calibration_tokens"] = int(fit_on.numel())
        plan.ops.extend(ops)
    freed, total = removal_params(model)
    order = [str(c) for c in removed]
    report.update({"order": order, "removed_params": params_of(removed, freed),
                   "removed_param_fraction": params_of(removed, freed) / total})
    return PruningResult(plan=plan, report=report, record={**config.to_dict(), "order": order})
