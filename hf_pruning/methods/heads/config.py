"""Configuration of uniform head pruning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...config import ConfigError, PruningConfig, check_fraction

SCORES = ("magnitude", "wanda")
UNITS = ("group", "query")


@dataclass
class HeadsConfig(PruningConfig):
    """Uniform head pruning. Budget: ``per_layer`` (units removed in every layer) or ``param_ratio`` (the smallest
    uniform count removing at least this fraction of decoder-layer parameters); give exactly one."""

    method: ClassVar[str] = "heads"
    #: one line for the model card's "Method" section
    card_text: ClassVar[str] = (
        "Uniform head pruning: the same number of attention heads (or whole KV groups) removed from every "
        "layer, ranked by weight magnitude or by a Wanda-style activation score."
    )
    score: str = field(default="magnitude", metadata={
        "help": "magnitude (L2 of the unit's weights) or wanda (|W| x input norm of its o_proj columns, and of "
                "its k/v rows for a group)"})
    unit: str = field(default="group", metadata={
        "help": "group (a KV head with its query heads: the KV cache shrinks) or query (query heads only, the "
                "same number from every KV group)"})
    per_layer: int | None = field(default=None, metadata={"help": "units removed in every layer"})
    param_ratio: float | None = field(default=None, metadata={
        "help": "instead of per_layer: remove at least this fraction of decoder-layer parameters"})

    def __post_init__(self):
        super().__post_init__()  # field types first
        given = [k for k in ("per_layer", "param_ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"head pruning needs exactly one budget, per_layer or param_ratio (got {given or 'none'})")
        if self.per_layer is not None and (isinstance(self.per_layer, bool) or not isinstance(self.per_layer, int)
                                           or self.per_layer < 1):
            raise ConfigError(f"per_layer must be a positive integer, got {self.per_layer!r}")
        if self.param_ratio is not None:
            check_fraction("param_ratio", self.param_ratio)
        if self.score not in SCORES:
            raise ConfigError(f"unknown head score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.unit not in UNITS:
            raise ConfigError(f"unit must be one of {UNITS}, got {self.unit!r}")

    def uses_calibration(self) -> bool:
        return self.score == "wanda"
