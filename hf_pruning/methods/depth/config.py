"""The configuration every depth method shares: the budget, a given removal order, the optional compensation."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import ClassVar

from ...config import ConfigError, PruningConfig, check_fraction
from .candidates import Candidate

#: the budget when none is given: this fraction of the candidates (FinerCut's paper ratio, 25% of the blocks)
DEFAULT_FRACTION = 0.25


@dataclass
class DepthConfig(PruningConfig):
    """Budget fields shared by the depth methods: give ``param_ratio`` or ``num_removals`` (not both); without
    a budget, ``DEFAULT_FRACTION`` of the candidates go. Block methods remove whole blocks
    (:meth:`candidate_granularity`)."""

    method: ClassVar[str] = ""
    #: ``prune_(..., compensation_calibration=ids)``: the compensation's own fit data, used with compensate=True
    inputs: ClassVar[dict[str, str]] = {"compensation_calibration": "compensate=True"}
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
                "default: chosen by K-fold held-out error (K = min(rows, 8) folds of calibration rows)"})
    solver: str = field(default="closed_form", metadata={"help": "compensation: closed_form (one solve) or adam"})

    def uses_calibration(self) -> bool:
        """The search needs calibration unless an ``order`` is given; the compensation fits on it."""
        return self.order is None or self.compensate

    def calibration_required(self, inputs: Collection[str] = ()) -> bool:
        """A given ``order`` with compensation needs only the fit's data: ``compensation_calibration`` will do."""
        return self.uses_calibration() and not (self.order is not None and "compensation_calibration" in inputs)

    def uses_input(self, name: str) -> bool:
        """``compensation_calibration`` is used with ``compensate=True`` only."""
        return name == "compensation_calibration" and self.compensate

    def candidate_granularity(self) -> str:
        """What the candidates are (see ``candidates_for``): whole blocks here; FinerCut chooses."""
        return "block"

    def candidate_fraction(self) -> float | None:
        """The budget as a fraction of the candidates: ``DEFAULT_FRACTION`` when no budget is given, else None
        (the budget is ``param_ratio`` or ``num_removals``)."""
        return DEFAULT_FRACTION if all(v is None for v in self._budgets().values()) else None

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
