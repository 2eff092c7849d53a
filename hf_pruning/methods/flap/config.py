"""Configuration of FLAP (MLP channels only, as HARP's official runs use it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...config import ConfigError, PruningConfig, check_fraction

METRICS = ("wifv", "ifv", "wifn")


@dataclass
class FLAPConfig(PruningConfig):
    """FLAP on MLP channels. Budget: ``ratio`` (fraction of all MLP channels, the official ``pruning_ratio``) or
    ``param_ratio`` (fraction of decoder-layer parameters); give exactly one."""

    method: ClassVar[str] = "flap"
    #: one line for the model card's "Method" section
    card_text: ClassVar[str] = (
        "FLAP: MLP channels ranked by the fluctuation of their input times the squared norm of their output "
        "weights, standardised per layer and cut with one global threshold; the mean of each removed channel "
        "is folded into the down projection's bias."
    )
    ratio: float | None = field(default=None, metadata={
        "help": "fraction of all MLP intermediate channels to remove, in (0, 1) (one global threshold)"})
    param_ratio: float | None = field(default=None, metadata={
        "help": "instead of ratio: remove MLP channels worth this fraction of decoder-layer parameters"})
    metric: str = field(default="wifv", metadata={
        "help": "wifv (fluctuation x squared weight column norm, the default), ifv (fluctuation) or wifn "
                "(|W| x input norm)"})
    bias: bool = field(default=True, metadata={
        "help": "add the removed channels' mean contribution to the down projection's bias"})

    def __post_init__(self):
        super().__post_init__()  # field types first
        given = [k for k in ("ratio", "param_ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"FLAP needs exactly one budget, ratio or param_ratio (got {given or 'none'})")
        check_fraction(given[0], getattr(self, given[0]))
        if self.metric not in METRICS:
            raise ConfigError(f"unknown FLAP metric {self.metric!r}; choose one of {', '.join(METRICS)}")
